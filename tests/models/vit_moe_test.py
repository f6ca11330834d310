import os

import keras
import numpy as np
from keras.src import testing

from keras_moe import FeedForward
from keras_moe import SparseMoE
from keras_moe.models import PatchEmbedding
from keras_moe.models import TokenPooling
from keras_moe.models import vit_moe_classifier
from keras_moe.utils import count_parameters
from tests.utils import to_numpy

TINY = dict(
    num_classes=5, image_size=8, patch_size=4, num_layers=2, model_dim=8,
    num_heads=2, intermediate_dim=4, num_experts=4, top_k=1,
    moe_layers="last-1",
)


def images(seed=0, count=3, size=8):
    return np.random.default_rng(seed).uniform(size=(count, size, size, 3)).astype(
        "float32"
    )


class ViTMoETest(testing.TestCase):
    def test_output_shapes_and_placement(self):
        for pooling in ("token", "mean"):
            model = vit_moe_classifier(pooling=pooling, **TINY)
            self.assertEqual(model.predict(images(), verbose=0).shape, (3, 5))
            self.assertIsInstance(model.get_layer("block_0").feed_forward, FeedForward)
            self.assertIsInstance(model.get_layer("block_1").feed_forward, SparseMoE)
        model = vit_moe_classifier(**{**TINY, "image_size": (8, 12)})
        self.assertEqual(model.predict(images(size=8)[:, :, :1].repeat(12, axis=2),
                                       verbose=0).shape, (3, 5))

    def test_parameter_counts_by_hand(self):
        model = vit_moe_classifier(**TINY)
        attention = 3 * (8 * 8 + 8) + (8 * 8 + 8)  # q, k, v, output kernels + biases
        norms = 2 * (8 + 8)  # two layer norms per block
        experts = 4 * ((8 * 4 + 4) + (4 * 8 + 8))  # 4 experts of 4 units, biases
        total = (
            4 * 4 * 3 * 8 + 8  # patch projection (4x4x3 -> 8) + bias
            + 8  # class token
            + 5 * 8  # position embedding: 2x2 patches + class token
            + norms + attention + (8 * 4 + 4) + (4 * 8 + 8)  # block_0, FeedForward of top_k * 4
            + norms + attention + 8 * 4 + experts  # block_1: router + experts
            + 2 * 8  # final layer norm
            + 8 * 5 + 5  # classifier
        )
        active = total - experts + experts // 4  # top_k=1 of 4 experts
        counts = count_parameters(model)
        self.assertEqual((counts.total, counts.active), (total, active))
        self.assertEqual((counts.total, counts.active), (1553, 1325))
        mean_pooled = count_parameters(vit_moe_classifier(pooling="mean", **TINY))
        # No class token, and one position fewer.
        self.assertEqual(mean_pooled.total, total - 8 - 8)

    def test_patch_embedding_and_token_pooling(self):
        layer = PatchEmbedding(patch_size=2, model_dim=3)
        x = images(count=2, size=4)
        tokens = to_numpy(layer(x))
        self.assertEqual(tokens.shape, (2, 5, 3))
        self.assertAllClose(tokens[:, 0], np.zeros((2, 3)))  # class token starts at 0
        # Token 1 + 2 * 1 + 1 = 4 is the patch at row 1, column 1 (pixels 2:4).
        kernel = to_numpy(layer.projection.kernel)  # (2, 2, 3, 3)
        bias = to_numpy(layer.projection.bias)
        patch = x[:, 2:4, 2:4, :]
        expected = np.einsum("bhwc,hwcd->bd", patch, kernel) + bias
        self.assertAllClose(tokens[:, 4], expected, atol=1e-5)
        self.assertAllClose(TokenPooling(1)(tokens), tokens[:, 1])
        config = layer.get_config()
        self.assertEqual(PatchEmbedding.from_config(config).get_config(), config)
        with self.assertRaisesRegex(ValueError, "divisible by patch_size=3"):
            PatchEmbedding(3, 4).build((None, 4, 4, 3))
        with self.assertRaisesRegex(ValueError, "index=-1"):
            TokenPooling(-1)

    def test_save_and_load(self):
        model = vit_moe_classifier(**TINY)
        x = images()
        expected = to_numpy(model.predict(x, verbose=0))
        path = os.path.join(self.get_temp_dir(), "vit.keras")
        model.save(path)
        restored = keras.saving.load_model(path, safe_mode=True)
        self.assertAllClose(restored.predict(x, verbose=0), expected, atol=1e-6)

    def test_invalid_arguments(self):
        cases = [
            ({"patch_size": 3}, "patch_size=3"),
            ({"pooling": "cls"}, "pooling='cls'"),
            ({"image_size": (8, 8, 3)}, r"image_size=\(8, 8, 3\)"),
            ({"num_classes": 0}, "num_classes=0"),
            ({"moe_layers": "last-3"}, "moe_layers='last-3'"),
        ]
        for change, message in cases:
            with self.assertRaisesRegex(ValueError, message):
                vit_moe_classifier(**{**TINY, **change})
