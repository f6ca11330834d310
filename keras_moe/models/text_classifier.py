"""text_classifier: a transformer encoder classifier with MoE feed-forwards."""

import keras

from keras_moe._checks import check_positive_int
from keras_moe._checks import check_rate
from keras_moe.models import _stack


def text_classifier(
    num_classes,
    sequence_length,
    vocabulary_size=256,
    num_layers=2,
    model_dim=64,
    num_heads=4,
    intermediate_dim=128,
    num_experts=8,
    top_k=2,
    moe_layers="every-2",
    capacity_factor=1.25,
    dense_intermediate_dim=None,
    activation="gelu",
    gated=False,
    dropout=0.1,
    attention_dropout=0.0,
    padding_id=0,
    moe_options=None,
    seed=None,
    name="moe_text_classifier",
):
    """Builds a transformer encoder classifier whose feed-forwards are MoE.

    ```
    token ids (batch, tokens)
      -> token + position embedding (keras_hub.layers.TokenAndPositionEmbedding)
      -> num_layers x TransformerBlock (pre-norm; SparseMoE where moe_layers
         says, FeedForward elsewhere)
      -> LayerNorm -> mean over the non-padding tokens -> dropout -> Dense
    ```

    Padding: with `padding_id=0` (the byte-level datasets pad on the right
    with 0) the embedding emits a Keras mask, so padded tokens are not
    attended to, not routed (they take no expert capacity and do not count
    in the balancing losses), and not pooled. Inputs may be shorter than
    `sequence_length`, not longer.

    The dense baseline of equal active size is one argument away:
    `moe_layers="none"` gives every block a `FeedForward` of
    `dense_intermediate_dim = top_k * intermediate_dim` hidden units, the
    hidden units a token passes through in an MoE block.

    Args:
        num_classes: int >= 2, number of classes.
        sequence_length: int, maximum number of tokens (position embeddings).
        vocabulary_size: int, number of token ids (256 for bytes).
        num_layers: int, number of transformer blocks.
        model_dim: int, token width d_model.
        num_heads: int, attention heads (a divisor of `model_dim`).
        intermediate_dim: int, hidden width of each expert.
        num_experts: int, experts per MoE layer.
        top_k: int, experts per token.
        moe_layers: which blocks are MoE: `"every-2"` (blocks 1, 3, ...),
            `"last-N"`, `"all"`, `"none"` or a list of block indices (see
            `moe_block_indices`).
        capacity_factor: float > 0 or None, training capacity factor.
        dense_intermediate_dim: int or None, hidden width of the dense
            blocks (default `top_k * intermediate_dim`).
        activation: activation of the experts and dense blocks.
        gated: bool, gated (GLU) experts and dense blocks.
        dropout: float in [0, 1), dropout after the embedding, on the
            attention and feed-forward outputs, and before the classifier.
        attention_dropout: float in [0, 1), dropout on attention weights.
        padding_id: 0 (mask token id 0) or None (no padding mask).
        moe_options: optional dict of further `SparseMoE` arguments
            (`router`, `group_size`, `load_balance_loss_weight`, ...).
        seed: optional int seed of the dropout layers and routers.
        name: str, the model name.

    Returns:
        A functional `keras.Model` from int token ids `(batch, tokens)` to
        class logits `(batch, num_classes)`. Block i is
        `model.get_layer(f"block_{i}")`; its feed-forward is
        `block.feed_forward`.

    Example:

    >>> model = text_classifier(num_classes=2, sequence_length=64)
    >>> model.predict(np.ones((3, 64), "int32"), verbose=0).shape
    (3, 2)
    """
    hub = _stack.keras_hub_layers()
    check_positive_int("num_classes", num_classes, minimum=2)
    check_positive_int("sequence_length", sequence_length)
    check_positive_int("vocabulary_size", vocabulary_size)
    _stack.check_stack_arguments(
        num_layers, model_dim, num_heads, intermediate_dim, num_experts, top_k
    )
    check_rate("dropout", dropout)
    if padding_id not in (0, None):
        raise ValueError(
            "Received an invalid value for `padding_id`, expected 0 (token "
            f"id 0 is padding) or None (no padding). Received: "
            f"padding_id={padding_id!r}"
        )

    # === Layers and functional model ===
    token_ids = keras.Input((None,), dtype="int32", name="token_ids")
    x = hub.TokenAndPositionEmbedding(
        vocabulary_size=vocabulary_size,
        sequence_length=sequence_length,
        embedding_dim=model_dim,
        mask_zero=padding_id == 0,
        name="embedding",
    )(token_ids)  # (batch, tokens, d), with a padding mask
    x = keras.layers.Dropout(dropout, seed=seed, name="embedding_dropout")(x)
    x = _stack.transformer_stack(
        x,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_dim=intermediate_dim,
        num_experts=num_experts,
        top_k=top_k,
        moe_layers=moe_layers,
        capacity_factor=capacity_factor,
        dense_intermediate_dim=dense_intermediate_dim,
        activation=activation,
        gated=gated,
        dropout=dropout,
        attention_dropout=attention_dropout,
        causal=False,
        moe_options=moe_options,
        seed=seed,
    )
    x = _stack.final_norm(x)
    x = keras.layers.GlobalAveragePooling1D(name="pooling")(x)  # (batch, d)
    x = keras.layers.Dropout(
        dropout,
        seed=None if seed is None else seed + 1,
        name="pooled_dropout",
    )(x)
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(token_ids, logits, name=name)
