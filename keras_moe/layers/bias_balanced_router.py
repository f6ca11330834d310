"""BiasBalancedRouter: DeepSeek-V3's auxiliary-loss-free load balancing."""

from keras import ops

from keras_moe import losses
from keras_moe._checks import check_non_negative_float
from keras_moe.api_export import keras_moe_export
from keras_moe.layers.base_router import BaseRouter
from keras_moe.routing.bias_balancing import biased_top_k
from keras_moe.routing.bias_balancing import update_expert_bias

SCORE_FUNCTIONS = ("sigmoid", "softmax")


@keras_moe_export
class BiasBalancedRouter(BaseRouter):
    """Top-k router balanced by a per-expert bias instead of a loss.

    DeepSeek-V3's auxiliary-loss-free balancing: each expert has a bias
    `b_i` that is added to its score for the top-k *selection* only,
    `index = top_k(s + b)`; the combine weights come from the scores `s`
    without the bias. After every training call the bias moves against the
    load the call observed,

        b_i <- b_i + bias_update_rate * sign(mean_load - load_i),

    with `load_i` the number of (valid) token assignments expert i received
    and `mean_load` their mean over experts. The bias is a non-trainable
    float32 variable (`expert_bias`), saved with the model, and updated
    through `update_balancing_state`, which `SparseMoE` calls once per
    training call: the update works inside `model.fit` under JAX's jit as
    well as on TensorFlow and PyTorch, and never runs at inference. Because
    the balancing needs no loss, `SparseMoE` adds no Switch
    load-balancing loss for this router unless its
    `load_balance_loss_weight` is set explicitly.

    Scores `s` are `sigmoid(logits)` (DeepSeek-V3) or `softmax(logits)`.
    Combine weights are the selected scores, renormalised to sum to 1 when
    `normalize_weights=True` (DeepSeek-V3 does so for sigmoid scores), then
    multiplied by `routed_scaling_factor` (2.5 in DeepSeek-V3).

    An optional complementary sequence-wise balance loss (DeepSeek-V3 eq.
    17-20, `losses.sequence_balance_loss`) is declared as the balancing loss
    `"sequence_balance_loss"`; with `sequence_balance_loss_weight=0` it is
    only logged. It is computed per routing group, so inside `SparseMoE`
    set `group_size` to the sequence length to make it sequence-wise.

    Args:
        num_experts: int, number of experts E.
        top_k: int, experts per token, `1 <= top_k <= num_experts`.
        score_function: `"sigmoid"` (default) or `"softmax"`.
        bias_update_rate: float >= 0, gamma (DeepSeek-V3: 0.001 for most of
            pre-training, 0 at the end). 0 freezes the bias.
        normalize_weights: bool, renormalise the k weights to sum to 1.
        routed_scaling_factor: float > 0, multiplies the combine weights.
        sequence_balance_loss_weight: float >= 0, weight of the
            sequence-wise balance loss (DeepSeek-V3: 0.0001).
        jitter_noise: float in [0, 1), multiplicative input jitter.
        logit_noise_std: float >= 0, Gaussian logit noise in training.
        use_bias: bool, a trainable bias in the projection (unrelated to
            the balancing bias, which is never trained by gradients).
        kernel_initializer: initializer for the `(d_model, E)` kernel.
        bias_initializer: initializer for the projection's `(E,)` bias.
        kernel_regularizer: optional regularizer for the kernel.
        seed: optional int seed for the noise.
        **kwargs: base `Layer` arguments.

    Call arguments:
        inputs: `(..., d_model)` tokens.
        mask: optional bool `(...)`, unused by the routing itself.
        training: bool, enables the noise.

    Returns:
        A dict with `"expert_index"` int32 `(..., k)`, `"combine_weights"`
        float32 `(..., k)`, `"router_logits"` `(..., E)`, `"router_scores"`
        `(..., E)` (the scores `s`) and `"router_probs"` `(..., E)` (the
        scores normalised to sum to 1 over the experts).

    Example:

    >>> router = BiasBalancedRouter(num_experts=4, top_k=2)
    >>> routing = router(np.ones((3, 8), "float32"))
    >>> router.update_balancing_state(routing)
    >>> router.expert_bias.shape
    (4,)

    References:
        - DeepSeek-AI, 2024, "DeepSeek-V3 Technical Report", section 2.1.2.
        - Wang et al., 2024, "Auxiliary-Loss-Free Load Balancing Strategy
          for Mixture-of-Experts".
    """

    default_load_balance_loss_weight = 0.0

    def __init__(
        self,
        num_experts,
        top_k=2,
        score_function="sigmoid",
        bias_update_rate=1e-3,
        normalize_weights=True,
        routed_scaling_factor=1.0,
        sequence_balance_loss_weight=0.0,
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
        if score_function not in SCORE_FUNCTIONS:
            raise ValueError(
                "Received an invalid value for `score_function`, expected "
                f"one of {SCORE_FUNCTIONS}. Received: "
                f"score_function={score_function!r}"
            )
        check_non_negative_float("bias_update_rate", bias_update_rate)
        if (
            isinstance(routed_scaling_factor, bool)
            or not isinstance(routed_scaling_factor, (int, float))
            or not routed_scaling_factor > 0
        ):
            raise ValueError(
                "Received an invalid value for `routed_scaling_factor`, "
                "expected a float > 0. Received: "
                f"routed_scaling_factor={routed_scaling_factor!r}"
            )
        check_non_negative_float(
            "sequence_balance_loss_weight", sequence_balance_loss_weight
        )
        self.score_function = score_function
        self.bias_update_rate = float(bias_update_rate)
        self.normalize_weights = bool(normalize_weights)
        self.routed_scaling_factor = float(routed_scaling_factor)
        self.sequence_balance_loss_weight = float(sequence_balance_loss_weight)

    def build(self, input_shape):
        super().build(input_shape)
        # Selection-only bias, moved by `update_balancing_state`, never by
        # gradients. float32 whatever the dtype policy.
        self.expert_bias = self.add_weight(
            name="expert_bias",
            shape=(self.num_experts,),
            initializer="zeros",
            trainable=False,
            dtype="float32",
            autocast=False,
        )

    def call(self, inputs, mask=None, training=None):
        logits = self.compute_logits(inputs, training=training)  # (..., E)
        if self.score_function == "sigmoid":
            scores = ops.sigmoid(logits)
            # Ratios of sigmoids as softmaxes of their logarithms: when all
            # of a token's logits are below about -104 its float32 sigmoids
            # are all 0, and `scores / sum(scores)` would be 0 / 0 = NaN.
            log_scores = ops.log_sigmoid(logits)
            probs = ops.softmax(log_scores, axis=-1)
        else:
            scores = ops.softmax(logits, axis=-1)
            probs = scores
        bias = ops.stop_gradient(ops.convert_to_tensor(self.expert_bias))
        weights, expert_index = biased_top_k(scores, bias, self.top_k)
        if self.normalize_weights and self.score_function == "sigmoid":
            # The selected scores over their sum, (..., k), as above.
            weights = ops.softmax(
                ops.take_along_axis(log_scores, expert_index, axis=-1), axis=-1
            )
        elif self.normalize_weights:
            # Softmax scores: the top one is at least 1 / E, no 0 / 0.
            weights = weights / ops.sum(weights, axis=-1, keepdims=True)
        weights = weights * self.routed_scaling_factor
        return {
            "expert_index": expert_index,
            "combine_weights": weights,
            "router_logits": logits,
            "router_probs": probs,
            "router_scores": scores,
        }

    def compute_output_spec(self, inputs, mask=None, training=None):
        return self._token_choice_spec(inputs, router_scores=None)

    @property
    def balancing_loss_weights(self):
        return {"sequence_balance_loss": self.sequence_balance_loss_weight}

    def balancing_losses(self, routing, mask=None):
        # The loss normalises the scores over the experts; "router_probs"
        # are those normalised scores already, computed stably. Normalising
        # the raw sigmoids again would divide by a sum that underflows to 0
        # (logits below about -104), a NaN gradient under XLA.
        scores = routing["router_probs"]
        expert_index = routing["expert_index"]
        if len(scores.shape) == 2:  # One sequence of tokens (T, E).
            scores, expert_index = scores[None], expert_index[None]
            mask = None if mask is None else ops.reshape(mask, (1, -1))
        return {
            "sequence_balance_loss": losses.sequence_balance_loss(
                scores, expert_index, mask
            )
        }

    def update_balancing_state(self, routing, mask=None):
        """Moves `expert_bias` against this call's expert loads.

        Args:
            routing: this router's output dict for a training call.
            mask: optional bool over the token axes, false for padding.
        """
        counts = ops.stop_gradient(
            losses.expert_assignment_counts(
                routing["expert_index"], self.num_experts, mask
            )
        )  # (E,)
        self.expert_bias.assign(
            update_expert_bias(self.expert_bias, counts, self.bias_update_rate)
        )

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "score_function": self.score_function,
                "bias_update_rate": self.bias_update_rate,
                "normalize_weights": self.normalize_weights,
                "routed_scaling_factor": self.routed_scaling_factor,
                "sequence_balance_loss_weight": (
                    self.sequence_balance_loss_weight
                ),
            }
        )
        return config
