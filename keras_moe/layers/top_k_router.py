"""TopKRouter: the token-choice gating network."""

import keras
from keras import ops

from keras_moe._checks import check_bool
from keras_moe._checks import check_non_negative_float
from keras_moe._checks import check_optional_seed
from keras_moe._checks import check_positive_int
from keras_moe._checks import check_rate
from keras_moe._checks import get_initializer
from keras_moe._checks import get_regularizer
from keras_moe.api_export import keras_moe_export
from keras_moe.layers._seed_state import SavesSeedStates
from keras_moe.routing.top_k import stable_top_k


@keras_moe_export
class TopKRouter(SavesSeedStates, keras.layers.Layer):
    """Token-choice top-k router, computed in float32.

    Projects each token to one logit per expert and picks the `top_k` experts
    with the highest score. The projection, softmax and selection always run
    in float32 with a float32 kernel, whatever the layer's dtype policy
    (Switch Transformer's "selective precision"): under `"mixed_bfloat16"` a
    bfloat16 softmax over many experts rounds small probabilities to zero and
    flips near-ties between experts.

    Two ways to turn logits into the `top_k` combine weights:
    - default: softmax over all experts, then keep the top k probabilities
      (Switch, GShard); with `normalize_weights=True` the k weights are
      rescaled to sum to 1 (Mixtral, Qwen-MoE).
    - `softmax_after_top_k=True`: keep the top k logits, then softmax over
      those k only (gpt-oss); the weights always sum to 1.

    Ties are broken towards the lower expert index on every backend.

    Training-time noise, off at inference:
    - `jitter_noise=eps` multiplies the router's input by
      `Uniform(1 - eps, 1 + eps)` (Switch Transformer); the experts still see
      the clean tokens.
    - `logit_noise_std=s` adds `Normal(0, s)` to the logits before the
      selection (fixed-scale version of Shazeer et al.'s noisy top-k).

    Args:
        num_experts: int, number of experts E.
        top_k: int, experts per token, `1 <= top_k <= num_experts`.
        normalize_weights: bool, renormalise the k softmax weights to sum to 1.
        softmax_after_top_k: bool, softmax over the k selected logits instead
            of over all experts. Cannot be combined with `normalize_weights`
            (the weights already sum to 1).
        jitter_noise: float >= 0, multiplicative input jitter during training.
        logit_noise_std: float >= 0, std of Gaussian logit noise during
            training.
        use_bias: bool, whether the projection has a bias.
        kernel_initializer: initializer for the `(d_model, E)` kernel.
        bias_initializer: initializer for the `(E,)` bias.
        kernel_regularizer: optional regularizer for the kernel.
        seed: optional int seed for the noise.
        **kwargs: base `Layer` arguments (`name`, `dtype`, ...).

    Call arguments:
        inputs: `(..., d_model)` tokens.
        mask: optional bool `(...)`, accepted for interface compatibility with
            routers that compare tokens; token-choice routing is per token so
            it is not used here (the MoE layer drops masked tokens).
        training: bool, enables the noise.

    Returns:
        A dict with
        - `"expert_index"`: int32 `(..., top_k)`, chosen experts, best first;
        - `"combine_weights"`: float32 `(..., top_k)`;
        - `"router_logits"`: float32 `(..., E)` (noisy in training if noise
          is on, since that is what the selection used);
        - `"router_probs"`: float32 `(..., E)`, softmax of the logits.

    Example:

    >>> router = TopKRouter(num_experts=4, top_k=2)
    >>> routing = router(np.ones((3, 8), "float32"))
    >>> routing["expert_index"].shape, routing["combine_weights"].shape
    ((3, 2), (3, 2))

    References:
        - Shazeer et al., 2017, "Outrageously Large Neural Networks".
        - Fedus et al., 2021, "Switch Transformers".
        - Jiang et al., 2024, "Mixtral of Experts".
    """

    def __init__(
        self,
        num_experts,
        top_k=2,
        normalize_weights=False,
        softmax_after_top_k=False,
        jitter_noise=0.0,
        logit_noise_std=0.0,
        use_bias=False,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        seed=None,
        **kwargs,
    ):
        # The router never autocasts: it reads its float32 kernel as float32
        # even under a mixed precision policy.
        kwargs["autocast"] = False
        super().__init__(**kwargs)
        check_positive_int("num_experts", num_experts)
        check_positive_int("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(
                "Received an invalid value for `top_k`, expected "
                f"1 <= top_k <= num_experts={num_experts}. Received: "
                f"top_k={top_k}"
            )
        normalize_weights = check_bool("normalize_weights", normalize_weights)
        softmax_after_top_k = check_bool(
            "softmax_after_top_k", softmax_after_top_k
        )
        if normalize_weights and softmax_after_top_k:
            raise ValueError(
                "`normalize_weights=True` cannot be combined with "
                "`softmax_after_top_k=True`: a softmax over the k selected "
                "logits already sums to 1. Received: normalize_weights=True, "
                "softmax_after_top_k=True"
            )
        check_rate("jitter_noise", jitter_noise)
        check_non_negative_float("logit_noise_std", logit_noise_std)
        self.num_experts = num_experts
        self.top_k = top_k
        self.normalize_weights = normalize_weights
        self.softmax_after_top_k = softmax_after_top_k
        self.jitter_noise = float(jitter_noise)
        self.logit_noise_std = float(logit_noise_std)
        self.use_bias = check_bool("use_bias", use_bias)
        self.kernel_initializer = get_initializer(
            "kernel_initializer", kernel_initializer
        )
        self.bias_initializer = get_initializer(
            "bias_initializer", bias_initializer
        )
        self.kernel_regularizer = get_regularizer(
            "kernel_regularizer", kernel_regularizer
        )
        self.seed = check_optional_seed(seed)
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.supports_masking = True

    def _saved_seed_generators(self):
        # Saved with the kernel, so a restored router continues its noise.
        return [self.seed_generator]

    # Routers declare how they compare tokens, so SparseMoE can refuse the
    # ones that would let a causal model see the future.
    compares_tokens = False

    def build(self, input_shape):
        model_dim = input_shape[-1]
        if model_dim is None:
            raise ValueError(
                "TopKRouter needs a known last dimension (d_model). Received: "
                f"input_shape={input_shape}"
            )
        # `autocast=False` on the weights too: Keras opens an autocast scope
        # for a layer whose policy is mixed when it is called outside any
        # other layer (a router on its own, or from `SparseMoE.route`), and
        # would then read them rounded to the compute dtype.
        self.kernel = self.add_weight(
            name="kernel",
            shape=(model_dim, self.num_experts),
            initializer=self.kernel_initializer,
            regularizer=self.kernel_regularizer,
            dtype="float32",
            autocast=False,
        )
        if self.use_bias:
            self.bias = self.add_weight(
                name="bias",
                shape=(self.num_experts,),
                initializer=self.bias_initializer,
                dtype="float32",
                autocast=False,
            )
        else:
            self.bias = None

    def compute_logits(self, inputs, training=False):
        """float32 router logits `(..., E)` for tokens `(..., d_model)`."""
        inputs = ops.cast(inputs, "float32")
        if training and self.jitter_noise > 0:
            inputs = inputs * keras.random.uniform(
                ops.shape(inputs),
                minval=1.0 - self.jitter_noise,
                maxval=1.0 + self.jitter_noise,
                seed=self.seed_generator,
            )
        logits = ops.matmul(inputs, self.kernel)
        if self.bias is not None:
            logits = logits + self.bias
        if training and self.logit_noise_std > 0:
            logits = logits + self.logit_noise_std * keras.random.normal(
                ops.shape(logits), seed=self.seed_generator
            )
        return logits

    def call(self, inputs, mask=None, training=None):
        logits = self.compute_logits(inputs, training=training)  # (..., E)
        probs = ops.softmax(logits, axis=-1)
        if self.softmax_after_top_k:
            top_logits, expert_index = stable_top_k(logits, self.top_k)
            combine_weights = ops.softmax(top_logits, axis=-1)
        else:
            combine_weights, expert_index = stable_top_k(probs, self.top_k)
            if self.normalize_weights:
                combine_weights = combine_weights / ops.sum(
                    combine_weights, axis=-1, keepdims=True
                )
        return {
            "expert_index": expert_index,
            "combine_weights": combine_weights,
            "router_logits": logits,
            "router_probs": probs,
        }

    def compute_output_spec(self, inputs, mask=None, training=None):
        token_shape = tuple(inputs.shape[:-1])
        return {
            "expert_index": keras.KerasTensor(
                token_shape + (self.top_k,), dtype="int32"
            ),
            "combine_weights": keras.KerasTensor(
                token_shape + (self.top_k,), dtype="float32"
            ),
            "router_logits": keras.KerasTensor(
                token_shape + (self.num_experts,), dtype="float32"
            ),
            "router_probs": keras.KerasTensor(
                token_shape + (self.num_experts,), dtype="float32"
            ),
        }

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "top_k": self.top_k,
                "normalize_weights": self.normalize_weights,
                "softmax_after_top_k": self.softmax_after_top_k,
                "jitter_noise": self.jitter_noise,
                "logit_noise_std": self.logit_noise_std,
                "use_bias": self.use_bias,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "bias_initializer": keras.initializers.serialize(
                    self.bias_initializer
                ),
                "kernel_regularizer": keras.regularizers.serialize(
                    self.kernel_regularizer
                ),
                "seed": self.seed,
            }
        )
        # `autocast` is forced off in __init__; not a user choice.
        config.pop("autocast", None)
        return config
