"""NoisyTopKRouter: Shazeer et al.'s noisy top-k gating with its two losses."""

import keras
from keras import ops

from keras_moe import losses
from keras_moe._checks import check_non_negative_float
from keras_moe.api_export import keras_moe_export
from keras_moe.layers.top_k_router import TopKRouter

LEARNED = "learned"


@keras_moe_export
class NoisyTopKRouter(TopKRouter):
    """Noisy top-k gating with importance and load losses (Shazeer et al.).

    In training, Gaussian noise is added to the router logits before the
    top-k selection, `H(x) = x W_g + noise_std(x) * Normal(0, 1)`, which
    spreads tokens over experts and gives the load loss a gradient. The
    noise scale is either learned per token and expert,
    `noise_std(x) = softplus(x W_noise) + 0.01` (Shazeer et al.; `W_noise`
    starts at zero), or a fixed float (V-MoE uses `1 / num_experts`). At
    inference there is no noise.

    The router declares two balancing losses (see `BaseRouter`), which
    `SparseMoE` adds with their weights and logs as routing statistics:
    - `"importance_loss"`: `CV(sum_t G(x_t))^2`, the squared coefficient of
      variation of each expert's summed gate values (combine weights);
    - `"load_loss"`: `CV(Load)^2`, where `Load_i = sum_t P(x_t, i)` and
      `P(x, i) = Phi((clean_i(x) - kth_excluding_i(H(x))) / noise_std_i(x))`
      is the probability that expert i stays in the top k when its noise is
      drawn again (`losses.noisy_top_k_expected_load`).
    Because of these, `SparseMoE` adds no Switch load-balancing loss for
    this router unless its `load_balance_loss_weight` is set explicitly.

    Combine weights as in `TopKRouter`: softmax over all experts then top k
    (V-MoE), optionally renormalised; `softmax_after_top_k=True` gives
    Shazeer et al.'s `G(x) = softmax(KeepTopK(H(x), k))`.

    Args:
        num_experts: int, number of experts E.
        top_k: int, experts per token, `1 <= top_k <= num_experts`.
        noise_std: `"learned"` (default) or a float > 0, the fixed std.
        importance_loss_weight: float >= 0, weight of the importance loss
            (0: logged, not added).
        load_loss_weight: float >= 0, weight of the load loss (0: logged,
            not added).
        normalize_weights: bool, as in `TopKRouter`.
        softmax_after_top_k: bool, as in `TopKRouter`.
        jitter_noise: float in [0, 1), multiplicative input jitter.
        use_bias: bool, whether the gate projection has a bias.
        kernel_initializer: initializer for the `(d_model, E)` gate kernel.
        noise_kernel_initializer: initializer for the `(d_model, E)` noise
            kernel (learned noise only; default zeros, as in the paper).
        bias_initializer: initializer for the `(E,)` bias.
        kernel_regularizer: optional regularizer for the gate kernel.
        seed: optional int seed for the noise.
        **kwargs: base `Layer` arguments.

    Call arguments:
        inputs: `(..., d_model)` tokens.
        mask: optional bool `(...)`, unused by the routing itself.
        training: bool, enables the noise.

    Returns:
        `TopKRouter`'s dict (`"router_logits"` are the noisy logits in
        training), plus `"clean_logits"` and `"noise_std"`, float32
        `(..., E)`.

    Example:

    >>> router = NoisyTopKRouter(num_experts=4, top_k=2)
    >>> routing = router(np.ones((3, 8), "float32"), training=True)
    >>> sorted(router.balancing_losses(routing))
    ['importance_loss', 'load_loss']

    References:
        - Shazeer et al., 2017, "Outrageously Large Neural Networks: The
          Sparsely-Gated Mixture-of-Experts Layer", section 2.1 and
          appendix A.
        - Riquelme et al., 2021, "Scaling Vision with Sparse Mixture of
          Experts" (V-MoE), appendix A.
    """

    default_load_balance_loss_weight = 0.0

    def __init__(
        self,
        num_experts,
        top_k=2,
        noise_std=LEARNED,
        importance_loss_weight=1e-2,
        load_loss_weight=1e-2,
        normalize_weights=False,
        softmax_after_top_k=False,
        jitter_noise=0.0,
        use_bias=False,
        kernel_initializer="glorot_uniform",
        noise_kernel_initializer="zeros",
        bias_initializer="zeros",
        kernel_regularizer=None,
        seed=None,
        **kwargs,
    ):
        # The base class' fixed logit noise is replaced by this router's.
        kwargs.pop("logit_noise_std", None)
        super().__init__(
            num_experts=num_experts,
            top_k=top_k,
            normalize_weights=normalize_weights,
            softmax_after_top_k=softmax_after_top_k,
            jitter_noise=jitter_noise,
            logit_noise_std=0.0,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            seed=seed,
            **kwargs,
        )
        if noise_std != LEARNED and (
            isinstance(noise_std, bool)
            or not isinstance(noise_std, (int, float))
            or not noise_std > 0
        ):
            raise ValueError(
                "Received an invalid value for `noise_std`, expected "
                "'learned' or a float > 0. Received: "
                f"noise_std={noise_std!r}"
            )
        check_non_negative_float(
            "importance_loss_weight", importance_loss_weight
        )
        check_non_negative_float("load_loss_weight", load_loss_weight)
        self.noise_std = noise_std if noise_std == LEARNED else float(noise_std)
        self.importance_loss_weight = float(importance_loss_weight)
        self.load_loss_weight = float(load_loss_weight)
        self.noise_kernel_initializer = keras.initializers.get(
            noise_kernel_initializer
        )

    def build(self, input_shape):
        super().build(input_shape)
        if self.noise_std == LEARNED:
            self.noise_kernel = self.add_weight(
                name="noise_kernel",
                shape=(input_shape[-1], self.num_experts),
                initializer=self.noise_kernel_initializer,
                dtype="float32",
            )
        else:
            self.noise_kernel = None

    def compute_noise_std(self, inputs):
        """float32 noise std `(..., E)` (or a scalar when fixed)."""
        if self.noise_kernel is None:
            return ops.convert_to_tensor(self.noise_std, "float32")
        inputs = ops.cast(inputs, "float32")
        # Shazeer et al.'s implementation adds 0.01 so the std never
        # vanishes, which would make the load's normal CDF a step.
        return ops.softplus(ops.matmul(inputs, self.noise_kernel)) + 1e-2

    def call(self, inputs, mask=None, training=None):
        clean_logits = self.compute_logits(inputs, training=training)
        noise_std = self.compute_noise_std(inputs)  # (..., E) or ()
        if training:
            noisy_logits = clean_logits + noise_std * keras.random.normal(
                ops.shape(clean_logits), seed=self.seed_generator
            )
        else:
            noisy_logits = clean_logits
        combine_weights, expert_index, probs = self.select(noisy_logits)
        return {
            "expert_index": expert_index,
            "combine_weights": combine_weights,
            "router_logits": noisy_logits,
            "router_probs": probs,
            "clean_logits": clean_logits,
            "noise_std": ops.broadcast_to(noise_std, ops.shape(clean_logits)),
        }

    def compute_output_spec(self, inputs, mask=None, training=None):
        return self._token_choice_spec(
            inputs, clean_logits=None, noise_std=None
        )

    @property
    def balancing_loss_weights(self):
        return {
            "importance_loss": self.importance_loss_weight,
            "load_loss": self.load_loss_weight,
        }

    def balancing_losses(self, routing, mask=None):
        expert_index = routing["expert_index"]  # (..., k)
        # Gate values over all experts: the combine weights at the chosen
        # experts, 0 elsewhere. (..., k, E) summed over k -> (..., E).
        gates = ops.sum(
            ops.one_hot(expert_index, self.num_experts)
            * ops.expand_dims(routing["combine_weights"], -1),
            axis=-2,
        )
        return {
            "importance_loss": losses.importance_loss(gates, mask),
            "load_loss": losses.noisy_top_k_load_loss(
                routing["clean_logits"],
                routing["router_logits"],
                routing["noise_std"],
                expert_index,
                mask,
            ),
        }

    def get_config(self):
        config = super().get_config()
        config.pop("logit_noise_std")
        config.update(
            {
                "noise_std": self.noise_std,
                "importance_loss_weight": self.importance_loss_weight,
                "load_loss_weight": self.load_loss_weight,
                "noise_kernel_initializer": keras.initializers.serialize(
                    self.noise_kernel_initializer
                ),
            }
        )
        return config
