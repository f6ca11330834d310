"""SparseMoE's routing options: router names, priorities, shared experts,
expert dropout, the router interface's losses, and saving every option."""

import os

import keras
import numpy as np
from absl.testing import parameterized
from keras import ops
from keras.src import testing

import keras_moe
from keras_moe import BiasBalancedRouter
from keras_moe import ExpertChoiceRouter
from keras_moe import NoisyTopKRouter
from keras_moe import SparseMoE
from keras_moe import TopKRouter
from tests.layers.sparse_moe_test import TINY_TOKENS
from tests.layers.sparse_moe_test import sigmoid
from tests.layers.sparse_moe_test import tiny_moe
from tests.utils import to_numpy


class EntropyRouter(TopKRouter):
    """A user router declaring one extra balancing loss."""

    @property
    def balancing_loss_weights(self):
        return {"entropy": 0.5}

    def balancing_losses(self, routing, mask=None):
        probs = routing["router_probs"]
        return {"entropy": -ops.mean(ops.sum(probs * ops.log(probs), axis=-1))}


class NoMaskRouter(TopKRouter):
    """A router whose `call` takes no `mask` argument."""

    def call(self, inputs, training=None):
        return super().call(inputs, training=training)


class RouterNamesTest(testing.TestCase):
    def test_each_name_builds_its_router_with_the_layer_arguments(self):
        expected = {
            "top_k": (TopKRouter, 1e-2),
            "noisy_top_k": (NoisyTopKRouter, 0.0),
            "bias_balanced": (BiasBalancedRouter, 0.0),
            "expert_choice": (ExpertChoiceRouter, 0.0),
        }
        for name, (cls, balance_weight) in expected.items():
            moe = SparseMoE(6, 8, top_k=3, router=name, seed=4)
            self.assertIs(type(moe.router), cls)
            self.assertEqual(
                (moe.router.num_experts, moe.router.top_k, moe.router.seed), (6, 3, 4)
            )
            # The Switch loss weight defaults to the router's choice ...
            self.assertEqual(moe.load_balance_loss_weight, balance_weight)
            # ... and an explicit value wins.
            explicit = SparseMoE(6, 8, top_k=3, router=name, load_balance_loss_weight=0.5)
            self.assertEqual(explicit.load_balance_loss_weight, 0.5)
        self.assertEqual(set(expected), set(keras_moe.layers.sparse_moe.ROUTERS))

    def test_router_declared_losses_are_added_and_logged(self):
        rng = np.random.default_rng(0)
        x = rng.normal(size=(8, 4, 6)).astype("float32")
        moe = SparseMoE(
            4, 8, top_k=2, router=EntropyRouter(4, 2), load_balance_loss_weight=0.0,
            z_loss_weight=0.0, name="moe",
        )
        moe(x, training=True)
        probs = to_numpy(moe.route(x)["router_probs"]).reshape(-1, 4)
        entropy = -np.mean(np.sum(probs * np.log(probs), -1))
        self.assertLen(moe.losses, 1)
        self.assertAllClose(moe.losses[0], 0.5 * entropy, atol=1e-5)
        self.assertEqual(moe.router_loss_names, ("entropy",))
        self.assertAllClose(moe.routing_statistics()["entropy"], entropy, atol=1e-5)

        model = keras.Sequential([keras.Input((4, 6)), moe])
        model.compile(optimizer=keras.optimizers.SGD(0.0), loss="mse")
        monitor = keras_moe.callbacks.RoutingMonitor(per_layer=True)
        history = model.fit(x, x, batch_size=4, epochs=1, verbose=0, callbacks=[monitor])
        self.assertAllClose(history.history["moe_entropy"][0], entropy, atol=1e-5)
        self.assertIn("moe_moe/entropy", history.history)
        self.assertLen(monitor.step_history["moe"]["entropy"], 2)

    def test_router_without_mask_argument(self):
        moe = SparseMoE(4, 8, router=NoMaskRouter(4, 2))
        self.assertEqual(tuple(moe(np.ones((2, 3, 5), "float32")).shape), (2, 3, 5))


class BatchPrioritizedTest(testing.TestCase):
    def test_hand_computed_capacity_one(self):
        # Top-1 probabilities: t0 0.881 (e0), t1 0.731 (e1), t2 0.731 (e0),
        # t3 0.953 (e1); capacity 1. Token order keeps t0 and t1; batch
        # priority keeps the most confident token of each expert: t0, t3.
        moe = tiny_moe(eval_capacity_factor=0.5, priority="batch_prioritized")
        kept = to_numpy(moe.route(TINY_TOKENS)["kept"])[:, 0]
        self.assertEqual(kept.tolist(), [True, False, False, True])
        p0, p3 = sigmoid(2.0), sigmoid(3.0)
        expected = [[2.0 * p0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 6.0 * p3]]
        self.assertAllClose(moe(TINY_TOKENS), expected, atol=1e-6)

    def test_priorities_refused_with_causal(self):
        for priority in ("batch_prioritized", "k_major"):
            with self.assertRaisesRegex(
                ValueError, f"priority='{priority}', causal=True"
            ):
                SparseMoE(4, 8, causal=True, priority=priority)
        moe = SparseMoE(4, 8, causal=True, priority="token_major")
        self.assertEqual(moe._priority, "token_major")


class SharedExpertsTest(testing.TestCase):
    def shared_tiny_moe(self, **kwargs):
        moe = tiny_moe(num_shared_experts=1, shared_intermediate_dim=2, **kwargs)
        eye = np.eye(2, dtype="float32")
        # The shared expert computes 3 * x.
        moe.shared_experts.intermediate_kernel.assign(eye)
        moe.shared_experts.output_kernel.assign(3 * eye)
        for bias in (moe.shared_experts.intermediate_bias, moe.shared_experts.output_bias):
            bias.assign(np.zeros(bias.shape, "float32"))
        return moe

    def test_shared_output_is_added_to_the_routed_output(self):
        routed = tiny_moe(eval_capacity_factor=None)
        moe = self.shared_tiny_moe(eval_capacity_factor=None)
        self.assertAllClose(moe(TINY_TOKENS), to_numpy(routed(TINY_TOKENS)) + 3 * TINY_TOKENS, atol=1e-6)
        # Every token gets the shared expert, also those dropped at capacity.
        capped = self.shared_tiny_moe(eval_capacity_factor=0.5)
        outputs = to_numpy(capped(TINY_TOKENS))
        self.assertAllClose(outputs[2:], 3 * TINY_TOKENS[2:], atol=1e-6)

    def test_qwen_style_sigmoid_gate(self):
        moe = self.shared_tiny_moe(eval_capacity_factor=None, shared_expert_gate=True)
        moe.shared_gate.kernel.assign(np.array([[1.0], [0.0]], "float32"))
        routed = to_numpy(tiny_moe(eval_capacity_factor=None)(TINY_TOKENS))
        gate = sigmoid(TINY_TOKENS[:, :1])
        self.assertAllClose(moe(TINY_TOKENS), routed + gate * 3 * TINY_TOKENS, atol=1e-6)

    def test_padding_stays_zero(self):
        x = np.random.default_rng(1).normal(size=(2, 3, 4)).astype("float32")
        mask = np.array([[1, 1, 0], [1, 0, 0]], bool)
        moe = SparseMoE(4, 8, num_shared_experts=2, shared_expert_gate=True)
        self.assertAllClose(to_numpy(moe(x, mask=mask))[~mask], np.zeros((3, 4)))

    def test_parameter_count(self):
        moe = SparseMoE(
            8, 32, top_k=2, num_shared_experts=2, shared_intermediate_dim=16,
            shared_expert_gate=True,
        )
        moe.build((None, 16))
        routed = 16 * 8 + 8 * (16 * 32 + 32 + 32 * 16 + 16)
        shared = (
            16 * 32  # intermediate kernel: 2 experts x 16 hidden units
            + 32  # intermediate bias
            + 32 * 16  # output kernel
            + 16  # output bias (the two experts' biases add up to one)
            + 16  # sigmoid gate kernel (16, 1)
        )
        self.assertEqual(
            sum(int(np.prod(v.shape)) for v in moe.trainable_weights), routed + shared
        )


class ExpertDropoutTest(testing.TestCase):
    def test_dropout_acts_on_expert_hidden_units_in_training_only(self):
        # One linear expert, d=1, 8 hidden units, all weights 1: its output
        # is the number of kept hidden units times 1 / (1 - 0.5).
        moe = SparseMoE(
            1, 8, top_k=1, activation="linear", use_bias=False,
            expert_dropout=0.5, capacity_factor=None, seed=0,
        )
        moe.build((None, 1))
        moe.experts.intermediate_kernel.assign(np.ones((1, 1, 8), "float32"))
        moe.experts.output_kernel.assign(np.ones((1, 8, 1), "float32"))
        x = np.ones((64, 1), "float32")
        self.assertAllClose(moe(x), np.full((64, 1), 8.0))
        trained = to_numpy(moe(x, training=True))[:, 0]
        self.assertAllClose(trained / 2.0, np.round(trained / 2.0))
        self.assertGreater(len(set(trained.tolist())), 2)
        self.assertAllClose(trained.mean(), 8.0, atol=1.0)
        # Shared experts use the same rate.
        shared = SparseMoE(4, 8, num_shared_experts=1, expert_dropout=0.3)
        self.assertEqual(shared.shared_experts.dropout, 0.3)
        self.assertEqual(shared.experts.dropout, 0.3)


OPTIONS = [
    ("noisy_top_k", {"router": "noisy_top_k"}),
    ("noisy_fixed", {"router": NoisyTopKRouter(4, 2, noise_std=0.25, importance_loss_weight=0.1)}),
    ("bias_balanced", {"router": "bias_balanced"}),
    ("bias_softmax", {"router": BiasBalancedRouter(4, 2, score_function="softmax", bias_update_rate=0.1)}),
    ("expert_choice", {"router": "expert_choice"}),
    ("batch_prioritized", {"priority": "batch_prioritized", "capacity_factor": 0.5}),
    ("shared_experts", {"num_shared_experts": 2, "shared_intermediate_dim": 4, "shared_expert_gate": True}),
    ("expert_dropout", {"expert_dropout": 0.3}),
]


class SaveEveryOptionTest(testing.TestCase):
    @parameterized.named_parameters(*OPTIONS)
    def test_keras_round_trip(self, options):
        rng = np.random.default_rng(5)
        x = rng.normal(size=(3, 6, 4)).astype("float32")
        inputs = keras.Input((6, 4))
        moe = SparseMoE(4, 8, top_k=2, min_capacity=1, **options)
        model = keras.Model(inputs, moe(inputs))
        for _ in range(2):  # moves any router state (the balancing bias)
            moe(x, training=True)
        expected = to_numpy(model.predict(x, verbose=0))
        path = os.path.join(self.get_temp_dir(), "option.keras")
        model.save(path)
        restored = keras.saving.load_model(path, safe_mode=True)
        self.assertAllClose(restored.predict(x, verbose=0), expected, atol=1e-6)
        restored_moe = restored.layers[1]
        self.assertIs(type(restored_moe.router), type(moe.router))
        for a, b in zip(restored_moe.weights, moe.weights):
            self.assertAllClose(a, b, msg=b.path)
        restored_config, config = restored_moe.get_config(), moe.get_config()
        if isinstance(config["router"], dict):
            self.assertEqual(restored_config.pop("router")["config"], config.pop("router")["config"])
        self.assertEqual(restored_config, config)


class OptionErrorTest(testing.TestCase):
    def test_invalid_arguments(self):
        cases = [
            ({"router": "switch"}, "router='switch'"),
            ({"priority": "newest_first"}, "priority='newest_first'"),
            ({"num_shared_experts": -1}, "num_shared_experts=-1"),
            ({"num_shared_experts": 1, "shared_intermediate_dim": 0}, "shared_intermediate_dim=0"),
            ({"shared_expert_gate": True}, "num_shared_experts=0.*shared_expert_gate=True"),
            ({"shared_intermediate_dim": 8}, "num_shared_experts=0.*shared_intermediate_dim=8"),
            ({"load_balance_loss_weight": -1.0}, "load_balance_loss_weight=-1.0"),
        ]
        for override, message in cases:
            with self.assertRaisesRegex(ValueError, message):
                SparseMoE(**{"num_experts": 4, "intermediate_dim": 8, **override})


class MixedPrecisionOptionTest(testing.TestCase):
    @parameterized.named_parameters(*OPTIONS)
    def test_bfloat16_training_call(self, options):
        x = np.random.default_rng(6).normal(size=(2, 6, 4)).astype("float32")
        moe = SparseMoE(4, 8, top_k=2, min_capacity=1, dtype="mixed_bfloat16", **options)
        outputs = moe(x, training=True)
        self.assertEqual(ops.dtype(outputs), "bfloat16")
        self.assertTrue(np.all(np.isfinite(to_numpy(ops.cast(outputs, "float32")))))
        self.assertEqual(moe.router.kernel.dtype, "float32")
        for loss in moe.losses:
            self.assertEqual(ops.dtype(loss), "float32")
