"""Vision Transformer input and output layers: patch embedding, token pooling."""

import keras
from keras import ops

from keras_moe._checks import check_positive_int
from keras_moe.api_export import keras_moe_export
from keras_moe.layers.expert_ffn import clone_initializer


@keras_moe_export
class PatchEmbedding(keras.layers.Layer):
    """Cuts images into patches, embeds each one, optionally adds a class token.

    Each non-overlapping `patch_size x patch_size` patch is projected
    linearly to `model_dim` (a strided convolution, as in ViT), and the
    patches are laid out row by row as a token sequence. With
    `use_class_token=True` a learned class token (initialised to zeros, as in
    ViT) is put in front; a classifier can then read its output. Position
    embeddings are not added here (the builders add
    `keras_hub.layers.PositionEmbedding`).

    Args:
        patch_size: int, height and width of a patch in pixels.
        model_dim: int, size of each token embedding.
        use_class_token: bool, prepend a learned class token.
        kernel_initializer: initializer of the projection kernel.
        bias_initializer: initializer of the projection bias.
        **kwargs: base `Layer` arguments.

    Call arguments:
        images: `(batch, height, width, channels)` (channels last), with
            height and width divisible by `patch_size`.

    Returns:
        `(batch, num_tokens, model_dim)`, `num_tokens = (height / patch_size)
        * (width / patch_size)`, plus one with the class token (first).

    Example:

    >>> layer = PatchEmbedding(patch_size=4, model_dim=16)
    >>> layer(np.zeros((2, 32, 32, 3), "float32")).shape
    (2, 65, 16)

    References:
        - Dosovitskiy et al., 2020, "An Image is Worth 16x16 Words".
    """

    def __init__(
        self,
        patch_size,
        model_dim,
        use_class_token=True,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_positive_int("patch_size", patch_size)
        check_positive_int("model_dim", model_dim)
        self.patch_size = patch_size
        self.model_dim = model_dim
        self.use_class_token = bool(use_class_token)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.bias_initializer = keras.initializers.get(bias_initializer)

    def num_tokens(self, image_shape):
        """Tokens per image for an image shape `(height, width, channels)`."""
        height, width = image_shape[0], image_shape[1]
        for name, size in (("height", height), ("width", width)):
            if size is None or size % self.patch_size:
                raise ValueError(
                    f"The image {name} must be known and divisible by "
                    f"patch_size={self.patch_size}. Received: image shape "
                    f"{tuple(image_shape)}"
                )
        num_patches = (height // self.patch_size) * (width // self.patch_size)
        return num_patches + int(self.use_class_token)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != 4:
            raise ValueError(
                "PatchEmbedding expects images (batch, height, width, "
                f"channels). Received: input_shape={input_shape}"
            )
        self.num_tokens(input_shape[1:])
        self.projection = keras.layers.Conv2D(
            self.model_dim,
            kernel_size=self.patch_size,
            strides=self.patch_size,
            padding="valid",
            data_format="channels_last",
            kernel_initializer=clone_initializer(self.kernel_initializer),
            bias_initializer=clone_initializer(self.bias_initializer),
            dtype=self.dtype_policy,
            name="projection",
        )
        self.projection.build(input_shape)
        if self.use_class_token:
            self.class_token = self.add_weight(
                name="class_token",
                shape=(1, 1, self.model_dim),
                initializer="zeros",
            )

    def call(self, images):
        patches = self.projection(images)  # (batch, rows, columns, d)
        batch_size = ops.shape(patches)[0]
        tokens = ops.reshape(patches, (batch_size, -1, self.model_dim))
        if self.use_class_token:
            class_token = ops.broadcast_to(
                ops.cast(self.class_token, tokens.dtype),
                (batch_size, 1, self.model_dim),
            )
            tokens = ops.concatenate([class_token, tokens], axis=1)
        return tokens  # (batch, num_tokens, d)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.num_tokens(input_shape[1:]), self.model_dim)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "patch_size": self.patch_size,
                "model_dim": self.model_dim,
                "use_class_token": self.use_class_token,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "bias_initializer": keras.initializers.serialize(
                    self.bias_initializer
                ),
            }
        )
        return config


@keras_moe_export
class TokenPooling(keras.layers.Layer):
    """Takes one token of a sequence, e.g. the class token of a ViT.

    Args:
        index: int, position of the token to take (default 0).
        **kwargs: base `Layer` arguments.

    Call arguments:
        inputs: `(batch, tokens, d)`.

    Returns:
        `(batch, d)`, `inputs[:, index]`.

    Example:

    >>> TokenPooling()(np.arange(12.0).reshape(1, 3, 4)).shape
    (1, 4)
    """

    def __init__(self, index=0, **kwargs):
        super().__init__(**kwargs)
        check_positive_int("index", index, minimum=0)
        self.index = index

    def call(self, inputs):
        return inputs[:, self.index]

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])

    def get_config(self):
        return {**super().get_config(), "index": self.index}
