import numpy as np
from keras.src import testing

from keras_moe import ExpertFFN
from keras_moe import FeedForward
from tests.reference import ACTIVATIONS
from tests.utils import to_numpy


class ExpertFFNTest(testing.TestCase):
    def test_layer_basics(self):
        self.run_layer_test(
            ExpertFFN,
            init_kwargs={"num_experts": 3, "intermediate_dim": 8},
            input_shape=(3, 5, 4),
            expected_output_shape=(3, 5, 4),
            expected_num_trainable_weights=4,
            expected_num_non_trainable_weights=0,
        )

    def test_layer_basics_gated_with_dropout(self):
        self.run_layer_test(
            ExpertFFN,
            init_kwargs={
                "num_experts": 2, "intermediate_dim": 6, "gated": True,
                "activation": "silu", "dropout": 0.1, "use_bias": False,
            },
            input_shape=(2, 3, 4),
            expected_output_shape=(2, 3, 4),
            expected_num_trainable_weights=3,
            expected_num_seed_generators=1,
        )

    def test_each_expert_transforms_only_its_buffer(self):
        layer = ExpertFFN(num_experts=2, intermediate_dim=2, activation="linear")
        layer.build((2, None, 2))
        eye = np.eye(2, dtype="float32")
        layer.intermediate_kernel.assign(np.stack([eye, 2 * eye]))
        layer.output_kernel.assign(np.stack([eye, 3 * eye]))
        layer.output_bias.assign(np.array([[0.0, 0.0], [1.0, 1.0]]))
        x = np.array([[[1.0, 2.0]], [[1.0, 2.0]]], "float32")
        # Expert 0: x; expert 1: 6x + 1.
        self.assertAllClose(layer(x), [[[1.0, 2.0]], [[7.0, 13.0]]])

    def test_gated_matches_formula(self):
        rng = np.random.default_rng(0)
        layer = ExpertFFN(3, 5, activation="silu", gated=True)
        x = rng.normal(size=(3, 4, 6)).astype("float32")
        y = to_numpy(layer(x))
        w = {v.name: v.numpy() for v in layer.weights}
        silu = ACTIVATIONS["silu"]
        for e in range(3):
            hidden = silu(x[e] @ w["gate_kernel"][e] + w["gate_bias"][e]) * (
                x[e] @ w["intermediate_kernel"][e] + w["intermediate_bias"][e]
            )
            expected = hidden @ w["output_kernel"][e] + w["output_bias"][e]
            self.assertAllClose(y[e], expected, atol=1e-5)

    def test_initializer_fans_are_per_expert(self):
        # Glorot uniform over (d, h) = (64, 64): variance 2 / (64 + 64).
        layer = ExpertFFN(num_experts=64, intermediate_dim=64)
        layer.build((64, None, 64))
        variance = float(np.var(layer.intermediate_kernel.numpy()))
        self.assertAllClose(variance, 2.0 / 128, rtol=0.05)
        # Experts start different from each other.
        kernel = layer.intermediate_kernel.numpy()
        self.assertGreater(np.abs(kernel[0] - kernel[1]).max(), 1e-3)

    def test_parameter_count(self):
        layer = ExpertFFN(num_experts=4, intermediate_dim=16, gated=True)
        layer.build((4, None, 8))
        expected = (
            4 * 8 * 16  # intermediate_kernel
            + 4 * 16  # intermediate_bias
            + 4 * 8 * 16  # gate_kernel
            + 4 * 16  # gate_bias
            + 4 * 16 * 8  # output_kernel
            + 4 * 8  # output_bias
        )
        self.assertEqual(layer.count_params(), expected)

    def test_invalid_arguments(self):
        with self.assertRaisesRegex(ValueError, "num_experts=0"):
            ExpertFFN(0, 4)
        with self.assertRaisesRegex(ValueError, "intermediate_dim=-1"):
            ExpertFFN(2, -1)
        with self.assertRaisesRegex(ValueError, "activation='swoosh'"):
            ExpertFFN(2, 4, activation="swoosh")
        with self.assertRaisesRegex(ValueError, "dropout=1.5"):
            ExpertFFN(2, 4, dropout=1.5)
        with self.assertRaisesRegex(ValueError, "num_experts=3"):
            ExpertFFN(3, 4)(np.ones((2, 5, 4), "float32"))


class FeedForwardTest(testing.TestCase):
    def test_layer_basics(self):
        self.run_layer_test(
            FeedForward,
            init_kwargs={"intermediate_dim": 8, "gated": True},
            input_shape=(2, 3, 4),
            expected_output_shape=(2, 3, 4),
            expected_num_trainable_weights=6,
        )

    def test_equals_one_expert(self):
        rng = np.random.default_rng(1)
        dense = FeedForward(intermediate_dim=5, activation="relu")
        experts = ExpertFFN(num_experts=1, intermediate_dim=5, activation="relu")
        x = rng.normal(size=(7, 3)).astype("float32")
        dense.build((None, 3))
        experts.build((1, None, 3))
        for source, target in zip(dense.weights, experts.weights):
            self.assertEqual(source.name, target.name)
            target.assign(source.numpy()[None])
        self.assertAllClose(dense(x), experts(x[None])[0], atol=1e-6)
