import math

import keras
import numpy as np
from keras.src import testing

from keras_moe import NoisyTopKRouter
from keras_moe import SparseMoE
from keras_moe import TopKRouter
from tests.utils import to_numpy


def softplus(x):
    return np.log1p(np.exp(x))


def normal_cdf(x):
    return 0.5 * (1.0 + np.vectorize(math.erf)(x / math.sqrt(2.0)))


class NoisyTopKRouterTest(testing.TestCase):
    def test_layer_basics(self):
        self.run_layer_test(
            NoisyTopKRouter,
            init_kwargs={"num_experts": 4, "top_k": 2},
            input_shape=(3, 5, 8),
            expected_output_shape={
                "expert_index": (3, 5, 2),
                "combine_weights": (3, 5, 2),
                "router_logits": (3, 5, 4),
                "router_probs": (3, 5, 4),
                "clean_logits": (3, 5, 4),
                "noise_std": (3, 5, 4),
            },
            # Gate kernel and noise kernel.
            expected_num_trainable_weights=2,
            expected_num_seed_generators=1,
            run_training_check=False,
            run_mixed_precision_check=False,
        )

    def test_parameter_count(self):
        learned = NoisyTopKRouter(8, 2)
        learned.build((None, 16))
        self.assertEqual(learned.count_params(), 16 * 8 + 16 * 8)  # W_g, W_noise
        fixed = NoisyTopKRouter(8, 2, noise_std=0.125)
        fixed.build((None, 16))
        self.assertEqual(fixed.count_params(), 16 * 8)

    def test_inference_is_plain_top_k(self):
        tokens = np.random.default_rng(0).normal(size=(9, 6)).astype("float32")
        noisy = NoisyTopKRouter(5, 2)
        plain = TopKRouter(5, 2)
        noisy.build((None, 6))
        plain.build((None, 6))
        plain.kernel.assign(noisy.kernel.numpy())
        a, b = noisy(tokens), plain(tokens)
        for key in ("expert_index", "combine_weights", "router_probs"):
            self.assertAllClose(a[key], b[key])
        self.assertAllClose(a["clean_logits"], a["router_logits"])

    def test_learned_noise_scale_by_hand(self):
        router = NoisyTopKRouter(3, 1, seed=3)
        router.build((None, 2))
        noise_kernel = np.array([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]], "float32")
        router.noise_kernel.assign(noise_kernel)
        tokens = np.array([[1.0, 0.5], [-1.0, 0.0]], "float32")
        out = router(tokens, training=True)
        expected_std = softplus(tokens @ noise_kernel) + 0.01
        self.assertAllClose(out["noise_std"], expected_std, atol=1e-6)
        # The selection used the noisy logits, which differ from the clean.
        self.assertAllClose(out["clean_logits"], tokens @ router.kernel.numpy(), atol=1e-6)
        noisy = to_numpy(out["router_logits"])
        self.assertGreater(np.abs(noisy - to_numpy(out["clean_logits"])).max(), 1e-3)
        self.assertEqual(
            to_numpy(out["expert_index"])[:, 0].tolist(), noisy.argmax(-1).tolist()
        )

    def test_fixed_noise_has_its_std(self):
        router = NoisyTopKRouter(4, 1, noise_std=0.5, kernel_initializer="zeros", seed=1)
        out = router(np.ones((4096, 3), "float32"), training=True)
        noise = to_numpy(out["router_logits"])  # clean logits are 0
        self.assertAllClose(noise.std(), 0.5, rtol=0.05)
        self.assertAllClose(out["noise_std"], np.full((4096, 4), 0.5))

    def test_balancing_losses_equal_their_formulas(self):
        router = NoisyTopKRouter(4, 2, noise_std=1.0, seed=2)
        tokens = np.random.default_rng(1).normal(size=(6, 5)).astype("float32")
        out = router(tokens, training=True)
        mask = np.array([True] * 5 + [False])
        result = router.balancing_losses(out, mask)
        self.assertEqual(set(result), set(router.balancing_loss_weights))
        index = to_numpy(out["expert_index"])[:5]
        weights = to_numpy(out["combine_weights"])[:5]
        gates = np.zeros((5, 4))
        np.put_along_axis(gates, index, weights, axis=-1)
        importance = gates.sum(0)
        self.assertAllClose(
            result["importance_loss"], importance.var() / importance.mean() ** 2, atol=1e-5
        )
        clean = to_numpy(out["clean_logits"])[:5]
        noisy = to_numpy(out["router_logits"])[:5]
        ranked = -np.sort(-noisy, axis=-1)
        selected = np.zeros((5, 4), bool)
        np.put_along_axis(selected, index, True, axis=-1)
        threshold = np.where(selected, ranked[:, 2:3], ranked[:, 1:2])
        load = normal_cdf(clean - threshold).sum(0)
        self.assertAllClose(result["load_loss"], load.var() / load.mean() ** 2, atol=1e-5)

    def test_sparse_moe_adds_the_losses_and_trains_the_noise(self):
        rng = np.random.default_rng(3)
        x = rng.normal(size=(16, 4, 6)).astype("float32")
        moe = SparseMoE(
            4, 8, top_k=1, router="noisy_top_k", z_loss_weight=0.0, seed=0
        )
        model = keras.Sequential([keras.Input((4, 6)), moe])
        model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
        moe(x, training=True)
        # Importance and load losses, no Switch loss.
        self.assertLen(moe.losses, 2)
        self.assertEqual(moe.load_balance_loss_weight, 0.0)
        before = moe.router.noise_kernel.numpy().copy()
        model.fit(x, np.zeros_like(x), batch_size=16, epochs=1, verbose=0)
        self.assertGreater(np.abs(moe.router.noise_kernel.numpy() - before).max(), 1e-7)
        stats = moe.routing_statistics()
        self.assertGreater(stats["importance_loss"], 0.0)
        self.assertGreater(stats["load_loss"], 0.0)

    def test_invalid_arguments(self):
        cases = [
            ({"noise_std": 0.0}, "noise_std=0.0"),
            ({"noise_std": "big"}, "noise_std='big'"),
            ({"importance_loss_weight": -1.0}, "importance_loss_weight=-1.0"),
            ({"load_loss_weight": -0.1}, "load_loss_weight=-0.1"),
            ({"top_k": 5}, "top_k=5"),
        ]
        for kwargs, message in cases:
            with self.assertRaisesRegex(ValueError, message):
                NoisyTopKRouter(4, **{"top_k": 2, **kwargs})

    def test_config_round_trip(self):
        router = NoisyTopKRouter(
            8, 3, noise_std=0.25, importance_loss_weight=0.1, load_loss_weight=0.2,
            softmax_after_top_k=True, seed=7,
        )
        config = router.get_config()
        self.assertNotIn("logit_noise_std", config)
        restored = NoisyTopKRouter.from_config(config)
        self.assertEqual(restored.get_config(), config)
