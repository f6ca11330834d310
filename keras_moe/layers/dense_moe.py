"""DenseMoE: the classic dense mixture of experts (Jacobs et al., 1991)."""

import keras
from keras import ops

from keras_moe._checks import check_positive_int
from keras_moe._checks import check_rate
from keras_moe.api_export import keras_moe_export
from keras_moe.layers.expert_ffn import ExpertFFN
from keras_moe.layers.top_k_router import TopKRouter


@keras_moe_export
class DenseMoE(keras.layers.Layer):
    """Dense mixture of experts: every expert on every token, softmax-gated.

    `y(x) = sum_e g_e(x) * expert_e(x)` with `g(x) = softmax(x W_g)` over
    all E experts (Jacobs et al., 1991). Every expert runs on every token,
    so compute grows with E (unlike `SparseMoE`); nothing is dropped and
    there is no capacity, routing group or balancing loss. Useful as the
    baseline that sparse routing approximates, and for small E.

    The same function as `SparseMoE(top_k=num_experts, capacity_factor=None,
    eval_capacity_factor=None, load_balance_loss_weight=0)` with the same
    weights (a test checks it), computed without any dispatch: the experts
    see `(E, T, d)` copies of the tokens and the outputs are summed with the
    gates in a fixed order. The gate is a `TopKRouter` sublayer (float32
    kernel `router.kernel`, input jitter and logit noise options) of which
    only the logits are used. Jacobs et al.'s competitive training
    objective is a loss on the model output, not part of this layer.

    Args:
        num_experts: int, number of experts E.
        intermediate_dim: int, hidden width of each expert.
        activation: expert activation name or callable (default `"gelu"`).
        gated: bool, gated (GLU) experts (`"silu"` gives SwiGLU).
        use_bias: bool, biases in the experts.
        expert_dropout: float in [0, 1), dropout inside the experts.
        router_jitter_noise: float in [0, 1), multiplicative input jitter
            of the gate in training.
        kernel_initializer: initializer of the expert kernels (per-expert
            fans).
        bias_initializer: initializer of the expert biases.
        kernel_regularizer: optional regularizer of the expert kernels.
        bias_regularizer: optional regularizer of the expert biases.
        seed: optional int seed for dropout and jitter.
        **kwargs: base `Layer` arguments.

    Call arguments:
        inputs: `(batch, ..., d_model)`.
        mask: optional bool `(batch, ...)`, false for padding (outputs
            zeros).
        training: bool.

    Returns:
        `(batch, ..., d_model)`.

    Example:

    >>> moe = DenseMoE(num_experts=4, intermediate_dim=16)
    >>> moe(np.ones((2, 5, 8), "float32")).shape
    (2, 5, 8)

    Reference:
        Jacobs, Jordan, Nowlan and Hinton, 1991, "Adaptive Mixtures of Local
        Experts".
    """

    def __init__(
        self,
        num_experts,
        intermediate_dim,
        activation="gelu",
        gated=False,
        use_bias=True,
        expert_dropout=0.0,
        router_jitter_noise=0.0,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_positive_int("num_experts", num_experts)
        check_positive_int("intermediate_dim", intermediate_dim)
        check_rate("expert_dropout", expert_dropout)
        check_rate("router_jitter_noise", router_jitter_noise)
        self.num_experts = num_experts
        self.intermediate_dim = intermediate_dim
        self.expert_dropout = float(expert_dropout)
        self.router_jitter_noise = float(router_jitter_noise)
        self.seed = seed
        self.supports_masking = True

        # === Layers ===
        self.router = TopKRouter(
            num_experts=num_experts,
            top_k=num_experts,
            jitter_noise=router_jitter_noise,
            seed=seed,
            dtype=self.dtype_policy,
            name="router",
        )
        self.experts = ExpertFFN(
            num_experts=num_experts,
            intermediate_dim=intermediate_dim,
            activation=activation,
            gated=gated,
            use_bias=use_bias,
            dropout=expert_dropout,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            seed=seed,
            dtype=self.dtype_policy,
            name="experts",
        )

    def build(self, input_shape):
        model_dim = input_shape[-1]
        if len(input_shape) < 2 or model_dim is None:
            raise ValueError(
                "DenseMoE expects inputs (batch, ..., d_model) with a known "
                f"d_model. Received: input_shape={tuple(input_shape)}"
            )
        self.model_dim = model_dim
        self.router.build((None, model_dim))
        self.experts.build((self.num_experts, None, model_dim))

    def gates(self, inputs, training=False):
        """float32 gate values `(batch, ..., E)`, softmax over experts."""
        logits = self.router.compute_logits(inputs, training=training)
        return ops.softmax(logits, axis=-1)

    def call(self, inputs, mask=None, training=None):
        tokens = ops.reshape(inputs, (-1, self.model_dim))  # (T, d)
        gates = self.gates(tokens, training=training)  # (T, E) float32
        if mask is not None:
            gates = gates * ops.cast(ops.reshape(mask, (-1, 1)), gates.dtype)
        # Every expert on every token: (E, T, d) -> (E, T, d).
        expert_inputs = ops.broadcast_to(
            ops.expand_dims(tokens, 0),
            (self.num_experts,) + tuple(ops.shape(tokens)),
        )
        expert_outputs = self.experts(expert_inputs, training=training)
        weights = ops.cast(ops.transpose(gates), expert_outputs.dtype)
        # sum_e g[t, e] * y[e, t]: a fixed-shape reduction over E.
        outputs = ops.sum(
            expert_outputs * ops.expand_dims(weights, -1), axis=0
        )  # (T, d)
        return ops.reshape(outputs, ops.shape(inputs))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "intermediate_dim": self.intermediate_dim,
                **self.experts.options_config(),
                "expert_dropout": self.expert_dropout,
                "router_jitter_noise": self.router_jitter_noise,
                "seed": self.seed,
            }
        )
        return config
