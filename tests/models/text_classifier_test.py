import os

import keras
import numpy as np
from keras.src import testing

from keras_moe import FeedForward
from keras_moe import SparseMoE
from keras_moe.models import text_classifier
from keras_moe.utils import count_parameters
from tests.utils import to_numpy

TINY = dict(
    num_classes=3, sequence_length=16, vocabulary_size=32, num_layers=2,
    model_dim=8, num_heads=2, intermediate_dim=4, num_experts=4, top_k=2,
)


def token_ids(seed=0, shape=(4, 16), length=10):
    """Random ids in [1, 32), right-padded with 0 after `length` tokens."""
    ids = np.random.default_rng(seed).integers(1, 32, size=shape)
    ids[:, length:] = 0
    return ids.astype("int32")


class TextClassifierTest(testing.TestCase):
    def test_output_shapes_and_blocks(self):
        model = text_classifier(**TINY)
        self.assertEqual(model.predict(token_ids(), verbose=0).shape, (4, 3))
        # Shorter inputs than sequence_length are fine.
        self.assertEqual(
            model.predict(token_ids(shape=(2, 12)), verbose=0).shape, (2, 3)
        )
        # "every-2": block 1 is MoE, block 0 dense with top_k * 4 units.
        self.assertIsInstance(model.get_layer("block_0").feed_forward, FeedForward)
        self.assertEqual(model.get_layer("block_0").feed_forward.intermediate_dim, 8)
        moe = model.get_layer("block_1").feed_forward
        self.assertIsInstance(moe, SparseMoE)
        self.assertEqual(moe.name, "block_1_moe")
        self.assertFalse(moe.causal)

    def test_parameter_counts_by_hand(self):
        model = text_classifier(**TINY)
        attention = 3 * (8 * 8 + 8) + (8 * 8 + 8)  # q, k, v, output: (8, 2, 4) kernels + biases
        norms = 2 * (8 + 8)  # two layer norms per block
        dense_ff = (8 * 8 + 8) + (8 * 8 + 8)  # FeedForward with top_k * 4 = 8 units
        experts = 4 * ((8 * 4 + 4) + (4 * 8 + 8))  # 4 experts of 4 units
        router = 8 * 4  # router kernel, no bias
        total = (
            32 * 8  # token embedding
            + 16 * 8  # position embedding
            + norms + attention + dense_ff  # block_0 (dense)
            + norms + attention + router + experts  # block_1 (MoE)
            + 2 * 8  # final layer norm
            + 8 * 3 + 3  # classifier
        )
        active = total - experts + experts * 2 // 4  # top_k=2 of 4 experts
        counts = count_parameters(model)
        self.assertEqual((counts.total, counts.active), (total, active))
        self.assertEqual((counts.total, counts.active), (1547, 1395))
        self.assertEqual(counts.expert_total, experts)
        # Keras also counts the routing statistics (1 + 5 + 4 state values).
        self.assertEqual(model.count_params(), total + 10)

        dense = count_parameters(text_classifier(moe_layers="none", **TINY))
        self.assertEqual(dense.total, dense.active)
        self.assertEqual(dense.total, total - router - experts + dense_ff)
        # Equal active size but for the router and one more output bias.
        self.assertEqual(active - dense.active, router + 8)

    def test_padding_changes_nothing_and_is_not_routed(self):
        model = text_classifier(
            moe_layers="all", capacity_factor=None,
            moe_options={"eval_capacity_factor": None}, **TINY,
        )
        ids = token_ids(length=9)
        full = to_numpy(model.predict(ids, verbose=0))
        # The same texts with less padding, or none.
        self.assertAllClose(model.predict(ids[:, :12], verbose=0), full, atol=1e-5)
        self.assertAllClose(model.predict(ids[:, :9], verbose=0), full, atol=1e-5)
        # A real token where there was padding does change the prediction.
        changed = ids.copy()
        changed[:, 12] = 5
        self.assertNotAllClose(model.predict(changed, verbose=0), full)

        from keras_moe.models import routing_decisions

        decisions = routing_decisions(model, ids)
        for block in decisions.values():
            self.assertAllEqual(block["valid"], ids != 0)
            self.assertFalse(block["kept"][ids == 0].any())
            self.assertTrue(block["kept"][ids != 0].all())

    def test_padding_is_excluded_from_routing_statistics_in_fit(self):
        model = text_classifier(moe_layers="all", **TINY)
        ids = token_ids(length=5)  # 4 examples x 5 real tokens
        model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        model.fit(ids, np.array([0, 1, 2, 0]), batch_size=4, epochs=1, verbose=0)
        for index in (0, 1):
            load = model.get_layer(f"block_{index}").feed_forward.routing_statistics()[
                "expert_load"
            ]
            # 20 real tokens x 2 choices: shares are multiples of 1/40.
            self.assertAllClose(load * 40, np.round(load * 40), atol=1e-3)

    def test_save_and_load(self):
        model = text_classifier(dropout=0.1, seed=1, **TINY)
        ids = token_ids()
        expected = to_numpy(model.predict(ids, verbose=0))
        path = os.path.join(self.get_temp_dir(), "classifier.keras")
        model.save(path)
        restored = keras.saving.load_model(path, safe_mode=True)
        self.assertAllClose(restored.predict(ids, verbose=0), expected, atol=1e-6)
        self.assertIsInstance(restored.get_layer("block_1").feed_forward, SparseMoE)
        self.assertEqual(
            count_parameters(restored), count_parameters(model)
        )

    def test_invalid_arguments(self):
        cases = [
            ({"num_classes": 1}, "num_classes=1"),
            ({"padding_id": 3}, "padding_id=3"),
            ({"num_heads": 3}, "num_heads=3"),
            ({"top_k": 5}, "top_k=5"),
            ({"dropout": 1.5}, "dropout=1.5"),
            ({"moe_layers": "most"}, "moe_layers='most'"),
            ({"num_layers": 0}, "num_layers=0"),
        ]
        for change, message in cases:
            with self.assertRaisesRegex(ValueError, message):
                text_classifier(**{**TINY, **change})

    def test_sparse_upcycling_of_the_dense_blocks(self):
        # The dense baseline's blocks expose their FeedForward, so each can be
        # swapped for a SparseMoE whose experts copy it: with normalised
        # top-k weights and no dropping, the model computes the same function.
        from keras_moe.upcycling import upcycle_feed_forward

        model = text_classifier(moe_layers="none", **TINY)
        ids = token_ids()
        expected = to_numpy(model.predict(ids, verbose=0))
        for index in range(2):
            block = model.get_layer(f"block_{index}")
            block.replace_feed_forward(
                upcycle_feed_forward(
                    block.feed_forward, num_experts=4, top_k=2,
                    name=f"block_{index}_moe",
                )
            )
        self.assertTrue(all(model.get_layer(f"block_{i}").is_moe for i in range(2)))
        self.assertAllClose(model.predict(ids, verbose=0), expected, atol=1e-5)
        counts = count_parameters(model)
        self.assertGreater(counts.total, counts.active)
        path = os.path.join(self.get_temp_dir(), "upcycled.keras")
        model.save(path)
        restored = keras.saving.load_model(path)
        self.assertAllClose(restored.predict(ids, verbose=0), expected, atol=1e-5)
