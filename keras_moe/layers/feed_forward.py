"""FeedForward: the dense block a SparseMoE replaces, for baselines and upcycling."""

from keras_moe.api_export import keras_moe_export
from keras_moe.layers.expert_ffn import FeedForwardBase


@keras_moe_export
class FeedForward(FeedForwardBase):
    """A dense (possibly gated) two-layer feed-forward block.

    The same network as one expert of `ExpertFFN`, with the same weight names
    minus the expert axis (`intermediate_kernel` `(d, h)`, `output_kernel`
    `(h, d)`, `gate_kernel` `(d, h)` when gated, biases `(h,)`/`(d,)`). That
    makes it the fair dense baseline of a `SparseMoE` (give it
    `intermediate_dim = top_k * expert intermediate_dim` for the same active
    size) and the source block for sparse upcycling.

    Args:
        intermediate_dim: int, hidden width h.
        activation: activation name or callable (default `"gelu"`).
        gated: bool, gated (GLU) form `activation(x W_gate) * (x W_in)`.
        use_bias: bool.
        dropout: float in [0, 1), dropout on the hidden activations.
        kernel_initializer: initializer of the kernels.
        bias_initializer: initializer of the biases.
        kernel_regularizer: optional regularizer of the kernels.
        bias_regularizer: optional regularizer of the biases.
        seed: optional int seed for the dropout.
        **kwargs: base `Layer` arguments.

    Call arguments:
        inputs: `(..., d)`.
        training: bool, enables dropout.

    Returns:
        `(..., d)`.

    Example:

    >>> block = FeedForward(intermediate_dim=32)
    >>> block(np.ones((2, 3, 8), "float32")).shape
    (2, 3, 8)
    """

    def __init__(self, intermediate_dim, **kwargs):
        super().__init__(intermediate_dim, **kwargs)
        self.supports_masking = True

    def build(self, input_shape):
        if input_shape[-1] is None:
            raise ValueError(
                "FeedForward needs a known last dimension. Received: "
                f"input_shape={input_shape}"
            )
        self.build_weights((), input_shape[-1])
