import numpy as np
from keras.src import testing

from keras_moe import losses


class LoadBalancingLossTest(testing.TestCase):
    def test_hand_computed_case(self):
        # 2 tokens, 2 experts, k=1. Token 0 -> e0 (p 0.75), token 1 -> e0
        # (p 0.5). f = [1, 0], P = [0.625, 0.375]: loss = 2 * 0.625 = 1.25.
        probs = np.array([[0.75, 0.25], [0.5, 0.5]], "float32")
        index = np.array([[0], [0]], "int32")
        self.assertAllClose(losses.load_balancing_loss(probs, index), 1.25)

    def test_uniform_routing_gives_one_for_any_k(self):
        num_experts = 4
        probs = np.full((8, num_experts), 0.25, "float32")
        for top_k in (1, 2, 4):
            # Token t picks experts t, t+1, ... (mod 4): perfectly even.
            index = (np.arange(8)[:, None] + np.arange(top_k)[None]) % num_experts
            self.assertAllClose(
                losses.load_balancing_loss(probs, index.astype("int32")), 1.0
            )

    def test_collapse_gives_num_experts(self):
        probs = np.zeros((5, 8), "float32")
        probs[:, 2] = 1.0
        index = np.full((5, 1), 2, "int32")
        self.assertAllClose(losses.load_balancing_loss(probs, index), 8.0)

    def test_mask_ignores_padding(self):
        probs = np.array([[0.75, 0.25], [0.5, 0.5], [0.0, 1.0]], "float32")
        index = np.array([[0], [0], [1]], "int32")
        mask = np.array([True, True, False])
        self.assertAllClose(losses.load_balancing_loss(probs, index, mask), 1.25)

    def test_all_padding_gives_zero_not_nan(self):
        probs = np.full((3, 2), 0.5, "float32")
        index = np.zeros((3, 1), "int32")
        mask = np.zeros((3,), bool)
        self.assertAllClose(losses.load_balancing_loss(probs, index, mask), 0.0)
        self.assertAllClose(losses.router_z_loss(np.ones((3, 2)), mask), 0.0)

    def test_assignment_counts(self):
        index = np.array([[0, 2], [2, 1], [2, 0]], "int32")
        counts = losses.expert_assignment_counts(
            index, 4, np.array([True, True, False])
        )
        self.assertAllClose(counts, [1.0, 1.0, 2.0, 0.0])


class RouterZLossTest(testing.TestCase):
    def test_hand_computed_case(self):
        # logsumexp([0, 0]) = log 2; logsumexp([log 3, 0]) = log 4.
        logits = np.array([[0.0, 0.0], [np.log(3.0), 0.0]], "float32")
        expected = (np.log(2.0) ** 2 + np.log(4.0) ** 2) / 2
        self.assertAllClose(losses.router_z_loss(logits), expected)

    def test_large_logits_stay_finite(self):
        logits = np.array([[1e4, -1e4, 0.0]], "float32")
        self.assertAllClose(losses.router_z_loss(logits), 1e8, rtol=1e-5)
