"""vit_moe_classifier: a Vision Transformer with MoE layers (V-MoE)."""

import keras

from keras_moe._checks import check_positive_int
from keras_moe._checks import check_rate
from keras_moe.models import _stack
from keras_moe.models.vit_layers import PatchEmbedding
from keras_moe.models.vit_layers import TokenPooling

POOLINGS = ("token", "mean")


def vit_moe_classifier(
    num_classes,
    image_size,
    patch_size=4,
    num_channels=3,
    num_layers=4,
    model_dim=64,
    num_heads=4,
    intermediate_dim=128,
    num_experts=8,
    top_k=2,
    moe_layers="last-2",
    capacity_factor=1.25,
    dense_intermediate_dim=None,
    activation="gelu",
    gated=False,
    pooling="token",
    dropout=0.0,
    attention_dropout=0.0,
    moe_options=None,
    seed=None,
    name="vit_moe",
):
    """Builds a ViT-MoE image classifier (V-MoE: MoE in the last blocks).

    ```
    images (batch, height, width, channels)
      -> patches, linear embedding, class token (PatchEmbedding)
      -> + position embedding (keras_hub.layers.PositionEmbedding)
      -> num_layers x TransformerBlock (SparseMoE in the blocks moe_layers
         names, "last-2" by default as in V-MoE's "Last-n"; FeedForward
         elsewhere)
      -> LayerNorm -> class token output, or mean over tokens -> Dense
    ```

    Every patch token (and the class token) is routed on its own, so the
    routers can send textures, edges or background to different experts.
    `moe_layers="none"` is the dense ViT of equal active size.

    Args:
        num_classes: int >= 2, number of classes.
        image_size: int (square images) or `(height, width)`, divisible by
            `patch_size`.
        patch_size: int, patch height and width in pixels.
        num_channels: int, image channels (last axis).
        num_layers: int, number of transformer blocks.
        model_dim: int, token width d_model.
        num_heads: int, attention heads (a divisor of `model_dim`).
        intermediate_dim: int, hidden width of each expert.
        num_experts: int, experts per MoE layer.
        top_k: int, experts per token.
        moe_layers: which blocks are MoE (see `moe_block_indices`).
        capacity_factor: float > 0 or None, training capacity factor.
        dense_intermediate_dim: int or None, hidden width of the dense
            blocks (default `top_k * intermediate_dim`).
        activation: activation of the experts and dense blocks.
        gated: bool, gated (GLU) experts and dense blocks.
        pooling: `"token"` (a class token, as in ViT and V-MoE) or `"mean"`
            (global average of the patch tokens, no class token).
        dropout: float in [0, 1), dropout after the embedding, on the
            attention and feed-forward outputs, and before the classifier.
        attention_dropout: float in [0, 1), dropout on attention weights.
        moe_options: optional dict of further `SparseMoE` arguments.
        seed: optional int seed of the dropout layers and routers.
        name: str, the model name.

    Returns:
        A functional `keras.Model` from float images
        `(batch, height, width, num_channels)` to class logits
        `(batch, num_classes)`.

    Example:

    >>> model = vit_moe_classifier(num_classes=10, image_size=32)
    >>> model.predict(np.zeros((2, 32, 32, 3), "float32"), verbose=0).shape
    (2, 10)

    References:
        - Riquelme et al., 2021, "Scaling Vision with Sparse Mixture of
          Experts" (V-MoE).
        - Dosovitskiy et al., 2020, "An Image is Worth 16x16 Words".
    """
    hub = _stack.keras_hub_layers()
    check_positive_int("num_classes", num_classes, minimum=2)
    if isinstance(image_size, (tuple, list)):
        if len(image_size) != 2:
            raise ValueError(
                "Received an invalid value for `image_size`, expected an int "
                f"or (height, width). Received: image_size={image_size!r}"
            )
        height, width = image_size
    else:
        height = width = image_size
    check_positive_int("image_size", height)
    check_positive_int("image_size", width)
    check_positive_int("patch_size", patch_size)
    if height % patch_size or width % patch_size:
        raise ValueError(
            "Received an invalid value for `patch_size`, expected a divisor "
            f"of the image size {(height, width)}. Received: "
            f"patch_size={patch_size}"
        )
    check_positive_int("num_channels", num_channels)
    _stack.check_stack_arguments(
        num_layers, model_dim, num_heads, intermediate_dim, num_experts, top_k
    )
    check_rate("dropout", dropout)
    if pooling not in POOLINGS:
        raise ValueError(
            f"Received an invalid value for `pooling`, expected one of "
            f"{POOLINGS}. Received: pooling={pooling!r}"
        )

    # === Layers and functional model ===
    images = keras.Input((height, width, num_channels), name="images")
    patch_embedding = PatchEmbedding(
        patch_size=patch_size,
        model_dim=model_dim,
        use_class_token=pooling == "token",
        name="patch_embedding",
    )
    x = patch_embedding(images)  # (batch, num_tokens, d)
    positions = hub.PositionEmbedding(
        sequence_length=patch_embedding.num_tokens((height, width)),
        initializer=keras.initializers.RandomNormal(stddev=0.02),
        name="position_embedding",
    )(x)
    x = keras.layers.Add(name="add_positions")([x, positions])
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
    if pooling == "token":
        x = TokenPooling(0, name="pooling")(x)  # the class token, (batch, d)
    else:
        x = keras.layers.GlobalAveragePooling1D(name="pooling")(x)
    x = keras.layers.Dropout(
        dropout,
        seed=None if seed is None else seed + 1,
        name="pooled_dropout",
    )(x)
    logits = keras.layers.Dense(num_classes, name="logits")(x)
    return keras.Model(images, logits, name=name)
