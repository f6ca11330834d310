"""What the model builders share: argument checks and the stack of blocks."""

import warnings

import keras

from keras_moe import _checks
from keras_moe.models.placement import moe_block_indices
from keras_moe.models.transformer_block import TransformerBlock
from keras_moe.models.transformer_block import feed_forward_layer


# TokenAndPositionEmbedding hands its masked token embeddings to its inner
# PositionEmbedding, which only reads their shape, and then puts the mask
# back on its output itself; Keras warns on every such call (also in models
# loaded from `.keras` files) that the inner layer "destroys" the mask. It
# does not: silence just that warning.
warnings.filterwarnings(
    "ignore",
    message=r"Layer 'position_embedding' \(of type PositionEmbedding\) "
    r"was passed an input with a mask",
    category=UserWarning,
)


def keras_hub_layers():
    """`keras_hub.layers`, imported on first use.

    KerasHub is optional: it depends on TensorFlow (through
    `tensorflow-text`), which users of the JAX or PyTorch backends may not
    want. Only the model builders need it (for their position embeddings);
    `.keras` files holding KerasHub layers load without importing it first,
    since Keras imports `keras_hub` modules by itself.
    """
    try:
        import keras_hub
    except ImportError as error:
        raise ImportError(
            "The keras_moe.models builders use KerasHub's embedding layers: "
            "`pip install keras-hub`, or `pip install keras-moe[models]`."
        ) from error
    return keras_hub.layers


def check_stack_arguments(
    num_layers, model_dim, num_heads, intermediate_dim, num_experts, top_k
):
    _checks.check_positive_int("num_layers", num_layers)
    _checks.check_positive_int("model_dim", model_dim)
    _checks.check_positive_int("num_heads", num_heads)
    if model_dim % num_heads:
        raise ValueError(
            "Received an invalid value for `num_heads`, expected a divisor of "
            f"model_dim={model_dim}. Received: num_heads={num_heads}"
        )
    _checks.check_positive_int("intermediate_dim", intermediate_dim)
    _checks.check_positive_int("num_experts", num_experts)
    _checks.check_positive_int("top_k", top_k)
    if top_k > num_experts:
        raise ValueError(
            "Received an invalid value for `top_k`, expected 1 <= top_k <= "
            f"num_experts={num_experts}. Received: top_k={top_k}"
        )


def _layer_seed(seed, index, offset=0):
    # Distinct seeds per block and per sublayer, so no two random layers
    # draw the same numbers.
    return None if seed is None else seed + 100 * (index + 1) + offset


def transformer_stack(
    x,
    num_layers,
    num_heads,
    intermediate_dim,
    num_experts,
    top_k,
    moe_layers,
    capacity_factor,
    dense_intermediate_dim,
    activation,
    gated,
    dropout,
    attention_dropout,
    causal,
    moe_options,
    seed,
):
    """Applies `num_layers` `TransformerBlock`s named `block_{i}` to `x`.

    Blocks listed by `moe_layers` get a `SparseMoE` named `block_{i}_moe`,
    the others a `FeedForward` named `block_{i}_feed_forward` of
    `dense_intermediate_dim` (default `top_k * intermediate_dim`) units.
    """
    moe_indices = moe_block_indices(num_layers, moe_layers)
    for index in range(num_layers):
        use_moe = index in moe_indices
        feed_forward = feed_forward_layer(
            use_moe,
            intermediate_dim=intermediate_dim,
            num_experts=num_experts,
            top_k=top_k,
            capacity_factor=capacity_factor,
            dense_intermediate_dim=dense_intermediate_dim,
            activation=activation,
            gated=gated,
            causal=causal,
            moe_options=moe_options,
            seed=_layer_seed(seed, index, offset=50),
            name=f"block_{index}_{'moe' if use_moe else 'feed_forward'}",
        )
        x = TransformerBlock(
            num_heads=num_heads,
            feed_forward=feed_forward,
            dropout=dropout,
            attention_dropout=attention_dropout,
            causal=causal,
            seed=_layer_seed(seed, index),
            name=f"block_{index}",
        )(x)
    return x


def final_norm(x):
    return keras.layers.LayerNormalization(epsilon=1e-6, name="final_norm")(x)
