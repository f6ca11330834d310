import os

import keras
import numpy as np
from keras.src import testing

from keras_moe import ExpertChoiceRouter
from keras_moe import SparseMoE
from tests.reference import expert_weights_of
from tests.reference import naive_expert_choice_moe
from tests.utils import to_numpy


class ExpertChoiceRouterTest(testing.TestCase):
    def test_layer_basics(self):
        self.run_layer_test(
            ExpertChoiceRouter,
            init_kwargs={"num_experts": 4, "top_k": 2},
            input_shape=(3, 5, 8),
            expected_output_shape={
                # Default capacity ceil(5 * 2 / 4) = 3.
                "token_index": (3, 4, 3),
                "combine_weights": (3, 4, 3),
                "kept": (3, 4, 3),
                "router_logits": (3, 5, 4),
                "router_probs": (3, 5, 4),
            },
            expected_num_trainable_weights=1,
            expected_num_seed_generators=1,
            run_training_check=False,
            run_mixed_precision_check=False,
        )

    def test_refuses_ungrouped_tokens_and_bad_capacity(self):
        router = ExpertChoiceRouter(4, 1)
        with self.assertRaisesRegex(ValueError, r"inputs.shape=\(5, 8\)"):
            router(np.ones((5, 8), "float32"))
        with self.assertRaisesRegex(ValueError, "capacity=6"):
            router(np.ones((1, 5, 8), "float32"), capacity=6)


class SparseMoEExpertChoiceTest(testing.TestCase):
    def test_agrees_with_naive_reference(self):
        rng = np.random.default_rng(0)
        inputs = rng.normal(size=(2, 6, 4)).astype("float32")
        # 12 tokens in groups of 6; C = ceil(1.0 * 6 * 1 / 3) = 2.
        moe = SparseMoE(
            3, 8, top_k=1, router="expert_choice", group_size=6,
            eval_capacity_factor=1.0, min_capacity=1, activation="relu",
        )
        outputs = to_numpy(moe(inputs))
        expected, chosen = naive_expert_choice_moe(
            inputs, moe.router.kernel.numpy(), expert_weights_of(moe),
            capacity=2, group_size=6, activation="relu",
        )
        self.assertAllClose(outputs, expected, atol=2e-5, rtol=2e-5)
        routing = moe.route(inputs)
        weights = to_numpy(routing["expert_weights"]).reshape(-1, 3)
        self.assertEqual((weights > 0).tolist(), chosen.tolist())

    def test_every_expert_gets_exactly_capacity_tokens(self):
        rng = np.random.default_rng(2)
        inputs = rng.normal(size=(4, 8, 6)).astype("float32")
        # 32 tokens, one group; C = ceil(1.0 * 32 * 1 / 8) = 4.
        moe = SparseMoE(
            8, 8, top_k=1, router="expert_choice", capacity_factor=1.0,
            min_capacity=1,
        )
        moe.build(inputs.shape)
        moe.router.kernel.assign(rng.normal(size=(6, 8)).astype("float32") * 2)
        routing = moe.route(inputs, training=True)
        kept = to_numpy(routing["kept"])
        self.assertEqual(kept.shape, (1, 8, 4))
        self.assertEqual(kept.sum(axis=-1).tolist(), [[4] * 8])
        index = to_numpy(routing["token_index"])
        for chosen in index[0]:
            self.assertLen(set(chosen.tolist()), 4)
        per_token = (to_numpy(routing["expert_weights"]) > 0).sum(-1)
        self.assertEqual(per_token.sum(), 32)
        # As many slots as tokens, yet (with these weights) 6 tokens get no
        # expert and one gets 3.
        self.assertEqual(np.bincount(per_token.reshape(-1)).tolist(), [6, 21, 4, 1])

        moe(inputs, training=True)
        stats = moe.routing_statistics()
        self.assertAllClose(stats["load_imbalance"], 1.0)
        self.assertAllClose(stats["expert_load"], np.full(8, 1 / 8))
        self.assertAllClose(stats["dropped_fraction"], 6 / 32)
        self.assertAllClose(stats["dropped_assignments"], 6.0)
        # No Switch loss by default; only the z-loss.
        self.assertEqual(moe.load_balance_loss_weight, 0.0)
        self.assertLen(moe.losses, 1)

    def test_padding_is_not_chosen_and_outputs_zeros(self):
        rng = np.random.default_rng(2)
        inputs = rng.normal(size=(2, 5, 4)).astype("float32")
        mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0]], bool)
        moe = SparseMoE(2, 8, top_k=1, router="expert_choice", eval_capacity_factor=1.0, min_capacity=1)
        outputs = to_numpy(moe(inputs, mask=mask))
        self.assertAllClose(outputs[~mask], np.zeros((3, 4)))
        changed = inputs.copy()
        changed[~mask] = 50.0
        self.assertAllClose(moe(changed, mask=mask), outputs, atol=1e-6)

    def test_refused_where_causality_is_declared(self):
        with self.assertRaisesRegex(ValueError, "ExpertChoiceRouter compares tokens.*causal=True"):
            SparseMoE(4, 8, router="expert_choice", causal=True)
        with self.assertRaisesRegex(ValueError, "priority='k_major' with router ExpertChoiceRouter"):
            SparseMoE(4, 8, router="expert_choice", priority="k_major")

    def test_trains_and_survives_keras_save_and_load(self):
        rng = np.random.default_rng(3)
        x = rng.normal(size=(8, 6, 4)).astype("float32")
        inputs = keras.Input((None, 4))
        moe = SparseMoE(4, 8, top_k=2, router="expert_choice", group_size=6)
        model = keras.Model(inputs, keras.layers.Dense(2)(moe(inputs)))
        model.compile("adam", "mse")
        history = model.fit(x, rng.normal(size=(8, 6, 2)), batch_size=4, epochs=1, verbose=0)
        self.assertTrue(np.isfinite(history.history["loss"][0]))
        expected = to_numpy(model.predict(x, verbose=0))
        path = os.path.join(self.get_temp_dir(), "ec.keras")
        model.save(path)
        restored = keras.saving.load_model(path)
        self.assertIsInstance(restored.layers[1].router, ExpertChoiceRouter)
        self.assertEqual(restored.layers[1].get_config()["router"], "expert_choice")
        self.assertAllClose(restored.predict(x, verbose=0), expected, atol=1e-6)
