import numpy as np
from keras import ops
from keras.src import testing

from keras_moe import TopKRouter
from tests.reference import naive_route
from tests.reference import softmax
from tests.utils import to_numpy


class TopKRouterTest(testing.TestCase):
    def test_layer_basics(self):
        self.run_layer_test(
            TopKRouter,
            init_kwargs={"num_experts": 4, "top_k": 2},
            input_shape=(3, 5, 8),
            expected_output_shape={
                "expert_index": (3, 5, 2),
                "combine_weights": (3, 5, 2),
                "router_logits": (3, 5, 4),
                "router_probs": (3, 5, 4),
            },
            expected_num_trainable_weights=1,
            expected_num_seed_generators=1,
            run_training_check=False,
            run_mixed_precision_check=False,
        )

    def test_hand_computed_softmax_then_top_k(self):
        router = TopKRouter(num_experts=3, top_k=2)
        router.build((None, 2))
        router.kernel.assign(np.array([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]]))
        tokens = np.array([[1.0, 0.0], [0.0, 1.0]], "float32")
        out = router(tokens)
        # Token 0: logits [1, 0, -1]; token 1: logits [0, 2, 0].
        probs = softmax(np.array([[1.0, 0.0, -1.0], [0.0, 2.0, 0.0]]))
        self.assertAllClose(out["router_probs"], probs)
        self.assertEqual(to_numpy(out["expert_index"]).tolist(), [[0, 1], [1, 0]])
        self.assertAllClose(
            out["combine_weights"],
            [[probs[0, 0], probs[0, 1]], [probs[1, 1], probs[1, 0]]],
        )

    def test_normalized_weights_sum_to_one(self):
        router = TopKRouter(num_experts=5, top_k=2, normalize_weights=True)
        tokens = np.random.default_rng(0).normal(size=(7, 6)).astype("float32")
        out = router(tokens)
        weights = to_numpy(out["combine_weights"])
        self.assertAllClose(weights.sum(-1), np.ones(7))
        top2 = np.sort(to_numpy(out["router_probs"]), -1)[:, ::-1][:, :2]
        self.assertAllClose(weights, top2 / top2.sum(-1, keepdims=True))

    def test_softmax_after_top_k_uses_the_k_logits_only(self):
        router = TopKRouter(num_experts=4, top_k=2, softmax_after_top_k=True)
        router.build((None, 4))
        router.kernel.assign(np.eye(4))
        tokens = np.array([[3.0, 1.0, 2.0, -5.0]], "float32")
        out = router(tokens)
        self.assertEqual(to_numpy(out["expert_index"]).tolist(), [[0, 2]])
        self.assertAllClose(out["combine_weights"], softmax(np.array([[3.0, 2.0]])))

    def test_agrees_with_reference_on_random_tokens(self):
        router = TopKRouter(num_experts=6, top_k=3, use_bias=False)
        tokens = np.random.default_rng(3).normal(size=(40, 8)).astype("float32")
        out = router(tokens)
        _, probs, index, weights = naive_route(tokens, router.kernel.numpy(), 3)
        self.assertEqual(to_numpy(out["expert_index"]).tolist(), index.tolist())
        self.assertAllClose(out["combine_weights"], weights, atol=1e-6)
        self.assertAllClose(out["router_probs"], probs, atol=1e-6)

    def test_ties_go_to_lower_expert_index(self):
        router = TopKRouter(num_experts=4, top_k=2, kernel_initializer="zeros")
        out = router(np.ones((3, 5), "float32"))
        self.assertEqual(to_numpy(out["expert_index"]).tolist(), [[0, 1]] * 3)

    def test_computes_in_float32_under_mixed_precision(self):
        router = TopKRouter(num_experts=4, top_k=1, dtype="mixed_bfloat16")
        out = router(np.ones((2, 8), "float32"))
        self.assertEqual(router.kernel.dtype, "float32")
        for key in ("combine_weights", "router_logits", "router_probs"):
            self.assertEqual(ops.dtype(out[key]), "float32")

    def test_noise_only_in_training(self):
        tokens = np.random.default_rng(4).normal(size=(16, 8)).astype("float32")
        router = TopKRouter(4, 2, jitter_noise=0.5, logit_noise_std=1.0, seed=1)
        clean = to_numpy(router(tokens)["router_logits"])
        self.assertAllClose(router(tokens)["router_logits"], clean)
        noisy = to_numpy(router(tokens, training=True)["router_logits"])
        self.assertGreater(np.abs(noisy - clean).max(), 1e-3)
        self.assertAllClose(tokens @ router.kernel.numpy(), clean, atol=1e-5)

    def test_invalid_arguments(self):
        cases = [
            ({"num_experts": 0}, "num_experts=0"),
            ({"num_experts": 4, "top_k": 0}, "top_k=0"),
            ({"num_experts": 4, "top_k": 5}, "top_k=5"),
            ({"num_experts": 4, "jitter_noise": -0.1}, "jitter_noise=-0.1"),
            ({"num_experts": 4, "jitter_noise": 1.0}, "jitter_noise=1.0"),
            ({"num_experts": 4, "logit_noise_std": -1.0}, "logit_noise_std=-1.0"),
            (
                {"num_experts": 4, "normalize_weights": True, "softmax_after_top_k": True},
                "softmax_after_top_k=True",
            ),
        ]
        for kwargs, message in cases:
            with self.assertRaisesRegex(ValueError, message):
                TopKRouter(**kwargs)

    def test_config_round_trip(self):
        router = TopKRouter(
            num_experts=8, top_k=3, normalize_weights=True, jitter_noise=0.01,
            logit_noise_std=0.5, use_bias=True, seed=7,
        )
        restored = TopKRouter.from_config(router.get_config())
        self.assertEqual(restored.get_config(), router.get_config())
