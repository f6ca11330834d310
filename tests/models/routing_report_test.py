import keras
import numpy as np
from keras.src import testing

from keras_moe.models import moe_blocks
from keras_moe.models import routing_decisions
from keras_moe.models import text_classifier
from keras_moe.models import vit_moe_classifier
from tests.utils import to_numpy


class RoutingDecisionsTest(testing.TestCase):
    def test_matches_the_block_route_on_the_block_input(self):
        model = text_classifier(
            num_classes=2, sequence_length=12, vocabulary_size=20, num_layers=3,
            model_dim=8, num_heads=2, intermediate_dim=4, num_experts=4,
            top_k=2, moe_layers="all",
        )
        ids = np.random.default_rng(0).integers(1, 20, size=(6, 12))
        ids[:3, 7:] = 0
        decisions = routing_decisions(model, ids, batch_size=3)
        self.assertEqual(list(decisions), ["block_0", "block_1", "block_2"])
        self.assertEqual(
            [block.name for block in moe_blocks(model)], list(decisions)
        )
        # The eager reference: run the model up to block_2, route there.
        block = model.get_layer("block_2")
        features = keras.Model(model.input, block.input)(ids)
        expected = block.route(features, mask=ids != 0)
        got = decisions["block_2"]
        self.assertEqual(got["expert_index"].shape, (6, 12, 2))
        valid = ids != 0
        self.assertAllEqual(got["valid"], valid)
        self.assertAllEqual(
            got["expert_index"][valid], to_numpy(expected["expert_index"])[valid]
        )
        self.assertAllClose(
            got["combine_weights"][valid],
            to_numpy(expected["combine_weights"])[valid], atol=1e-5,
        )
        self.assertAllEqual(got["kept"], to_numpy(expected["kept"]))

    def test_images_have_every_token_valid(self):
        model = vit_moe_classifier(
            num_classes=3, image_size=8, patch_size=4, num_layers=2, model_dim=8,
            num_heads=2, intermediate_dim=4, num_experts=4, top_k=1,
        )
        x = np.random.default_rng(1).uniform(size=(4, 8, 8, 3)).astype("float32")
        decisions = routing_decisions(model, x)
        self.assertEqual(sorted(decisions), ["block_0", "block_1"])
        self.assertEqual(decisions["block_1"]["expert_index"].shape, (4, 5, 1))
        self.assertTrue(decisions["block_1"]["valid"].all())

    def test_dense_models_are_refused(self):
        model = text_classifier(
            num_classes=2, sequence_length=8, num_layers=1, model_dim=8,
            num_heads=2, intermediate_dim=4, moe_layers="none",
        )
        with self.assertRaisesRegex(ValueError, "no TransformerBlock with an MoE"):
            routing_decisions(model, np.ones((2, 8), "int32"))
