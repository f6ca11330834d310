"""ExpertChoiceRouter: every expert picks its top-C tokens (Zhou et al.)."""

import keras
from keras import ops

from keras_moe.api_export import keras_moe_export
from keras_moe.layers.base_router import EXPERT_CHOICE
from keras_moe.layers.base_router import BaseRouter
from keras_moe.routing import expert_choice
from keras_moe.routing.dispatch import compute_capacity


@keras_moe_export
class ExpertChoiceRouter(BaseRouter):
    """Expert-choice router: each expert takes its top-C tokens of a group.

    Router probabilities are a softmax over the experts (float32), as for
    token choice; then, per routing group, every expert takes the C tokens
    with the highest probability for it and weights each by that
    probability (`routing.expert_choice.select_tokens`). Each expert
    processes exactly C tokens, so the load is balanced by construction and
    no balancing loss is needed (`SparseMoE` adds no Switch loss for this
    router unless its `load_balance_loss_weight` is set explicitly). A token
    may be taken by several experts or by none.

    `top_k` is the average number of experts per token, `c` in the paper:
    `SparseMoE` uses `C = compute_capacity(G, E, top_k, capacity_factor)`,
    i.e. `C = ceil(capacity_factor * G * top_k / E)` (at most G; dropless
    `capacity_factor=None` gives `C = G`, every expert on every token).

    An expert's choice depends on every token of the group, later ones
    included: the router declares `compares_tokens = True`, and
    `SparseMoE(causal=True)` refuses it.

    Args:
        num_experts: int, number of experts E.
        top_k: int, average experts per token (the capacity's multiplier),
            `1 <= top_k <= num_experts`.
        jitter_noise: float in [0, 1), multiplicative input jitter.
        logit_noise_std: float >= 0, Gaussian logit noise in training.
        use_bias: bool, whether the projection has a bias.
        kernel_initializer: initializer for the `(d_model, E)` kernel.
        bias_initializer: initializer for the `(E,)` bias.
        kernel_regularizer: optional regularizer for the kernel.
        seed: optional int seed for the noise.
        **kwargs: base `Layer` arguments.

    Call arguments:
        inputs: `(N, G, d_model)`, N routing groups of G tokens.
        mask: optional bool `(N, G)`, false for padding, which no expert
            takes while a valid token is left.
        training: bool, enables the noise.
        capacity: optional int C, tokens per expert and group
            (`1 <= C <= G`); default `compute_capacity(G, E, top_k, 1.0, 1)`.

    Returns:
        A dict with `"token_index"` int32 `(N, E, C)`, `"combine_weights"`
        float32 `(N, E, C)` (0 where not kept), `"kept"` bool `(N, E, C)`,
        `"router_logits"` and `"router_probs"` float32 `(N, G, E)`.

    Example:

    >>> router = ExpertChoiceRouter(num_experts=4, top_k=1)
    >>> routing = router(np.ones((2, 8, 16), "float32"), capacity=3)
    >>> routing["token_index"].shape
    (2, 4, 3)

    Reference:
        Zhou et al., 2022, "Mixture-of-Experts with Expert Choice Routing".
    """

    compares_tokens = True
    routing_type = EXPERT_CHOICE
    default_load_balance_loss_weight = 0.0

    def _check_grouped(self, shape):
        if len(shape) != 3:
            raise ValueError(
                "ExpertChoiceRouter expects grouped tokens of shape "
                "(groups, group_size, d_model). Received: "
                f"inputs.shape={tuple(shape)}"
            )

    def build(self, input_shape):
        self._check_grouped(input_shape)
        super().build(input_shape)

    def _capacity(self, group_size, capacity):
        if capacity is None:
            return compute_capacity(
                group_size, self.num_experts, self.top_k, 1.0, 1
            )
        if isinstance(capacity, int) and isinstance(group_size, int):
            if not 1 <= capacity <= group_size:
                raise ValueError(
                    "Received an invalid value for `capacity`, expected "
                    f"1 <= capacity <= group_size={group_size}. Received: "
                    f"capacity={capacity}"
                )
        return capacity

    def call(self, inputs, mask=None, training=None, capacity=None):
        self._check_grouped(inputs.shape)
        logits = self.compute_logits(inputs, training=training)  # (N, G, E)
        probs = ops.softmax(logits, axis=-1)
        num_groups, group_size = ops.shape(inputs)[0], ops.shape(inputs)[1]
        if mask is None:
            valid = ops.ones((num_groups, group_size), dtype="bool")
        else:
            valid = ops.cast(mask, "bool")
        plan = expert_choice.select_tokens(
            probs, valid, self._capacity(group_size, capacity)
        )
        return {
            "token_index": plan.token_index,
            "combine_weights": plan.combine_weights,
            "kept": plan.kept,
            "router_logits": logits,
            "router_probs": probs,
        }

    def compute_output_spec(
        self, inputs, mask=None, training=None, capacity=None
    ):
        self._check_grouped(inputs.shape)
        num_groups, group_size = inputs.shape[0], inputs.shape[1]
        if capacity is None and group_size is not None:
            capacity = self._capacity(group_size, None)
        if not isinstance(capacity, int):
            capacity = None
        slots = (num_groups, self.num_experts, capacity)
        per_token = (num_groups, group_size, self.num_experts)
        return {
            "token_index": keras.KerasTensor(slots, dtype="int32"),
            "combine_weights": keras.KerasTensor(slots, dtype="float32"),
            "kept": keras.KerasTensor(slots, dtype="bool"),
            "router_logits": keras.KerasTensor(per_token, dtype="float32"),
            "router_probs": keras.KerasTensor(per_token, dtype="float32"),
        }
