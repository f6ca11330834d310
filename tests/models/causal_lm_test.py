import os

import keras
import numpy as np
from keras.src import testing

from keras_moe import SparseMoE
from keras_moe import TopKRouter
from keras_moe.models import causal_language_model
from keras_moe.utils import count_parameters
from tests.utils import to_numpy

TINY = dict(
    sequence_length=16, vocabulary_size=32, num_layers=2, model_dim=8,
    num_heads=2, intermediate_dim=4, num_experts=4, top_k=2, moe_layers="all",
)


class ComparingRouter(TopKRouter):
    """A top-k router that says it compares tokens (like expert choice)."""

    compares_tokens = True


def token_ids(seed=0, shape=(3, 16)):
    return np.random.default_rng(seed).integers(1, 32, size=shape).astype("int32")


class CausalLanguageModelTest(testing.TestCase):
    def test_output_shapes(self):
        model = causal_language_model(**TINY)
        self.assertEqual(model.predict(token_ids(), verbose=0).shape, (3, 16, 32))
        self.assertEqual(
            model.predict(token_ids(shape=(2, 9)), verbose=0).shape, (2, 9, 32)
        )
        for index in (0, 1):
            block = model.get_layer(f"block_{index}")
            self.assertTrue(block.causal)
            self.assertIsInstance(block.feed_forward, SparseMoE)
            self.assertTrue(block.feed_forward.causal)

    def test_future_tokens_do_not_change_earlier_outputs(self):
        # MoE in every block and capacity below the fair share, so tokens
        # are dropped: the causal routing must still never look ahead.
        model = causal_language_model(
            capacity_factor=0.5, moe_options={"eval_capacity_factor": 0.5,
                                              "min_capacity": 1},
            **TINY,
        )
        ids = token_ids(seed=1)
        rng = np.random.default_rng(2)
        for training in (False, True):
            logits = to_numpy(model(ids, training=training))
            for t in (3, 11):
                changed = ids.copy()
                changed[0, t:] = rng.integers(1, 32, size=16 - t)
                changed_logits = to_numpy(model(changed, training=training))
                # Earlier positions of every sequence are untouched...
                self.assertAllClose(changed_logits[:, :t], logits[:, :t], atol=1e-5)
                # ...and the changed positions do change.
                self.assertNotAllClose(changed_logits[0, t:], logits[0, t:])
        from keras_moe.models import routing_decisions

        kept = routing_decisions(model, ids)["block_0"]["kept"]
        self.assertFalse(kept.all())  # capacity really dropped assignments

    def test_refuses_routers_that_compare_tokens(self):
        with self.assertRaisesRegex(ValueError, "compares tokens"):
            causal_language_model(
                moe_options={"router": ComparingRouter(4, 2)}, **TINY
            )
        with self.assertRaisesRegex(ValueError, "sets `causal` against"):
            causal_language_model(moe_options={"causal": False}, **TINY)

    def test_parameter_counts_by_hand(self):
        model = causal_language_model(**TINY)
        attention = 3 * (8 * 8 + 8) + (8 * 8 + 8)  # q, k, v, output kernels + biases
        norms = 2 * (8 + 8)  # two layer norms per block
        router = 8 * 4  # router kernel, no bias
        experts = 4 * ((8 * 4 + 4) + (4 * 8 + 8))  # 4 experts of 4 units, biases
        total = (
            32 * 8 + 16 * 8  # token and position embeddings
            + 2 * (norms + attention + router + experts)  # two MoE blocks
            + 2 * 8  # final layer norm
            + 8 * 32 + 32  # next-token logits
        )
        active = total - 2 * experts + 2 * (experts * 2 // 4)  # top_k=2 of 4
        counts = count_parameters(model)
        self.assertEqual((counts.total, counts.active), (total, active))
        self.assertEqual((counts.total, counts.active), (2000, 1696))

    def test_save_and_load(self):
        model = causal_language_model(**TINY)
        ids = token_ids()
        expected = to_numpy(model.predict(ids, verbose=0))
        path = os.path.join(self.get_temp_dir(), "lm.keras")
        model.save(path)
        restored = keras.saving.load_model(path, safe_mode=True)
        self.assertAllClose(restored.predict(ids, verbose=0), expected, atol=1e-6)
        self.assertTrue(restored.get_layer("block_1").causal)

    def test_padding_option(self):
        model = causal_language_model(padding_id=0, **TINY)
        ids = token_ids()
        ids[:, 12:] = 0
        # Right padding cannot change earlier positions in a causal model,
        # with or without the mask; with the mask, padding is not routed.
        from keras_moe.models import routing_decisions

        decisions = routing_decisions(model, ids)["block_0"]
        self.assertAllEqual(decisions["valid"], ids != 0)
        with self.assertRaisesRegex(ValueError, "padding_id=1"):
            causal_language_model(**{**TINY, "padding_id": 1})
