"""ExpertFFN: E feed-forward networks stored as stacked weights."""

import keras
from keras import ops

from keras_moe._checks import check_bool
from keras_moe._checks import check_optional_seed
from keras_moe._checks import check_positive_int
from keras_moe._checks import check_rate
from keras_moe._checks import get_activation
from keras_moe._checks import get_initializer
from keras_moe._checks import get_regularizer
from keras_moe.api_export import keras_moe_export
from keras_moe.layers._seed_state import SavesSeedStates
from keras_moe.routing.grouped_matmul import group_of_rows
from keras_moe.routing.grouped_matmul import grouped_matmul


def clone_initializer(initializer, num_experts=None):
    """A fresh copy of `initializer`, with per-expert fans for stacked kernels.

    Keras initializers are stateless: one instance returns the same values on
    every call, so each weight gets its own copy (as Keras' own layers do).

    Keras computes the fans of a rank-3 kernel `(E, fan_in, fan_out)` as if
    it were a 1D convolution kernel: `E * fan_in` and `E * fan_out`. For
    stacked experts that would shrink the initial weights by `sqrt(E)`.
    Variance-scaling initializers (Glorot, He, LeCun, ...) divide by the fan,
    so scaling their `scale` by E gives exactly each expert's own fans, on
    every Keras version (`input_axes`/`output_axes` exist only in recent ones).

    Args:
        initializer: a Keras initializer instance.
        num_experts: int E for a stacked `(E, ...)` kernel, None otherwise.
    """
    config = initializer.get_config()
    if (
        num_experts is not None
        and isinstance(initializer, keras.initializers.VarianceScaling)
        and config.get("input_axes") is None
        and config.get("output_axes") is None
    ):
        return keras.initializers.VarianceScaling(
            scale=initializer.scale * num_experts,
            mode=initializer.mode,
            distribution=initializer.distribution,
            seed=config.get("seed"),
        )
    return initializer.__class__.from_config(config)


def feed_forward(
    inputs,
    intermediate_kernel,
    output_kernel,
    gate_kernel=None,
    intermediate_bias=None,
    gate_bias=None,
    output_bias=None,
    activation=None,
    dropout=None,
    training=None,
    group_sizes=None,
):
    """Applies a (possibly gated) two-layer feed-forward network.

    Works for one network (kernels `(d, h)`, `(h, d)`, inputs `(..., d)`),
    for stacked experts on their own buffers (kernels `(E, d, h)`,
    `(E, h, d)`, inputs `(E, C, d)`), where `ops.matmul` is one batched
    matmul over E, and for stacked experts on rows sorted by expert (inputs
    `(R, d)` with `group_sizes` `(E,)`: the first `group_sizes[0]` rows go
    to expert 0, the next ones to expert 1, ...; `grouped_matmul`). Biases
    are `(h,)`/`(d,)` or `(E, h)`/`(E, d)`.

    Gated (GLU) form: `activation(x @ gate_kernel) * (x @ intermediate_kernel)`,
    i.e. SwiGLU with `activation="silu"` and GeGLU with `"gelu"`.
    """
    stacked = len(intermediate_kernel.shape) == 3
    if not stacked and len(inputs.shape) > 2:
        # One network on `(..., d)`: run it on `(tokens, d)`. XLA's CPU
        # backend computes the weight gradient of a 3-D activation times a
        # 2-D kernel (a contraction over two axes) ~2.4x slower than the
        # same product on 2-D activations (measured here: a gated FFN at
        # 4096 tokens, d=256, h=1024 took 183 ms instead of 77 ms).
        leading_shape = ops.shape(inputs)[:-1]
        outputs = feed_forward(
            ops.reshape(inputs, (-1, inputs.shape[-1])),
            intermediate_kernel,
            output_kernel,
            gate_kernel=gate_kernel,
            intermediate_bias=intermediate_bias,
            gate_bias=gate_bias,
            output_bias=output_bias,
            activation=activation,
            dropout=dropout,
            training=training,
        )
        return ops.reshape(outputs, tuple(leading_shape) + (outputs.shape[-1],))
    if group_sizes is not None:
        # (R,) expert of each row; rows past the groups use the last bias
        # (their outputs are never read).
        row_group = ops.minimum(
            group_of_rows(group_sizes, ops.shape(inputs)[0]),
            ops.shape(intermediate_kernel)[0] - 1,
        )

    def project(x, kernel, bias):
        if group_sizes is not None:
            y = grouped_matmul(x, kernel, group_sizes)  # (R, out)
            if bias is not None:
                y = y + ops.take(bias, row_group, axis=0)
            return y
        y = ops.matmul(x, kernel)
        if bias is not None:
            y = y + (ops.expand_dims(bias, 1) if stacked else bias)
        return y

    hidden = project(inputs, intermediate_kernel, intermediate_bias)
    if gate_kernel is not None:
        hidden = activation(project(inputs, gate_kernel, gate_bias)) * hidden
    else:
        hidden = activation(hidden)
    if dropout is not None:
        hidden = dropout(hidden, training=training)
    return project(hidden, output_kernel, output_bias)


class FeedForwardBase(SavesSeedStates, keras.layers.Layer):
    """Shared arguments, weights and config of `FeedForward` and `ExpertFFN`.

    Subclasses call `build_weights(leading_shape, model_dim)`, where
    `leading_shape` is `()` for one network and `(E,)` for stacked experts.
    """

    def __init__(
        self,
        intermediate_dim,
        activation="gelu",
        gated=False,
        use_bias=True,
        dropout=0.0,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_positive_int("intermediate_dim", intermediate_dim)
        check_rate("dropout", dropout)
        self.intermediate_dim = intermediate_dim
        self.activation = get_activation(activation)
        self.gated = check_bool("gated", gated)
        self.use_bias = check_bool("use_bias", use_bias)
        self.dropout = float(dropout)
        self.kernel_initializer = get_initializer(
            "kernel_initializer", kernel_initializer
        )
        self.bias_initializer = get_initializer(
            "bias_initializer", bias_initializer
        )
        self.kernel_regularizer = get_regularizer(
            "kernel_regularizer", kernel_regularizer
        )
        self.bias_regularizer = get_regularizer(
            "bias_regularizer", bias_regularizer
        )
        self.seed = check_optional_seed(seed)
        self.dropout_layer = (
            keras.layers.Dropout(
                self.dropout, seed=seed, dtype=self.dtype_policy, name="dropout"
            )
            if self.dropout > 0
            else None
        )

    def _saved_seed_generators(self):
        # The Dropout sublayer has no variables to hold its seed state.
        if self.dropout_layer is None:
            return []
        return [self.dropout_layer.seed_generator]

    def build_weights(self, leading_shape, model_dim):
        leading_shape = tuple(leading_shape)
        num_experts = leading_shape[0] if leading_shape else None
        hidden = self.intermediate_dim

        def kernel(name, shape):
            return self.add_weight(
                name=name,
                shape=leading_shape + shape,
                initializer=clone_initializer(
                    self.kernel_initializer, num_experts
                ),
                regularizer=self.kernel_regularizer,
            )

        def bias(name, shape):
            if not self.use_bias:
                return None
            return self.add_weight(
                name=name,
                shape=leading_shape + shape,
                initializer=clone_initializer(self.bias_initializer),
                regularizer=self.bias_regularizer,
            )

        self.intermediate_kernel = kernel("intermediate_kernel", (model_dim, hidden))
        self.intermediate_bias = bias("intermediate_bias", (hidden,))
        if self.gated:
            self.gate_kernel = kernel("gate_kernel", (model_dim, hidden))
            self.gate_bias = bias("gate_bias", (hidden,))
        else:
            self.gate_kernel = None
            self.gate_bias = None
        self.output_kernel = kernel("output_kernel", (hidden, model_dim))
        self.output_bias = bias("output_bias", (model_dim,))
        if self.dropout_layer is not None:
            self.dropout_layer.build(leading_shape + (None, hidden))

    def call(self, inputs, training=None):
        return feed_forward(
            inputs,
            intermediate_kernel=self.intermediate_kernel,
            output_kernel=self.output_kernel,
            gate_kernel=self.gate_kernel,
            intermediate_bias=self.intermediate_bias,
            gate_bias=self.gate_bias,
            output_bias=self.output_bias,
            activation=self.activation,
            dropout=self.dropout_layer,
            training=training,
        )

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "intermediate_dim": self.intermediate_dim,
                **self.options_config(),
                "dropout": self.dropout,
                "seed": self.seed,
            }
        )
        return config

    def options_config(self):
        """The serialised options an MoE layer passes on to its experts.

        Activation, gating, biases, initializers and regularizers: the
        config entries of `FeedForward`, `ExpertFFN` and of the MoE layers
        that build their experts from the same arguments.
        """
        return {
            "activation": keras.activations.serialize(self.activation),
            "gated": self.gated,
            "use_bias": self.use_bias,
            "kernel_initializer": keras.initializers.serialize(
                self.kernel_initializer
            ),
            "bias_initializer": keras.initializers.serialize(self.bias_initializer),
            "kernel_regularizer": keras.regularizers.serialize(
                self.kernel_regularizer
            ),
            "bias_regularizer": keras.regularizers.serialize(self.bias_regularizer),
        }


@keras_moe_export
class ExpertFFN(FeedForwardBase):
    """`num_experts` feed-forward networks applied each to its own buffer.

    The experts' weights are stacked along a leading expert axis, so applying
    all of them is one batched matmul per projection: expert e transforms
    `inputs[e]` only. This is the compute half of a sparse MoE layer; the
    routing half (`SparseMoE`) fills the buffers.

    Weights (E experts, model width d, hidden width h):
    - `intermediate_kernel` `(E, d, h)` and `output_kernel` `(E, h, d)`;
    - `gate_kernel` `(E, d, h)` when `gated=True`;
    - biases `intermediate_bias` `(E, h)`, `gate_bias` `(E, h)`,
      `output_bias` `(E, d)` when `use_bias=True`.
    Variance-scaling initializers use each expert's own fans (d and h), not
    Keras' convolution-style `E * d` (see `clone_initializer`).

    Args:
        num_experts: int, E.
        intermediate_dim: int, hidden width h of each expert.
        activation: activation name or callable (default `"gelu"`).
        gated: bool, use the gated (GLU) form
            `activation(x W_gate) * (x W_in)`: `activation="silu"` gives
            SwiGLU (Mixtral, Qwen-MoE), `"gelu"` gives GeGLU.
        use_bias: bool.
        dropout: float in [0, 1), dropout on the hidden activations, applied
            in training only ("expert dropout"; Switch uses a higher rate
            inside experts when fine-tuning).
        kernel_initializer: initializer of the kernels.
        bias_initializer: initializer of the biases.
        kernel_regularizer: optional regularizer of the kernels.
        bias_regularizer: optional regularizer of the biases.
        seed: optional int seed for the dropout.
        **kwargs: base `Layer` arguments.

    Call arguments:
        inputs: `(E, C, d)`, buffer `C` rows per expert; or `(R, d)` rows
            sorted by expert when `group_sizes` is given.
        training: bool, enables dropout.
        group_sizes: optional int32 `(E,)`: `inputs` rows
            `[start_e, start_e + group_sizes[e])` go to expert e (`start`
            the exclusive cumulative sum); later rows give zeros (plus the
            biases). The dropless mode's layout (`routing.dropless_layout`).

    Returns:
        `(E, C, d)`: row `[e, c]` is expert e applied to `inputs[e, c]`;
        or `(R, d)` with `group_sizes`.

    Example:

    >>> experts = ExpertFFN(num_experts=4, intermediate_dim=32)
    >>> experts(np.ones((4, 5, 8), "float32")).shape
    (4, 5, 8)
    """

    def __init__(self, num_experts, intermediate_dim, **kwargs):
        super().__init__(intermediate_dim, **kwargs)
        check_positive_int("num_experts", num_experts)
        self.num_experts = num_experts

    def build(self, input_shape):
        if len(input_shape) == 2:
            # Rows sorted by expert, (R, d), called with `group_sizes`.
            self.build_weights((self.num_experts,), input_shape[-1])
            return
        if len(input_shape) != 3:
            raise ValueError(
                "ExpertFFN expects inputs of shape (num_experts, capacity, "
                "d_model), or (rows, d_model) with `group_sizes`. Received: "
                f"input_shape={input_shape}"
            )
        if input_shape[0] is not None and input_shape[0] != self.num_experts:
            raise ValueError(
                "ExpertFFN expects one buffer per expert: the first input "
                f"dimension must be num_experts={self.num_experts}. Received: "
                f"input_shape={input_shape}"
            )
        self.build_weights((self.num_experts,), input_shape[-1])

    def call(self, inputs, training=None, group_sizes=None):
        return feed_forward(
            inputs,
            intermediate_kernel=self.intermediate_kernel,
            output_kernel=self.output_kernel,
            gate_kernel=self.gate_kernel,
            intermediate_bias=self.intermediate_bias,
            gate_bias=self.gate_bias,
            output_bias=self.output_bias,
            activation=self.activation,
            dropout=self.dropout_layer,
            training=training,
            group_sizes=group_sizes,
        )

    def get_config(self):
        return {**super().get_config(), "num_experts": self.num_experts}
