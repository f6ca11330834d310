"""causal_language_model: a decoder-only transformer LM with MoE feed-forwards."""

import keras

from keras_moe._checks import check_positive_int
from keras_moe._checks import check_rate
from keras_moe.models import _stack


def causal_language_model(
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
    dropout=0.0,
    attention_dropout=0.0,
    padding_id=None,
    moe_options=None,
    seed=None,
    name="moe_causal_lm",
):
    """Builds a decoder-only (GPT-style) language model with MoE feed-forwards.

    ```
    token ids (batch, tokens)
      -> token + position embedding (keras_hub.layers.TokenAndPositionEmbedding)
      -> num_layers x causal TransformerBlock (SparseMoE(causal=True) where
         moe_layers says, FeedForward elsewhere)
      -> LayerNorm -> Dense next-token logits
    ```

    Nothing at position t sees a token after t: attention is causal, and the
    MoE layers are `SparseMoE(causal=True)`, which fill expert capacity in
    position order (so a later token never takes an earlier token's slot)
    and refuse routers that compare tokens across the routing group
    (expert choice, batch-prioritised routing), since those would let the
    future decide where the past goes.

    Args:
        sequence_length: int, maximum number of tokens (position embeddings).
        vocabulary_size: int, number of token ids (256 for bytes).
        num_layers: int, number of transformer blocks.
        model_dim: int, token width d_model.
        num_heads: int, attention heads (a divisor of `model_dim`).
        intermediate_dim: int, hidden width of each expert.
        num_experts: int, experts per MoE layer.
        top_k: int, experts per token.
        moe_layers: which blocks are MoE (see `moe_block_indices`);
            `"none"` is the dense baseline of equal active size.
        capacity_factor: float > 0 or None, training capacity factor.
        dense_intermediate_dim: int or None, hidden width of the dense
            blocks (default `top_k * intermediate_dim`).
        activation: activation of the experts and dense blocks.
        gated: bool, gated (GLU) experts and dense blocks (`"silu"` with
            `gated=True` is SwiGLU, as in Mixtral).
        dropout: float in [0, 1), dropout after the embedding and on the
            attention and feed-forward outputs.
        attention_dropout: float in [0, 1), dropout on attention weights.
        padding_id: None (no padding, the default: LM windows are packed) or
            0 (token id 0 is right padding: not attended to, not routed, and
            Keras leaves those positions out of the loss).
        moe_options: optional dict of further `SparseMoE` arguments; a
            `router` that compares tokens is refused.
        seed: optional int seed of the dropout layers and routers.
        name: str, the model name.

    Returns:
        A functional `keras.Model` from int token ids `(batch, tokens)` to
        next-token logits `(batch, tokens, vocabulary_size)`.

    Example:

    >>> model = causal_language_model(sequence_length=32)
    >>> model.predict(np.ones((2, 32), "int32"), verbose=0).shape
    (2, 32, 256)
    """
    hub = _stack.keras_hub_layers()
    check_positive_int("sequence_length", sequence_length)
    check_positive_int("vocabulary_size", vocabulary_size)
    _stack.check_stack_arguments(
        num_layers, model_dim, num_heads, intermediate_dim, num_experts, top_k
    )
    check_rate("dropout", dropout)
    if padding_id not in (0, None):
        raise ValueError(
            "Received an invalid value for `padding_id`, expected None (no "
            "padding) or 0 (token id 0 is padding). Received: "
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
    )(token_ids)  # (batch, tokens, d)
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
        causal=True,
        moe_options=moe_options,
        seed=seed,
    )
    x = _stack.final_norm(x)
    logits = keras.layers.Dense(vocabulary_size, name="logits")(x)
    return keras.Model(token_ids, logits, name=name)
