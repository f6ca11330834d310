import os

import keras
import numpy as np
from absl.testing import parameterized
from keras import ops
from keras.src import testing

import keras_moe
from keras_moe import SparseMoE
from keras_moe import TopKRouter
from tests.reference import expert_weights_of
from tests.reference import naive_moe
from tests.reference import naive_route
from tests.utils import snapshot
from tests.utils import to_numpy


def tiny_moe(**kwargs):
    """4 tokens, 2 experts, d=2 with hand-set weights.

    Router kernel = identity, so token x has logits x. Expert e is linear:
    it computes (e + 1) * x.
    """
    config = dict(
        num_experts=2, intermediate_dim=2, top_k=1, activation="linear",
        min_capacity=1, load_balance_loss_weight=0.0, z_loss_weight=0.0,
    )
    config.update(kwargs)
    moe = SparseMoE(**config)
    moe.build((None, 2))
    moe.router.kernel.assign(np.eye(2, dtype="float32"))
    eye = np.eye(2, dtype="float32")
    moe.experts.intermediate_kernel.assign(np.stack([eye, eye]))
    moe.experts.output_kernel.assign(np.stack([eye, 2 * eye]))
    for bias in (moe.experts.intermediate_bias, moe.experts.output_bias):
        bias.assign(np.zeros(bias.shape, "float32"))
    return moe


TINY_TOKENS = np.array([[2.0, 0.0], [0.0, 1.0], [1.0, 0.0], [0.0, 3.0]], "float32")


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


class SparseMoEBasicsTest(testing.TestCase):
    def test_layer_basics(self):
        self.run_layer_test(
            SparseMoE,
            init_kwargs={"num_experts": 4, "intermediate_dim": 8, "top_k": 2},
            input_shape=(2, 6, 4),
            expected_output_shape=(2, 6, 4),
            # Router kernel + 4 expert weights.
            expected_num_trainable_weights=5,
            # routing_steps + one running sum per statistic.
            expected_num_non_trainable_weights=1 + len(keras_moe.layers.sparse_moe.STATISTICS),
            expected_num_seed_generators=1,
            supports_masking=True,
        )

    def test_symbolic_input_with_none_batch(self):
        inputs = keras.Input((None, 8))
        outputs = SparseMoE(4, 16)(inputs)
        self.assertEqual(tuple(outputs.shape), (None, None, 8))
        model = keras.Model(inputs, outputs)
        self.assertEqual(tuple(model.predict(np.ones((3, 5, 8)), verbose=0).shape), (3, 5, 8))

    def test_parameter_count(self):
        moe = SparseMoE(num_experts=8, intermediate_dim=32, top_k=2, gated=True)
        moe.build((None, 16))
        trainable = (
            16 * 8  # router kernel (no bias)
            + 8 * 16 * 32  # intermediate_kernel
            + 8 * 32  # intermediate_bias
            + 8 * 16 * 32  # gate_kernel
            + 8 * 32  # gate_bias
            + 8 * 32 * 16  # output_kernel
            + 8 * 16  # output_bias
        )
        statistics = 1 + 5 + 8  # routing_steps, 5 scalar sums, expert_load (E,)
        self.assertEqual(
            sum(int(np.prod(v.shape)) for v in moe.trainable_weights), trainable
        )
        self.assertEqual(moe.count_params(), trainable + statistics)


class SparseMoERoutingTest(testing.TestCase):
    def test_hand_computed_top1_with_capacity_one(self):
        # Probabilities: t0 [0.881, 0.119] -> e0, t1 [0.269, 0.731] -> e1,
        # t2 [0.731, 0.269] -> e0, t3 [0.047, 0.953] -> e1.
        # Capacity ceil(0.5 * 4 * 1 / 2) = 1: t0 and t1 keep their slot, the
        # later tokens t2 and t3 find their expert full and are dropped.
        moe = tiny_moe(eval_capacity_factor=0.5)
        routing = moe.route(TINY_TOKENS)
        self.assertEqual(to_numpy(routing["expert_index"])[:, 0].tolist(), [0, 1, 0, 1])
        self.assertEqual(
            to_numpy(routing["kept"])[:, 0].tolist(), [True, True, False, False]
        )
        p = [sigmoid(2.0), sigmoid(1.0), sigmoid(1.0), sigmoid(3.0)]
        self.assertAllClose(to_numpy(routing["combine_weights"])[:, 0], p, atol=1e-6)
        expected = np.array(
            [[2.0 * p[0], 0.0], [0.0, 2.0 * p[1]], [0.0, 0.0], [0.0, 0.0]]
        )
        self.assertAllClose(moe(TINY_TOKENS), expected, atol=1e-6)

    def test_hand_computed_top2_priorities(self):
        # k=2, capacity 1. k-major: the first choices of t0 (e0) and t1 (e1)
        # take both slots; nothing else fits.
        moe = tiny_moe(top_k=2, eval_capacity_factor=0.25)
        kept = to_numpy(moe.route(TINY_TOKENS)["kept"])
        self.assertEqual(
            kept.tolist(),
            [[True, False], [True, False], [False, False], [False, False]],
        )
        # Token order (causal): t0 takes e0 and then e1 with its second
        # choice, so t1 finds both experts full.
        causal = tiny_moe(top_k=2, eval_capacity_factor=0.25, causal=True)
        kept = to_numpy(causal.route(TINY_TOKENS)["kept"])
        self.assertEqual(
            kept.tolist(),
            [[True, True], [False, False], [False, False], [False, False]],
        )
        p0 = sigmoid(2.0)
        # t0 = p0 * (1 * x) + (1 - p0) * (2 * x), x = [2, 0].
        self.assertAllClose(
            causal(TINY_TOKENS)[0], [2.0 * p0 + 4.0 * (1 - p0), 0.0], atol=1e-6
        )

    @parameterized.named_parameters(
        ("dropless_kmajor", None, None, "gelu", False, False),
        ("capacity_kmajor_groups", 0.6, 8, "gelu", False, False),
        ("capacity_gated_token_major", 0.75, 12, "silu", True, True),
        ("capacity_uneven_groups", 1.0, 7, "relu", False, False),
    )
    def test_agrees_with_naive_reference(
        self, capacity_factor, group_size, activation, gated, causal
    ):
        rng = np.random.default_rng(0)
        inputs = rng.normal(size=(3, 10, 6)).astype("float32")
        moe = SparseMoE(
            num_experts=5, intermediate_dim=7, top_k=2,
            eval_capacity_factor=capacity_factor, group_size=group_size,
            activation=activation, gated=gated, causal=causal, min_capacity=1,
        )
        outputs = to_numpy(moe(inputs))
        expected, kept, index = naive_moe(
            inputs, moe.router.kernel.numpy(), expert_weights_of(moe),
            top_k=2, capacity_factor=capacity_factor, min_capacity=1,
            group_size=group_size, activation=activation, gated=gated,
            priority="token_major" if causal else "k_major",
        )
        self.assertAllClose(outputs, expected, atol=2e-5, rtol=2e-5)
        routing = moe.route(inputs)
        self.assertEqual(
            to_numpy(routing["kept"]).reshape(-1, 2).tolist(), kept.tolist()
        )
        if capacity_factor is None:
            self.assertTrue(kept.all())
        else:
            # The small capacities really do drop something.
            self.assertFalse(kept.all())

    def test_mask_excludes_padding(self):
        rng = np.random.default_rng(1)
        inputs = rng.normal(size=(2, 6, 4)).astype("float32")
        mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 0, 0, 0, 0]], bool)
        moe = SparseMoE(4, 8, top_k=2, eval_capacity_factor=0.5, min_capacity=1)
        outputs = to_numpy(moe(inputs, mask=mask))
        self.assertAllClose(outputs[~mask], np.zeros((6, 4)))
        expected, _, _ = naive_moe(
            inputs, moe.router.kernel.numpy(), expert_weights_of(moe), top_k=2,
            capacity_factor=0.5, min_capacity=1, mask=mask,
        )
        self.assertAllClose(outputs, expected, atol=2e-5)
        # Padding changes nothing for the real tokens.
        changed = inputs.copy()
        changed[~mask] = 100.0
        self.assertAllClose(moe(changed, mask=mask), outputs, atol=1e-6)

    def test_keras_mask_is_used(self):
        tokens = np.array([[3, 5, 0, 0], [7, 0, 0, 0]])
        embedding = keras.layers.Embedding(10, 4, mask_zero=True)
        moe = SparseMoE(2, 4, top_k=1)
        outputs = to_numpy(moe(embedding(tokens)))
        self.assertAllClose(outputs[tokens == 0], np.zeros((5, 4)))
        self.assertGreater(np.abs(outputs[tokens != 0]).sum(), 0)

    def test_computes_only_routed_assignments(self):
        # 64 tokens, 8 experts, k=2, capacity factor 1: the experts see
        # 8 buffers of ceil(64 * 2 / 8) = 16 rows, 128 rows in all
        # (tokens * k), not tokens * experts = 512.
        moe = SparseMoE(8, 16, top_k=2, eval_capacity_factor=1.0)
        seen = []
        original_call = moe.experts.call

        def recording_call(inputs, training=None):
            seen.append(tuple(inputs.shape))
            return original_call(inputs, training=training)

        moe.experts.call = recording_call
        moe(np.ones((4, 16, 8), "float32"))
        self.assertEqual(seen, [(8, 16, 8)])

    def test_dropless_experts_see_one_row_per_assignment(self):
        # Dropless: 64 tokens, k=2 -> the experts get 128 rows sorted by
        # expert, whatever the number of experts (not 64 rows per expert).
        for num_experts in (4, 32):
            moe = SparseMoE(num_experts, 16, top_k=2, eval_capacity_factor=None)
            seen = []
            original_call = moe.experts.call

            def recording_call(inputs, training=None, group_sizes=None):
                seen.append((tuple(inputs.shape), int(ops.sum(group_sizes))))
                return original_call(
                    inputs, training=training, group_sizes=group_sizes
                )

            moe.experts.call = recording_call
            moe(np.ones((4, 16, 8), "float32"))
            self.assertEqual(seen, [((128, 8), 128)])

    def test_dropless_training_matches_a_capacity_that_drops_nothing(self):
        rng = np.random.default_rng(3)
        x = rng.normal(size=(4, 40, 16)).astype("float32")
        y = rng.normal(size=(4, 40, 16)).astype("float32")
        runs = []
        for capacity_factor in (None, 100.0):
            keras.utils.set_random_seed(0)
            inputs = keras.Input((40, 16))
            outputs = SparseMoE(
                num_experts=6, intermediate_dim=8, top_k=2, gated=True,
                capacity_factor=capacity_factor, group_size=32,
            )(inputs)
            model = keras.Model(inputs, outputs)
            model.compile(keras.optimizers.SGD(0.1), "mse")
            history = model.fit(x, y, epochs=2, batch_size=2, verbose=0, shuffle=False)
            runs.append((history.history["loss"], model.get_weights()))
        (dropless_loss, dropless_weights), (capacity_loss, capacity_weights) = runs
        self.assertAllClose(dropless_loss, capacity_loss, rtol=1e-5)
        for got, expected in zip(dropless_weights, capacity_weights):
            self.assertAllClose(got, expected, atol=1e-5)

    def test_batch_of_one_and_one_expert(self):
        moe = SparseMoE(num_experts=1, intermediate_dim=4, top_k=1)
        inputs = np.random.default_rng(2).normal(size=(1, 3, 5)).astype("float32")
        outputs = moe(inputs)
        # One expert with weight 1: the layer is that expert.
        expected = to_numpy(moe.experts(inputs.reshape(1, 3, 5))).reshape(1, 3, 5)
        self.assertAllClose(outputs, expected, atol=1e-6)


class SparseMoELossTest(testing.TestCase):
    def test_losses_equal_their_formulas(self):
        rng = np.random.default_rng(3)
        inputs = rng.normal(size=(2, 5, 4)).astype("float32")
        moe = SparseMoE(4, 8, top_k=2, load_balance_loss_weight=0.5, z_loss_weight=0.25)
        moe(inputs, training=True)
        self.assertLen(moe.losses, 2)
        logits, probs, index, _ = naive_route(inputs.reshape(-1, 4), moe.router.kernel.numpy(), 2)
        fractions = np.bincount(index.reshape(-1), minlength=4) / index.size
        balance = 4 * np.sum(fractions * probs.mean(0))
        log_z = np.log(np.exp(logits).sum(-1))
        z_loss = np.mean(log_z**2)
        self.assertAllClose(moe.losses[0], 0.5 * balance, atol=1e-5)
        self.assertAllClose(moe.losses[1], 0.25 * z_loss, atol=1e-5)

    def test_no_losses_at_inference_or_with_zero_weights(self):
        inputs = np.ones((2, 3, 4), "float32")
        moe = SparseMoE(4, 8)
        moe(inputs)
        self.assertLen(moe.losses, 0)
        off = SparseMoE(4, 8, load_balance_loss_weight=0.0, z_loss_weight=0.0)
        off(inputs, training=True)
        self.assertLen(off.losses, 0)

    @parameterized.named_parameters(
        ("sequential", "sequential"),
        ("functional", "functional"),
        ("subclassed", "subclassed"),
        ("nested", "nested"),
    )
    def test_balancing_losses_reach_fit_loss(self, kind):
        rng = np.random.default_rng(4)
        x = rng.normal(size=(8, 5, 4)).astype("float32")
        y = np.zeros((8, 5, 4), "float32")
        moe = SparseMoE(
            4, 8, top_k=2, capacity_factor=None, eval_capacity_factor=None,
            load_balance_loss_weight=0.5, z_loss_weight=0.25,
        )
        model = build_model(kind, moe)
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
        model.build((None, 5, 4)) if kind == "subclassed" else None
        prediction = to_numpy(model.predict(x, verbose=0))
        history = model.fit(x, y, batch_size=8, epochs=1, verbose=0)

        logits, probs, index, _ = naive_route(x.reshape(-1, 4), moe.router.kernel.numpy(), 2)
        fractions = np.bincount(index.reshape(-1), minlength=4) / index.size
        balance = 4 * np.sum(fractions * probs.mean(0))
        z_loss = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
        expected = np.mean(prediction**2) + 0.5 * balance + 0.25 * z_loss
        self.assertAllClose(history.history["loss"][0], expected, atol=1e-4)


class Wrapper(keras.layers.Layer):
    """A layer that owns a SparseMoE, to check nested losses propagate."""

    def __init__(self, moe, **kwargs):
        super().__init__(**kwargs)
        self.moe = moe

    def call(self, inputs, training=None):
        return self.moe(inputs, training=training)


class Subclassed(keras.Model):
    def __init__(self, moe, **kwargs):
        super().__init__(**kwargs)
        self.moe = moe

    def call(self, inputs, training=None):
        return self.moe(inputs, training=training)


def build_model(kind, moe):
    if kind == "sequential":
        return keras.Sequential([keras.Input((5, 4)), moe])
    if kind == "functional":
        inputs = keras.Input((5, 4))
        return keras.Model(inputs, moe(inputs))
    if kind == "subclassed":
        return Subclassed(moe)
    inputs = keras.Input((5, 4))
    return keras.Model(inputs, Wrapper(moe)(inputs))


class SparseMoETrainingTest(testing.TestCase):
    def test_gradients_reach_router_and_used_experts_only(self):
        # Balancing losses off: the router can only learn through the
        # combine weights. Expert 3's router column is very negative and all
        # token features are positive, so expert 3 never receives a token.
        rng = np.random.default_rng(5)
        x = np.abs(rng.normal(size=(16, 4, 6))).astype("float32") + 0.1
        y = rng.normal(size=(16, 4, 6)).astype("float32")
        moe = SparseMoE(
            4, 8, top_k=2, capacity_factor=None,
            load_balance_loss_weight=0.0, z_loss_weight=0.0,
        )
        model = keras.Sequential([keras.Input((4, 6)), moe])
        kernel = rng.normal(size=(6, 4)).astype("float32") * 0.1
        kernel[:, 3] = -10.0
        moe.router.kernel.assign(kernel)
        self.assertNotIn(3, to_numpy(moe.route(x)["expert_index"]).reshape(-1).tolist())
        before = snapshot(moe)
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
        after = snapshot(moe)
        router_path = moe.router.kernel.path
        self.assertGreater(np.abs(after[router_path] - before[router_path]).max(), 1e-6)
        for variable in moe.experts.trainable_weights:
            change = np.abs(after[variable.path] - before[variable.path])
            change = change.reshape(4, -1).max(axis=1)  # per expert
            self.assertTrue((change[:3] > 1e-7).all(), variable.path)
            self.assertEqual(change[3], 0.0, variable.path)

    def test_fit_learns_and_reports_routing_statistics(self):
        # Target: a different linear map per sign of the first feature, so
        # routing on that feature helps.
        rng = np.random.default_rng(6)
        x = rng.normal(size=(256, 4, 8)).astype("float32")
        y = np.where(x[..., :1] > 0, 2.0 * x, -x).astype("float32")
        inputs = keras.Input((4, 8))
        hidden = keras.layers.Dense(16)(inputs)
        outputs = keras.layers.Dense(8)(SparseMoE(4, 16, top_k=2, name="moe")(hidden))
        model = keras.Model(inputs, outputs)
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        monitor = keras_moe.callbacks.RoutingMonitor(per_layer=True)
        history = model.fit(x, y, batch_size=32, epochs=4, verbose=0, callbacks=[monitor])
        losses = history.history["loss"]
        self.assertLess(losses[-1], 0.7 * losses[0])
        for key in ("moe_balance_loss", "moe_z_loss", "moe_dropped_fraction", "moe_load_imbalance", "moe_moe/dropped_fraction"):
            self.assertIn(key, history.history)
            self.assertLen(history.history[key], 4)
        self.assertTrue(all(v >= 1.0 for v in history.history["moe_balance_loss"]))
        self.assertTrue(all(v >= 1.0 for v in history.history["moe_load_imbalance"]))
        self.assertTrue(all(0.0 <= v < 1.0 for v in history.history["moe_dropped_fraction"]))
        # One expert-load vector per epoch and per step, each summing to 1.
        self.assertLen(monitor.history["moe"]["expert_load"], 4)
        self.assertLen(monitor.step_history["moe"]["expert_load"], 4 * 8)
        for load in monitor.step_history["moe"]["expert_load"]:
            self.assertAllClose(np.sum(load), 1.0, atol=1e-5)

    def test_dropped_assignments_are_counted(self):
        # Every token prefers expert 0; capacity 2 of 8 tokens.
        moe = SparseMoE(
            2, 4, top_k=1, capacity_factor=0.5, min_capacity=1,
            use_bias=False,
        )
        moe.build((None, 3))
        moe.router.kernel.assign(np.array([[5.0, -5.0]] * 3, "float32"))
        x = np.ones((1, 8, 3), "float32")
        moe(x, training=True)
        stats = moe.routing_statistics()
        # capacity = ceil(0.5 * 8 * 1 / 2) = 2 -> 6 of 8 dropped.
        self.assertAllClose(stats["dropped_fraction"], 6 / 8)
        self.assertAllClose(stats["dropped_assignments"], 6.0)
        self.assertAllClose(stats["expert_load"], [1.0, 0.0])
        self.assertAllClose(stats["load_imbalance"], 2.0)
        moe.reset_routing_statistics()
        self.assertEqual(moe.routing_statistics()["steps"], 0.0)

    def test_save_and_load_keras_file(self):
        rng = np.random.default_rng(7)
        x = rng.normal(size=(4, 6, 8)).astype("float32")
        inputs = keras.Input((6, 8))
        hidden = SparseMoE(
            4, 16, top_k=2, gated=True, activation="silu", group_size=8,
            router=TopKRouter(4, 2, normalize_weights=True, jitter_noise=0.01),
            causal=True, eval_capacity_factor=1.0,
        )(inputs)
        model = keras.Model(inputs, keras.layers.Dense(3)(hidden))
        model.compile("adam", "mse")
        model.fit(x, rng.normal(size=(4, 6, 3)), epochs=1, verbose=0)
        expected = to_numpy(model.predict(x, verbose=0))
        path = os.path.join(self.get_temp_dir(), "moe.keras")
        model.save(path)
        restored = keras.saving.load_model(path, safe_mode=True)
        self.assertAllClose(restored.predict(x, verbose=0), expected, atol=1e-6)
        moe = restored.layers[1]
        self.assertIsInstance(moe.router, TopKRouter)
        self.assertTrue(moe.router.normalize_weights)
        restored_config = moe.get_config()
        original_config = model.layers[1].get_config()
        # build_config holds a list after a JSON round trip, a tuple before.
        self.assertEqual(
            restored_config.pop("router")["config"],
            original_config.pop("router")["config"],
        )
        self.assertEqual(restored_config, original_config)

    @parameterized.named_parameters(
        ("bfloat16", "mixed_bfloat16"), ("float16", "mixed_float16")
    )
    def test_mixed_precision_training(self, policy):
        rng = np.random.default_rng(8)
        x = rng.normal(size=(32, 4, 8)).astype("float32")
        y = rng.normal(size=(32, 4, 8)).astype("float32")
        moe = SparseMoE(4, 16, top_k=2, dtype=policy)
        model = keras.Sequential([keras.Input((4, 8)), moe])
        model.compile(optimizer="adam", loss="mse")
        history = model.fit(x, y, batch_size=16, epochs=2, verbose=0)
        self.assertTrue(np.all(np.isfinite(history.history["loss"])))
        compute_dtype = policy.split("_")[1]
        self.assertEqual(ops.dtype(moe(x)), compute_dtype)
        self.assertEqual(moe.router.kernel.dtype, "float32")
        self.assertEqual(moe.experts.intermediate_kernel.dtype, "float32")
        routing = moe.route(x)
        self.assertEqual(ops.dtype(routing["router_probs"]), "float32")


class SparseMoEErrorTest(testing.TestCase):
    def test_invalid_constructor_arguments(self):
        cases = [
            ({"num_experts": 0}, "num_experts=0"),
            ({"intermediate_dim": 0}, "intermediate_dim=0"),
            ({"top_k": 0}, "top_k=0"),
            ({"top_k": 5}, "top_k=5"),
            ({"capacity_factor": 0.0}, "capacity_factor=0.0"),
            ({"capacity_factor": -1}, "capacity_factor=-1"),
            ({"eval_capacity_factor": 0}, "eval_capacity_factor=0"),
            ({"min_capacity": 0}, "min_capacity=0"),
            ({"group_size": 0}, "group_size=0"),
            ({"activation": "nope"}, "activation='nope'"),
            ({"expert_dropout": 1.0}, "expert_dropout=1.0"),
            ({"load_balance_loss_weight": -1.0}, "load_balance_loss_weight=-1.0"),
            ({"z_loss_weight": -0.5}, "z_loss_weight=-0.5"),
            ({"causal": "yes"}, "causal='yes'"),
            ({"router": "fancy"}, "router='fancy'"),
            ({"router": TopKRouter(8, 2)}, "num_experts=4 and router.num_experts=8"),
            ({"router": TopKRouter(4, 1)}, "top_k=2 and router.top_k=1"),
        ]
        for override, message in cases:
            kwargs = {"num_experts": 4, "intermediate_dim": 8, "top_k": 2, **override}
            with self.assertRaisesRegex(ValueError, message):
                SparseMoE(**kwargs)

    def test_causal_refuses_routers_that_compare_tokens(self):
        class PeekingRouter(TopKRouter):
            compares_tokens = True

        with self.assertRaisesRegex(ValueError, "causal=True"):
            SparseMoE(4, 8, router=PeekingRouter(4, 2), causal=True)

    def test_invalid_inputs(self):
        moe = SparseMoE(4, 8)
        with self.assertRaisesRegex(ValueError, "rank >= 2"):
            moe(np.ones((5,), "float32"))
        moe(np.ones((2, 3, 6), "float32"))
        with self.assertRaisesRegex(ValueError, r"d_model=6. Received: inputs.shape=\(2, 3, 7\)"):
            moe(np.ones((2, 3, 7), "float32"))
