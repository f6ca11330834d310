"""SoftMoE: slots as learned soft combinations of tokens (Puigcerver et al.)."""

import keras
from keras import ops

from keras_moe._checks import check_positive_int
from keras_moe._checks import check_rate
from keras_moe.api_export import keras_moe_export
from keras_moe.layers.expert_ffn import ExpertFFN


def _l2_normalize(x, axis):
    squared_norm = ops.sum(ops.square(x), axis=axis, keepdims=True)
    return x * ops.rsqrt(squared_norm + 1e-6)


@keras_moe_export
class SoftMoE(keras.layers.Layer):
    """Soft Mixture of Experts: every expert processes soft slots.

    For each sequence `X` `(m, d)` of m tokens, learned slot parameters
    `Phi` `(d, E * S)` give logits `X Phi` `(m, E * S)`. Each of the
    `E * S` slots is a convex combination of the sequence's tokens (the
    *dispatch* weights, a softmax over the tokens), expert e processes its
    S slots, and each token's output is a convex combination of all slot
    outputs (the *combine* weights, a softmax over the slots):

        slots   = softmax_tokens(X Phi)^T X              (E * S, d)
        outputs = softmax_slots(X Phi) expert(slots)      (m, d)

    Fully differentiable, no token dropping, no balancing loss, every expert
    the same amount of work (S slots per sequence). Compute is that of
    `E * S` tokens per sequence whatever m. Softmaxes run in float32.

    Slots mix all tokens of a sequence, later ones included, so Soft MoE is
    not causal: the layer declares `compares_tokens = True` (like
    expert-choice routers) for model builders to refuse it in
    autoregressive models.

    With `normalize=True`, tokens and the columns of `Phi` are
    L2-normalised and the logits multiplied by a learned scalar `scale`
    (initialised to 1), which the paper recommends for large `d_model`.

    Args:
        num_experts: int, number of experts E.
        intermediate_dim: int, hidden width of each expert.
        slots_per_expert: int S >= 1.
        activation: expert activation name or callable (default `"gelu"`).
        gated: bool, gated (GLU) experts.
        use_bias: bool, biases in the experts.
        expert_dropout: float in [0, 1), dropout inside the experts.
        normalize: bool, L2-normalise tokens and `Phi` (see above).
        slot_initializer: initializer of `Phi` (default `"lecun_normal"`).
        kernel_initializer: initializer of the expert kernels.
        bias_initializer: initializer of the expert biases.
        kernel_regularizer: optional regularizer of the expert kernels.
        bias_regularizer: optional regularizer of the expert biases.
        seed: optional int seed for the dropout.
        **kwargs: base `Layer` arguments.

    Call arguments:
        inputs: `(batch, tokens..., d_model)`, rank >= 3; the token axes
            (e.g. `(height, width)` of image patches) form one sequence per
            example.
        mask: optional bool `(batch, tokens...)`, false for padding, which
            is left out of every slot and outputs zeros.
        training: bool.

    Returns:
        `(batch, tokens..., d_model)`.

    Example:

    >>> moe = SoftMoE(num_experts=4, intermediate_dim=16, slots_per_expert=2)
    >>> moe(np.ones((2, 10, 8), "float32")).shape
    (2, 10, 8)

    Reference:
        Puigcerver, Riquelme, Mustafa and Houlsby, 2023, "From Sparse to
        Soft Mixtures of Experts".
    """

    compares_tokens = True

    def __init__(
        self,
        num_experts,
        intermediate_dim,
        slots_per_expert=1,
        activation="gelu",
        gated=False,
        use_bias=True,
        expert_dropout=0.0,
        normalize=False,
        slot_initializer="lecun_normal",
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
        check_positive_int("slots_per_expert", slots_per_expert)
        check_rate("expert_dropout", expert_dropout)
        self.num_experts = num_experts
        self.intermediate_dim = intermediate_dim
        self.slots_per_expert = slots_per_expert
        self.expert_dropout = float(expert_dropout)
        self.normalize = bool(normalize)
        self.slot_initializer = keras.initializers.get(slot_initializer)
        self.seed = seed
        self.supports_masking = True

        # === Layers ===
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

    @property
    def num_slots(self):
        return self.num_experts * self.slots_per_expert

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) < 3 or input_shape[-1] is None:
            raise ValueError(
                "SoftMoE expects inputs (batch, tokens..., d_model) of rank "
                ">= 3 with a known d_model: slots combine the tokens of each "
                f"example. Received: input_shape={input_shape}"
            )
        self.model_dim = input_shape[-1]
        # float32 whatever the policy, like the routers.
        self.slot_kernel = self.add_weight(
            name="slot_kernel",
            shape=(self.model_dim, self.num_slots),
            initializer=self.slot_initializer,
            dtype="float32",
            autocast=False,
        )
        if self.normalize:
            self.scale = self.add_weight(
                name="scale",
                shape=(),
                initializer="ones",
                dtype="float32",
                autocast=False,
            )
        else:
            self.scale = None
        self.experts.build((self.num_experts, None, self.model_dim))

    def slot_logits(self, tokens):
        """float32 logits `(batch, m, E * S)` for tokens `(batch, m, d)`."""
        tokens = ops.cast(tokens, "float32")
        kernel = ops.convert_to_tensor(self.slot_kernel)
        if self.normalize:
            tokens = _l2_normalize(tokens, axis=-1)
            kernel = self.scale * _l2_normalize(kernel, axis=0)
        return ops.matmul(tokens, kernel)

    def call(self, inputs, mask=None, training=None):
        batch = ops.shape(inputs)[0]
        tokens = ops.reshape(inputs, (batch, -1, self.model_dim))  # (B, m, d)
        logits = self.slot_logits(tokens)  # (B, m, n), n = E * S
        if mask is not None:
            valid = ops.reshape(ops.cast(mask, "bool"), (batch, -1, 1))
            tokens = ops.where(valid, tokens, ops.zeros_like(tokens))
            # Padding gets no dispatch weight (finite, so a fully padded
            # sequence gives zero slots rather than NaN).
            dispatch_logits = ops.where(valid, logits, -1e9)
        else:
            dispatch_logits = logits
        dispatch = ops.softmax(dispatch_logits, axis=1)  # over tokens
        combine = ops.softmax(logits, axis=2)  # over slots
        # Slots: (B, n, m) @ (B, m, d) -> (B, n, d).
        slots = ops.matmul(
            ops.transpose(ops.cast(dispatch, tokens.dtype), (0, 2, 1)), tokens
        )
        # (B, n, d) -> (B, E, S, d) -> (E, B, S, d) -> (E, B * S, d):
        # expert e processes its S slots of every sequence in one batched
        # matmul.
        slots = ops.reshape(
            slots,
            (batch, self.num_experts, self.slots_per_expert, self.model_dim),
        )
        slots = ops.reshape(
            ops.transpose(slots, (1, 0, 2, 3)),
            (self.num_experts, -1, self.model_dim),
        )
        slot_outputs = self.experts(slots, training=training)  # (E, B*S, d)
        slot_outputs = ops.reshape(
            slot_outputs,
            (self.num_experts, batch, self.slots_per_expert, self.model_dim),
        )
        slot_outputs = ops.reshape(
            ops.transpose(slot_outputs, (1, 0, 2, 3)),
            (batch, self.num_slots, self.model_dim),
        )  # (B, n, d)
        outputs = ops.matmul(
            ops.cast(combine, slot_outputs.dtype), slot_outputs
        )  # (B, m, d)
        if mask is not None:
            outputs = ops.where(valid, outputs, ops.zeros_like(outputs))
        return ops.reshape(outputs, ops.shape(inputs))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "intermediate_dim": self.intermediate_dim,
                "slots_per_expert": self.slots_per_expert,
                **self.experts.options_config(),
                "expert_dropout": self.expert_dropout,
                "normalize": self.normalize,
                "slot_initializer": keras.initializers.serialize(
                    self.slot_initializer
                ),
                "seed": self.seed,
            }
        )
        return config
