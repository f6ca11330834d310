import os

import keras
import numpy as np
from absl.testing import parameterized
from keras.src import testing

from keras_moe import BiasBalancedRouter
from keras_moe import FeedForward
from keras_moe import SparseMoE
from keras_moe import TopKRouter
from keras_moe import upcycling
from tests.utils import to_numpy


def random_feed_forward(model_dim=6, **kwargs):
    """A built FeedForward with random (also non-zero bias) weights."""
    block = FeedForward(intermediate_dim=12, **kwargs)
    block.build((None, model_dim))
    rng = np.random.default_rng(0)
    for variable in block.weights:
        variable.assign(rng.normal(size=variable.shape).astype("float32") * 0.5)
    return block


class UpcycleFeedForwardTest(testing.TestCase):
    @parameterized.named_parameters(
        ("gelu", {}, {}),
        ("swiglu_no_bias", {"activation": "silu", "gated": True, "use_bias": False}, {}),
        ("top_1_groups", {}, {"top_k": 1, "group_size": 5}),
        ("bias_balanced", {}, {"router": BiasBalancedRouter(8, 2)}),
    )
    def test_equals_the_dense_block_before_training(self, block_kwargs, moe_kwargs):
        block = random_feed_forward(**block_kwargs)
        x = np.random.default_rng(1).normal(size=(3, 7, 6)).astype("float32")
        dense = to_numpy(block(x))
        moe_kwargs = {"top_k": 2, **moe_kwargs}
        moe = upcycling.upcycle_feed_forward(block, num_experts=8, **moe_kwargs)
        self.assertIsInstance(moe, SparseMoE)
        self.assertEqual(moe.name, block.name)
        self.assertAllClose(moe(x), dense, atol=1e-5, rtol=1e-5)
        # Also in a training call (dropless, no noise): same output.
        self.assertAllClose(moe(x, training=True), dense, atol=1e-5, rtol=1e-5)
        # Every expert holds the dense weights; the router is fresh.
        for name in ("intermediate_kernel", "output_kernel"):
            stacked = to_numpy(getattr(moe.experts, name))
            for expert in stacked:
                self.assertAllClose(expert, to_numpy(getattr(block, name)))
        self.assertFalse(np.allclose(to_numpy(moe.router.kernel), 0.0))

    def test_takes_the_block_settings(self):
        block = random_feed_forward(activation="relu", dropout=0.2)
        moe = upcycling.upcycle_feed_forward(block, 4, 1, capacity_factor=1.25, name="moe")
        self.assertEqual(moe.expert_dropout, 0.2)
        self.assertEqual(moe.intermediate_dim, 12)
        self.assertEqual(moe.capacity_factor, 1.25)
        self.assertIsNone(moe.eval_capacity_factor)
        self.assertTrue(moe.router.normalize_weights)
        self.assertEqual(keras.activations.serialize(moe.activation), "relu")

    def test_copy_into_an_existing_layer(self):
        block = random_feed_forward()
        moe = SparseMoE(
            4, 12, top_k=2, router=TopKRouter(4, 2, normalize_weights=True),
            capacity_factor=None, eval_capacity_factor=None,
        )
        moe.build((None, 6))
        upcycling.copy_feed_forward_into_experts(block, moe)
        x = np.random.default_rng(2).normal(size=(5, 6)).astype("float32")
        self.assertAllClose(moe(x), block(x), atol=1e-5)
        wrong = SparseMoE(4, 10)
        wrong.build((None, 6))
        with self.assertRaisesRegex(ValueError, "intermediate_dim=12 and experts.intermediate_dim=10"):
            upcycling.copy_feed_forward_into_experts(block, wrong)
        wide = SparseMoE(4, 12)
        wide.build((None, 7))
        with self.assertRaisesRegex(ValueError, "d_model must match"):
            upcycling.copy_feed_forward_into_experts(block, wide)

    def test_errors(self):
        with self.assertRaisesRegex(ValueError, "feed_forward=.*Dense"):
            upcycling.upcycle_feed_forward(keras.layers.Dense(4), 4)
        with self.assertRaisesRegex(ValueError, "built=False"):
            upcycling.upcycle_feed_forward(FeedForward(8), 4)
        block = random_feed_forward()
        with self.assertRaisesRegex(ValueError, "num_experts=0"):
            upcycling.upcycle_feed_forward(block, 0)
        with self.assertRaisesRegex(ValueError, "top_k=5"):
            upcycling.upcycle_feed_forward(block, 4, top_k=5)
        with self.assertRaisesRegex(ValueError, "intermediate_dim=3"):
            upcycling.upcycle_feed_forward(block, 4, intermediate_dim=3)


class UpcycleModelTest(testing.TestCase):
    def test_functional_model(self):
        inputs = keras.Input((5, 6))
        hidden = keras.layers.Dense(6)(inputs)
        hidden = hidden + FeedForward(12, name="ffn_1")(keras.layers.LayerNormalization()(hidden))
        hidden = hidden + FeedForward(12, name="ffn_2")(hidden)
        model = keras.Model(inputs, keras.layers.Dense(3)(hidden))
        x = np.random.default_rng(3).normal(size=(4, 5, 6)).astype("float32")
        expected = to_numpy(model.predict(x, verbose=0))

        upcycled = upcycling.upcycle_model(
            model, num_experts=4, top_k=2, select=lambda layer: layer.name == "ffn_2"
        )
        kinds = {layer.name: type(layer).__name__ for layer in upcycled.layers}
        self.assertEqual(kinds["ffn_1"], "FeedForward")
        self.assertEqual(kinds["ffn_2"], "SparseMoE")
        self.assertAllClose(upcycled.predict(x, verbose=0), expected, atol=1e-5)
        # The original is untouched and does not share weights.
        self.assertTrue(all(type(l).__name__ != "SparseMoE" for l in model.layers))
        original_paths = {id(v) for v in model.weights}
        self.assertFalse(any(id(v) in original_paths for v in upcycled.weights))

        # Trains and saves like any model.
        upcycled.compile("adam", "mse")
        upcycled.fit(x, np.zeros_like(expected), epochs=1, verbose=0)
        path = os.path.join(self.get_temp_dir(), "upcycled.keras")
        upcycled.save(path)
        restored = keras.saving.load_model(path)
        self.assertAllClose(restored.predict(x, verbose=0), upcycled.predict(x, verbose=0), atol=1e-6)

    def test_sequential_model_and_refusal_of_subclassed(self):
        model = keras.Sequential([keras.Input((6,)), FeedForward(12), keras.layers.Dense(2)])
        x = np.random.default_rng(4).normal(size=(5, 6)).astype("float32")
        upcycled = upcycling.upcycle_model(model, num_experts=3, top_k=2)
        self.assertIsInstance(upcycled.layers[0], SparseMoE)
        self.assertAllClose(upcycled.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-5)

        class Subclassed(keras.Model):
            def call(self, inputs):
                return inputs

        with self.assertRaisesRegex(ValueError, "Sequential or Functional"):
            upcycling.upcycle_model(Subclassed(), 4)
