"""TopKRouter: the token-choice gating network."""

from keras import ops

from keras_moe.api_export import keras_moe_export
from keras_moe.layers.base_router import BaseRouter
from keras_moe.routing.top_k import stable_top_k


@keras_moe_export
class TopKRouter(BaseRouter):
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

    Follows the router interface described in `BaseRouter` (no balancing
    losses of its own: `SparseMoE` adds the Switch load-balancing loss).
    Sibling routers behind the same interface: `NoisyTopKRouter` (learned
    noise, importance and load losses), `BiasBalancedRouter`
    (auxiliary-loss-free balancing) and `ExpertChoiceRouter`.

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
        super().__init__(
            num_experts=num_experts,
            top_k=top_k,
            jitter_noise=jitter_noise,
            logit_noise_std=logit_noise_std,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            seed=seed,
            **kwargs,
        )
        if normalize_weights and softmax_after_top_k:
            raise ValueError(
                "`normalize_weights=True` cannot be combined with "
                "`softmax_after_top_k=True`: a softmax over the k selected "
                "logits already sums to 1. Received: normalize_weights=True, "
                "softmax_after_top_k=True"
            )
        self.normalize_weights = bool(normalize_weights)
        self.softmax_after_top_k = bool(softmax_after_top_k)

    def select(self, logits):
        """Top-k selection from logits `(..., E)`.

        Returns:
            `(combine_weights, expert_index, router_probs)`, float32
            `(..., k)`, int32 `(..., k)` and float32 `(..., E)`.
        """
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
        return combine_weights, expert_index, probs

    def call(self, inputs, mask=None, training=None):
        logits = self.compute_logits(inputs, training=training)  # (..., E)
        combine_weights, expert_index, probs = self.select(logits)
        return {
            "expert_index": expert_index,
            "combine_weights": combine_weights,
            "router_logits": logits,
            "router_probs": probs,
        }

    def compute_output_spec(self, inputs, mask=None, training=None):
        return self._token_choice_spec(inputs)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "normalize_weights": self.normalize_weights,
                "softmax_after_top_k": self.softmax_after_top_k,
            }
        )
        return config
