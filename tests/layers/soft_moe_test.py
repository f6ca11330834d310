import os

import keras
import numpy as np
from keras.src import testing

from keras_moe import SoftMoE
from tests.reference import expert_weights_of
from tests.reference import naive_expert
from tests.utils import to_numpy


def softmax(x, axis):
    x = x - x.max(axis=axis, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=axis, keepdims=True)


def naive_soft_moe(x, slot_kernel, expert_weights, slots_per_expert, activation):
    """Soft MoE one sequence and one slot at a time, float64."""
    weights = {k: np.asarray(v, np.float64) for k, v in expert_weights.items()}
    outputs = []
    for sequence in np.asarray(x, np.float64):
        logits = sequence @ slot_kernel.astype(np.float64)  # (m, n)
        dispatch = softmax(logits, axis=0)
        combine = softmax(logits, axis=1)
        slots = dispatch.T @ sequence  # (n, d)
        slot_outputs = np.stack(
            [
                naive_expert(slot, j // slots_per_expert, weights, activation, False)
                for j, slot in enumerate(slots)
            ]
        )
        outputs.append(combine @ slot_outputs)
    return np.stack(outputs)


class SoftMoETest(testing.TestCase):
    def test_layer_basics(self):
        self.run_layer_test(
            SoftMoE,
            init_kwargs={"num_experts": 3, "intermediate_dim": 8, "slots_per_expert": 2},
            input_shape=(2, 5, 4),
            expected_output_shape=(2, 5, 4),
            expected_num_trainable_weights=5,  # slot kernel + 4 expert weights
            expected_num_seed_generators=0,
            supports_masking=True,
        )

    def test_agrees_with_naive_reference(self):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(3, 7, 4)).astype("float32")
        moe = SoftMoE(3, 8, slots_per_expert=2, activation="relu")
        outputs = to_numpy(moe(x))
        expected = naive_soft_moe(
            x, moe.slot_kernel.numpy(), expert_weights_of(moe), 2, "relu"
        )
        self.assertAllClose(outputs, expected, atol=2e-5, rtol=2e-5)

    def test_hand_computed_one_slot(self):
        # One expert, one slot, zero slot kernel: the slot is the mean token
        # and every token's output is the expert applied to it.
        moe = SoftMoE(1, 2, activation="linear", slot_initializer="zeros")
        moe.build((None, 2, 2))
        eye = np.eye(2, dtype="float32")[None]
        moe.experts.intermediate_kernel.assign(eye)
        moe.experts.output_kernel.assign(3 * eye)
        x = np.array([[[1.0, 2.0], [3.0, 0.0]]], "float32")
        self.assertAllClose(moe(x), [[[6.0, 3.0], [6.0, 3.0]]], atol=1e-6)

    def test_image_shaped_tokens_and_mask(self):
        rng = np.random.default_rng(1)
        x = rng.normal(size=(2, 2, 3, 4)).astype("float32")
        moe = SoftMoE(2, 8, normalize=True)
        flat = to_numpy(moe(x.reshape(2, 6, 4))).reshape(x.shape)
        self.assertAllClose(moe(x), flat, atol=1e-6)
        # Padding takes no part in any slot and outputs zeros.
        mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
        tokens = x.reshape(2, 6, 4)
        outputs = to_numpy(moe(tokens, mask=mask))
        self.assertAllClose(outputs[0, 4:], np.zeros((2, 4)))
        changed = tokens.copy()
        changed[0, 4:] = 100.0
        self.assertAllClose(moe(changed, mask=mask), outputs, atol=1e-5)
        self.assertAllClose(moe(tokens[:1, :4]), outputs[:1, :4], atol=1e-5)

    def test_parameter_count_and_flags(self):
        moe = SoftMoE(4, 16, slots_per_expert=2, normalize=True)
        moe.build((None, None, 8))
        # slot kernel 8 * (4 * 2), scale 1, experts 4 * (8*16 + 16 + 16*8 + 8).
        self.assertEqual(
            moe.count_params(), 8 * 8 + 1 + 4 * (8 * 16 + 16 + 16 * 8 + 8)
        )
        self.assertTrue(SoftMoE.compares_tokens)

    def test_trains_and_survives_keras_save_and_load(self):
        rng = np.random.default_rng(2)
        x = rng.normal(size=(8, 5, 4)).astype("float32")
        inputs = keras.Input((5, 4))
        model = keras.Model(inputs, SoftMoE(3, 8, slots_per_expert=2, normalize=True)(inputs))
        model.compile("adam", "mse")
        model.fit(x, rng.normal(size=x.shape), batch_size=4, epochs=1, verbose=0)
        path = os.path.join(self.get_temp_dir(), "soft.keras")
        model.save(path)
        restored = keras.saving.load_model(path)
        self.assertAllClose(restored.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)
        self.assertEqual(restored.layers[1].get_config(), model.layers[1].get_config())

    def test_invalid_arguments_and_inputs(self):
        for kwargs, message in [
            ({"num_experts": 0}, "num_experts=0"),
            ({"slots_per_expert": 0}, "slots_per_expert=0"),
            ({"expert_dropout": -0.1}, "expert_dropout=-0.1"),
        ]:
            with self.assertRaisesRegex(ValueError, message):
                SoftMoE(**{"num_experts": 2, "intermediate_dim": 4, **kwargs})
        with self.assertRaisesRegex(ValueError, r"rank >= 3.*input_shape=\(4, 8\)"):
            SoftMoE(2, 4)(np.ones((4, 8), "float32"))
