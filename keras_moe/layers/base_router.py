"""BaseRouter: what every keras_moe router shares, and the router interface.

Not a router by itself: `TopKRouter`, `NoisyTopKRouter`, `BiasBalancedRouter`
and `ExpertChoiceRouter` build on it, and a user's own router may too.
"""

import keras
from keras import ops

from keras_moe._checks import check_bool
from keras_moe._checks import check_non_negative_float
from keras_moe._checks import check_optional_seed
from keras_moe._checks import check_positive_int
from keras_moe._checks import check_rate
from keras_moe._checks import get_initializer
from keras_moe._checks import get_regularizer
from keras_moe.layers._seed_state import SavesSeedStates

TOKEN_CHOICE = "token_choice"
EXPERT_CHOICE = "expert_choice"
ROUTING_TYPES = (TOKEN_CHOICE, EXPERT_CHOICE)


class BaseRouter(SavesSeedStates, keras.layers.Layer):
    """Base class of the routers: a float32 projection to one logit per expert.

    Holds what all routers share: the `(d_model, E)` float32 kernel (and
    optional bias), training-time input jitter and Gaussian logit noise, and
    the router interface that `SparseMoE` relies on.

    Router interface (what `SparseMoE` uses; any Keras layer that provides it
    can be passed as `SparseMoE(router=...)`):
    - attributes `num_experts` and `top_k`;
    - `call(inputs, mask=None, training=None)` on grouped tokens
      `(N, G, d_model)` (and `mask` `(N, G)`, false for padding), returning a
      dict. Token-choice routers return at least `"expert_index"` int32
      `(N, G, k)`, `"combine_weights"` float32 `(N, G, k)`,
      `"router_logits"` and `"router_probs"` float32 `(N, G, E)`.
      Expert-choice routers (`routing_type = "expert_choice"`) also take a
      `capacity` call argument and return `"token_index"`,
      `"combine_weights"` and `"kept"` `(N, E, C)` instead of the first two.
    - class attribute `routing_type`: `"token_choice"` (default) or
      `"expert_choice"`; it selects `SparseMoE`'s dispatch path.
    - class attribute `compares_tokens`: true when a token's routing
      depends on other tokens of its group (expert choice); `SparseMoE`
      refuses such routers with `causal=True`.
    - class attribute `default_load_balance_loss_weight`: the weight of
      `SparseMoE`'s Switch load-balancing loss when the layer's
      `load_balance_loss_weight` is None (0.0 for routers that balance by
      themselves or with their own losses).
    - `balancing_loss_weights`: dict `{name: weight}` of the router's own
      balancing losses, known at construction (names become routing
      statistics).
    - `balancing_losses(routing, mask)`: dict `{name: unweighted float32
      scalar}` with the same names, from a training call's output.
      `SparseMoE` adds `weight * loss` through `add_loss` for each weight
      > 0 and logs every one (also weight 0) in its routing statistics.
    - `update_balancing_state(routing, mask)`: called by `SparseMoE` once
      per training call, after routing; routers with state updated outside
      of gradient descent (the bias of `BiasBalancedRouter`) assign it here.

    Args:
        num_experts: int, number of experts E.
        top_k: int, `1 <= top_k <= num_experts`: experts per token
            (token choice), or average experts per token (expert choice).
        jitter_noise: float in [0, 1), multiplicative input jitter
            `Uniform(1 - eps, 1 + eps)` during training (Switch).
        logit_noise_std: float >= 0, std of Gaussian noise added to the
            logits during training.
        use_bias: bool, whether the projection has a bias.
        kernel_initializer: initializer for the `(d_model, E)` kernel.
        bias_initializer: initializer for the `(E,)` bias.
        kernel_regularizer: optional regularizer for the kernel.
        seed: optional int seed for the noise.
        **kwargs: base `Layer` arguments (`name`, `dtype`, ...).
    """

    # Routers declare how they compare tokens, so SparseMoE can refuse the
    # ones that would let a causal model see the future.
    compares_tokens = False
    routing_type = TOKEN_CHOICE
    default_load_balance_loss_weight = 1e-2

    def __init__(
        self,
        num_experts,
        top_k=2,
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
        check_rate("jitter_noise", jitter_noise)
        check_non_negative_float("logit_noise_std", logit_noise_std)
        self.num_experts = num_experts
        self.top_k = top_k
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

    # === Router interface defaults ===

    @property
    def balancing_loss_weights(self):
        """`{name: weight}` of the router's own balancing losses (none)."""
        return {}

    def balancing_losses(self, routing, mask=None):
        """`{name: unweighted float32 scalar}` for `balancing_loss_weights`."""
        return {}

    def update_balancing_state(self, routing, mask=None):
        """Updates non-gradient router state after a training call (none)."""
        return None

    # === Layer ===

    def build(self, input_shape):
        model_dim = input_shape[-1]
        if model_dim is None:
            raise ValueError(
                f"{type(self).__name__} needs a known last dimension "
                f"(d_model). Received: input_shape={input_shape}"
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
        # On `(tokens, d)`: XLA's CPU backend is ~2x slower on the weight
        # gradient of a 3-D activation times a 2-D kernel (see feed_forward).
        logits = ops.matmul(ops.reshape(inputs, (-1, inputs.shape[-1])), self.kernel)
        logits = ops.reshape(
            logits, tuple(ops.shape(inputs)[:-1]) + (self.num_experts,)
        )
        if self.bias is not None:
            logits = logits + self.bias
        if training and self.logit_noise_std > 0:
            logits = logits + self.logit_noise_std * keras.random.normal(
                ops.shape(logits), seed=self.seed_generator
            )
        return logits

    def compute_mask(self, inputs, previous_mask=None):
        # The outputs are routing decisions, not a sequence to mask further.
        return None

    def _token_choice_spec(self, inputs, **extra_per_expert):
        """Output spec of a token-choice router, plus `(..., E)` extras."""
        token_shape = tuple(inputs.shape[:-1])

        def spec(last, dtype="float32"):
            return keras.KerasTensor(token_shape + (last,), dtype=dtype)

        result = {
            "expert_index": spec(self.top_k, "int32"),
            "combine_weights": spec(self.top_k),
            "router_logits": spec(self.num_experts),
            "router_probs": spec(self.num_experts),
        }
        for name in extra_per_expert:
            result[name] = spec(self.num_experts)
        return result

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "top_k": self.top_k,
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
