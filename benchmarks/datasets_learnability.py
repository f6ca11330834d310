"""Checks that tiny Keras models learn the synthetic datasets quickly.

Trains a 2-layer, 64-wide transformer classifier on
`load_text_classification` and a 2-layer, 64-wide ViT (4x4 patches) on
`load_image_classification` until a wall-clock budget is spent (checked at
the end of each epoch, so a run overshoots by up to one epoch), then prints
test accuracy per domain / style. Plain dense models, no MoE: this measures
the data, not the layers. Run from the repository root, e.g.

    KERAS_BACKEND=jax python -m benchmarks.datasets_learnability \
        --task text --budget-seconds 60

The first epoch includes compilation.
"""

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "jax")  # Before importing Keras.

import keras  # noqa: E402
from keras import layers  # noqa: E402
from keras import ops  # noqa: E402

from keras_moe import datasets  # noqa: E402


def _encoder_blocks(x, num_layers=2, hidden_dim=64, num_heads=4,
                    attention_mask=None):
    # Pre-norm transformer blocks on (batch, tokens, hidden_dim).
    for _ in range(num_layers):
        residual = x
        x = layers.LayerNormalization()(x)
        x = layers.MultiHeadAttention(num_heads, hidden_dim // num_heads)(
            x, x, attention_mask=attention_mask
        )
        x = x + residual
        residual = x
        x = layers.LayerNormalization()(x)
        x = layers.Dense(2 * hidden_dim, activation="gelu")(x)
        x = layers.Dense(hidden_dim)(x)
        x = x + residual
    return layers.LayerNormalization()(x)


def text_classifier(sequence_length, num_classes, hidden_dim=64):
    token_ids = keras.Input((sequence_length,), dtype="int32")
    # (batch, tokens): 1 for bytes, 0 for padding.
    mask = ops.cast(ops.not_equal(token_ids, 0), "float32")
    x = layers.Embedding(256, hidden_dim)(token_ids)
    x = x + layers.Embedding(sequence_length, hidden_dim)(
        ops.arange(sequence_length)[None]
    )
    x = _encoder_blocks(
        x, attention_mask=ops.cast(mask[:, None, :], "bool")
    )
    # Mean over the non-padding tokens: (batch, hidden_dim).
    x = ops.sum(x * mask[..., None], axis=1) / ops.sum(
        mask, axis=1, keepdims=True
    )
    return keras.Model(token_ids, layers.Dense(num_classes)(x))


def vision_transformer(image_size, num_classes, patch_size=4, hidden_dim=64):
    images = keras.Input((image_size, image_size, 3))
    num_patches = (image_size // patch_size) ** 2
    x = layers.Conv2D(hidden_dim, patch_size, strides=patch_size)(images)
    x = layers.Reshape((num_patches, hidden_dim))(x)
    x = x + layers.Embedding(num_patches, hidden_dim)(
        ops.arange(num_patches)[None]
    )
    x = layers.GlobalAveragePooling1D()(_encoder_blocks(x))
    return keras.Model(images, layers.Dense(num_classes)(x))


class _WallClockBudget(keras.callbacks.Callback):
    def __init__(self, budget_seconds):
        super().__init__()
        self.budget_seconds = budget_seconds

    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        elapsed = time.perf_counter() - self.start
        rounded = {key: round(value, 3) for key, value in logs.items()}
        print(f"epoch {epoch} elapsed {elapsed:.1f}s {rounded}", flush=True)
        if elapsed > self.budget_seconds:
            self.model.stop_training = True


def _train_and_report(model, train, test, group_names, budget_seconds):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(
        train.x,
        train.y,
        batch_size=64,
        epochs=1000,
        validation_data=(test.x, test.y),
        callbacks=[_WallClockBudget(budget_seconds)],
        verbose=0,
    )
    correct = model.predict(test.x, verbose=0).argmax(axis=-1) == test.y
    groups = test[2]
    print(f"test accuracy {correct.mean():.3f}")
    for index, name in enumerate(group_names):
        print(f"  {name}: {correct[groups == index].mean():.3f}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=["text", "images", "all"],
                        default="all")
    parser.add_argument("--budget-seconds", type=float, default=60.0)
    parser.add_argument("--num-train", type=int, default=8000)
    parser.add_argument("--num-test", type=int, default=2000)
    args = parser.parse_args()
    print(f"backend {keras.backend.backend()}")
    if args.task in ("text", "all"):
        train, test, info = datasets.load_text_classification(
            num_train=args.num_train, num_test=args.num_test,
            sequence_length=128,
        )
        model = text_classifier(128, len(info["class_names"]))
        print(f"text classification, {model.count_params()} parameters")
        _train_and_report(model, train, test, info["domain_names"],
                          args.budget_seconds)
    if args.task in ("images", "all"):
        train, test, info = datasets.load_image_classification(
            num_train=args.num_train, num_test=args.num_test, image_size=32,
        )
        model = vision_transformer(32, info["num_classes"])
        print(f"image classification, {model.count_params()} parameters")
        _train_and_report(model, train, test, info["style_names"],
                          args.budget_seconds)


if __name__ == "__main__":
    main()
