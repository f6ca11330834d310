import os

import keras
import numpy as np
from keras.src import testing

import keras_moe
from keras_moe import BiasBalancedRouter
from keras_moe import SparseMoE
from keras_moe import TopKRouter
from tests.utils import to_numpy


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


class BiasBalancedRouterTest(testing.TestCase):
    def test_layer_basics(self):
        self.run_layer_test(
            BiasBalancedRouter,
            init_kwargs={"num_experts": 4, "top_k": 2},
            input_shape=(3, 5, 8),
            expected_output_shape={
                "expert_index": (3, 5, 2),
                "combine_weights": (3, 5, 2),
                "router_logits": (3, 5, 4),
                "router_probs": (3, 5, 4),
                "router_scores": (3, 5, 4),
            },
            expected_num_trainable_weights=1,
            expected_num_non_trainable_weights=1,  # expert_bias
            expected_num_seed_generators=1,
            run_training_check=False,
            run_mixed_precision_check=False,
        )

    def test_hand_computed_sigmoid_selection_and_weights(self):
        router = BiasBalancedRouter(3, 2, routed_scaling_factor=2.5)
        router.build((None, 3))
        router.kernel.assign(np.eye(3, dtype="float32"))
        router.expert_bias.assign(np.array([0.0, -0.5, 0.0], "float32"))
        logits = np.array([[2.0, 1.5, 0.0]], "float32")
        out = router(logits)  # identity kernel: logits = tokens
        scores = sigmoid(logits[0])  # [0.881, 0.818, 0.5]
        # Biased scores [0.881, 0.318, 0.5]: experts 0 and 2, not 1.
        self.assertEqual(to_numpy(out["expert_index"]).tolist(), [[0, 2]])
        chosen = scores[[0, 2]]
        self.assertAllClose(
            out["combine_weights"], [2.5 * chosen / chosen.sum()], atol=1e-6
        )
        self.assertAllClose(out["router_scores"], [scores], atol=1e-6)
        self.assertAllClose(out["router_probs"], [scores / scores.sum()], atol=1e-6)

    def test_very_negative_logits_give_finite_normalised_weights(self):
        # Logits far below -104: every float32 sigmoid is 0. The normalised
        # weights and probabilities are still the ratios of the scores,
        # sigmoid(l_i) / sum_j sigmoid(l_j) ~ exp(l_i) / sum_j exp(l_j),
        # not 0 / 0.
        router = BiasBalancedRouter(3, 2, routed_scaling_factor=2.5)
        router.build((None, 3))
        router.kernel.assign(np.eye(3, dtype="float32"))
        logits = np.array([[-200.0, -201.0, -1e4], [1e4, -1e4, 3.0]], "float32")
        out = router(logits)
        for name in ("combine_weights", "router_probs", "router_scores"):
            self.assertTrue(np.isfinite(to_numpy(out[name])).all(), name)
        self.assertEqual(to_numpy(out["expert_index"]).tolist(), [[0, 1], [0, 2]])
        ratio = np.exp([-200.0, -201.0]) / np.exp([-200.0, -201.0]).sum()
        self.assertAllClose(out["combine_weights"][0], 2.5 * ratio, atol=1e-6)
        self.assertAllClose(out["router_probs"][0], list(ratio) + [0.0], atol=1e-6)
        # Saturated sigmoids, 1 and sigmoid(3): the usual ratios.
        chosen = np.array([1.0, sigmoid(3.0)])
        self.assertAllClose(
            out["combine_weights"][1], 2.5 * chosen / chosen.sum(), atol=1e-6
        )

    def test_softmax_scores_without_normalisation(self):
        router = BiasBalancedRouter(
            3, 1, score_function="softmax", normalize_weights=False
        )
        router.build((None, 3))
        router.kernel.assign(np.eye(3, dtype="float32"))
        router.expert_bias.assign(np.array([-1.0, 0.0, 0.0], "float32"))
        logits = np.array([[1.0, 0.5, 0.0]], "float32")
        probs = np.exp(logits) / np.exp(logits).sum()
        out = router(logits)
        self.assertEqual(to_numpy(out["expert_index"]).tolist(), [[1]])
        self.assertAllClose(out["combine_weights"], [[probs[0, 1]]], atol=1e-6)

    def test_update_balancing_state_by_hand(self):
        router = BiasBalancedRouter(4, 1, bias_update_rate=0.1)
        routing = {"expert_index": np.array([[0], [0], [0], [1], [3]], "int32")}
        router.build((None, 2))
        # Without the masked last token the counts are [3, 1, 0, 0], mean
        # 1: expert 1 is exactly at the mean and keeps its bias.
        router.update_balancing_state(routing, np.array([1, 1, 1, 1, 0], bool))
        self.assertAllClose(router.expert_bias, [-0.1, 0.0, 0.1, 0.1])
        # With it [3, 1, 0, 1], mean 1.25.
        router.update_balancing_state(routing)
        self.assertAllClose(router.expert_bias, [-0.2, 0.1, 0.2, 0.2])

    def test_bias_updates_inside_fit(self):
        # Every token prefers expert 0: one fit step moves the bias by
        # gamma * sign(mean - load) = gamma * [-1, +1, +1, +1].
        moe = SparseMoE(
            4, 4, top_k=1, router=BiasBalancedRouter(4, 1, bias_update_rate=0.05),
            capacity_factor=None,
        )
        model = keras.Sequential([keras.Input((3, 2)), moe])
        moe.router.kernel.assign(np.array([[5.0, 0.0, 0.0, 0.0]] * 2, "float32"))
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
        x = np.ones((4, 3, 2), "float32")
        model.fit(x, x, batch_size=4, epochs=1, verbose=0)
        self.assertAllClose(moe.router.expert_bias, [-0.05, 0.05, 0.05, 0.05])
        self.assertNotIn(
            moe.router.expert_bias.path, [v.path for v in model.trainable_weights]
        )
        # Two more steps: still all on expert 0 (its score leads by ~0.5).
        model.fit(x, x, batch_size=2, epochs=1, verbose=0)
        self.assertAllClose(moe.router.expert_bias, [-0.15, 0.15, 0.15, 0.15])
        # Inference never moves it.
        model.predict(x, verbose=0)
        moe(x)
        self.assertAllClose(moe.router.expert_bias, [-0.15, 0.15, 0.15, 0.15])

    def test_balances_a_skewed_toy_problem_without_any_loss(self):
        # Tokens share an offset that the router kernel turns into a large
        # logit for expert 0: plain top-1 sends about 60% of the tokens
        # there (max load / mean load ~2.4 of at most 4). Both layers train
        # 40 steps with no auxiliary loss at all.
        rng = np.random.default_rng(0)
        x = (rng.normal(size=(256, 8, 8)) + 0.25).astype("float32")
        y = rng.normal(size=(256, 8, 8)).astype("float32")
        kernel = rng.normal(size=(8, 4)).astype("float32") * 0.35
        kernel[:, 0] += 0.75

        def imbalance_after_training(router):
            moe = SparseMoE(
                4, 8, top_k=1, router=router, capacity_factor=None,
                eval_capacity_factor=None, load_balance_loss_weight=0.0,
                z_loss_weight=0.0,
            )
            model = keras.Sequential([keras.Input((8, 8)), moe])
            moe.router.kernel.assign(kernel)
            model.compile(optimizer=keras.optimizers.SGD(0.01), loss="mse")
            model.fit(x, y, batch_size=32, epochs=5, verbose=0)
            self.assertEqual(len(moe.losses), 0)
            index = to_numpy(moe.route(x)["expert_index"]).reshape(-1)
            counts = np.bincount(index, minlength=4)
            return counts.max() / counts.mean()

        plain = imbalance_after_training(TopKRouter(4, 1))
        balanced = imbalance_after_training(
            BiasBalancedRouter(4, 1, bias_update_rate=0.02)
        )
        self.assertGreater(plain, 2.0)
        self.assertLess(balanced, 1.4)
        self.assertLess(balanced, 0.6 * plain)

    def test_sequence_balance_loss_is_added_and_logged(self):
        x = np.random.default_rng(1).normal(size=(2, 6, 4)).astype("float32")
        off = SparseMoE(4, 8, top_k=2, router="bias_balanced", group_size=6)
        off(x, training=True)
        # Only the z-loss: no Switch loss, sequence loss weight 0.
        self.assertLen(off.losses, 1)
        self.assertIn("sequence_balance_loss", off.routing_statistics())
        router = BiasBalancedRouter(4, 2, sequence_balance_loss_weight=0.5)
        on = SparseMoE(4, 8, top_k=2, router=router, group_size=6, z_loss_weight=0.0)
        on(x, training=True)
        self.assertLen(on.losses, 1)
        stats = on.routing_statistics()
        self.assertAllClose(on.losses[0], 0.5 * stats["sequence_balance_loss"], atol=1e-6)
        self.assertGreaterEqual(stats["sequence_balance_loss"], 1.0 - 1e-6)

    def test_sequence_balance_loss_gradient_with_vanishing_scores(self):
        # Router logits of magnitude 1e4: some tokens have every sigmoid
        # score 0. The loss normalises each token's scores; its gradient
        # must stay finite (a guarded division by a sum of zeros is not:
        # XLA flushes the tiny squared denominator to 0, giving 0 / 0).
        rng = np.random.default_rng(2)
        x = rng.normal(size=(4, 6, 3)).astype("float32")
        x[0] = np.abs(x[0])  # with a negative kernel: all logits < -104
        router = BiasBalancedRouter(4, 2, sequence_balance_loss_weight=1.0)
        moe = SparseMoE(
            4, 8, top_k=2, router=router, group_size=6, z_loss_weight=0.0,
        )
        inputs = keras.Input((6, 3))
        model = keras.Model(inputs, moe(inputs))
        kernel = -np.abs(rng.normal(size=(3, 4))) * 1e4
        router.kernel.assign(kernel.astype("float32"))
        self.assertTrue((to_numpy(router(x)["router_scores"])[0] == 0).all())
        model.compile(optimizer=keras.optimizers.SGD(1e-3), loss="mse")
        model.train_on_batch(x, x)
        for variable in model.trainable_variables:
            self.assertTrue(np.isfinite(to_numpy(variable)).all(), variable.path)

    def test_bias_survives_keras_save_and_load(self):
        inputs = keras.Input((5, 4))
        moe = SparseMoE(4, 8, top_k=2, router=BiasBalancedRouter(4, 2, bias_update_rate=0.1))
        model = keras.Model(inputs, moe(inputs))
        x = np.random.default_rng(2).normal(size=(3, 5, 4)).astype("float32")
        for _ in range(3):
            moe(x, training=True)
        bias = moe.router.expert_bias.numpy()
        self.assertGreater(np.abs(bias).max(), 0.0)
        path = os.path.join(self.get_temp_dir(), "bias.keras")
        model.save(path)
        restored = keras.saving.load_model(path)
        self.assertAllClose(restored.layers[1].router.expert_bias, bias)
        self.assertAllClose(restored.predict(x, verbose=0), model.predict(x, verbose=0), atol=1e-6)

    def test_invalid_arguments(self):
        cases = [
            ({"score_function": "tanh"}, "score_function='tanh'"),
            ({"bias_update_rate": -0.1}, "bias_update_rate=-0.1"),
            ({"routed_scaling_factor": 0.0}, "routed_scaling_factor=0.0"),
            ({"sequence_balance_loss_weight": -1.0}, "sequence_balance_loss_weight=-1.0"),
        ]
        for kwargs, message in cases:
            with self.assertRaisesRegex(ValueError, message):
                BiasBalancedRouter(4, 2, **kwargs)

    def test_config_round_trip(self):
        router = BiasBalancedRouter(
            8, 3, score_function="softmax", bias_update_rate=0.01,
            normalize_weights=False, routed_scaling_factor=2.5,
            sequence_balance_loss_weight=1e-4, seed=3,
        )
        restored = BiasBalancedRouter.from_config(router.get_config())
        self.assertEqual(restored.get_config(), router.get_config())
        self.assertIs(keras_moe.BiasBalancedRouter, BiasBalancedRouter)
