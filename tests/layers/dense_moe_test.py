import os

import keras
import numpy as np
from keras.src import testing

from keras_moe import DenseMoE
from keras_moe import SparseMoE
from tests.reference import expert_weights_of
from tests.reference import naive_expert
from tests.reference import softmax
from tests.utils import to_numpy


class DenseMoETest(testing.TestCase):
    def test_layer_basics(self):
        self.run_layer_test(
            DenseMoE,
            init_kwargs={"num_experts": 3, "intermediate_dim": 8},
            input_shape=(2, 5, 4),
            expected_output_shape=(2, 5, 4),
            expected_num_trainable_weights=5,  # gate + 4 expert weights
            expected_num_seed_generators=1,
            supports_masking=True,
        )

    def test_hand_computed_linear_experts(self):
        # Gate kernel = identity, expert e computes (e + 1) * x.
        moe = DenseMoE(2, 2, activation="linear")
        moe.build((None, 2))
        moe.router.kernel.assign(np.eye(2, dtype="float32"))
        eye = np.eye(2, dtype="float32")
        moe.experts.intermediate_kernel.assign(np.stack([eye, eye]))
        moe.experts.output_kernel.assign(np.stack([eye, 2 * eye]))
        x = np.array([[2.0, 0.0], [0.0, 1.0]], "float32")
        g = softmax(x)  # gates = softmax of the token itself
        expected = x * (g[:, :1] * 1.0 + g[:, 1:] * 2.0)
        self.assertAllClose(moe(x), expected, atol=1e-6)

    def test_agrees_with_reference_and_with_sparse_top_k_equal_to_e(self):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(2, 5, 4)).astype("float32")
        moe = DenseMoE(3, 6, gated=True, activation="silu")
        outputs = to_numpy(moe(x))
        tokens = x.reshape(-1, 4).astype(np.float64)
        gates = softmax(tokens @ moe.router.kernel.numpy())
        weights = {k: np.asarray(v, np.float64) for k, v in expert_weights_of(moe).items()}
        expected = np.stack(
            [
                sum(gates[t, e] * naive_expert(tokens[t], e, weights, "silu", True) for e in range(3))
                for t in range(len(tokens))
            ]
        ).reshape(x.shape)
        self.assertAllClose(outputs, expected, atol=2e-5)
        # The documented SparseMoE configuration computes the same.
        sparse = SparseMoE(
            3, 6, top_k=3, gated=True, activation="silu", capacity_factor=None,
            eval_capacity_factor=None, load_balance_loss_weight=0.0,
        )
        sparse.build(x.shape)
        sparse.router.kernel.assign(moe.router.kernel.numpy())
        for source, target in zip(moe.experts.weights, sparse.experts.weights):
            target.assign(source.numpy())
        self.assertAllClose(sparse(x), outputs, atol=1e-5)

    def test_mask_zeroes_padding(self):
        x = np.random.default_rng(1).normal(size=(2, 3, 4)).astype("float32")
        mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
        moe = DenseMoE(2, 4)
        outputs = to_numpy(moe(x, mask=mask))
        self.assertAllClose(outputs[~mask], np.zeros((3, 4)))
        self.assertAllClose(outputs[mask], to_numpy(moe(x))[mask], atol=1e-6)

    def test_parameter_count(self):
        moe = DenseMoE(4, 16)
        moe.build((None, 8))
        # gate 8*4; experts 4*(8*16 + 16 + 16*8 + 8).
        self.assertEqual(moe.count_params(), 8 * 4 + 4 * (8 * 16 + 16 + 16 * 8 + 8))

    def test_save_and_load(self):
        inputs = keras.Input((5, 4))
        model = keras.Model(inputs, DenseMoE(3, 8, expert_dropout=0.1, router_jitter_noise=0.01)(inputs))
        x = np.random.default_rng(2).normal(size=(2, 5, 4)).astype("float32")
        path = os.path.join(self.get_temp_dir(), "dense.keras")
        model.save(path)
        restored = keras.saving.load_model(path)
        self.assertAllClose(restored.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
        self.assertEqual(restored.layers[1].get_config(), model.layers[1].get_config())

    def test_invalid_arguments(self):
        for kwargs, message in [
            ({"num_experts": 0}, "num_experts=0"),
            ({"intermediate_dim": -1}, "intermediate_dim=-1"),
            ({"expert_dropout": 1.5}, "expert_dropout=1.5"),
            ({"router_jitter_noise": -0.1}, "router_jitter_noise=-0.1"),
        ]:
            with self.assertRaisesRegex(ValueError, message):
                DenseMoE(**{"num_experts": 2, "intermediate_dim": 4, **kwargs})
