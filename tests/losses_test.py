import math

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


def normal_cdf(x):
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


class CvSquaredTest(testing.TestCase):
    def test_hand_computed_cases(self):
        # mean 2, population variance 1 -> 1 / 4.
        self.assertAllClose(losses.cv_squared(np.array([1.0, 3.0])), 0.25)
        self.assertAllClose(losses.cv_squared(np.array([2.0, 2.0, 2.0])), 0.0)
        # All zeros stays finite.
        self.assertAllClose(losses.cv_squared(np.zeros(4)), 0.0)


class ImportanceLossTest(testing.TestCase):
    def test_hand_computed_case(self):
        # Gates of 3 tokens over 2 experts; importance = [1.0, 0.5]:
        # mean 0.75, variance 0.0625 -> 0.0625 / 0.5625.
        gates = np.array([[0.6, 0.0], [0.0, 0.5], [0.4, 0.0]], "float32")
        self.assertAllClose(losses.importance_loss(gates), 0.0625 / 0.5625)
        # Without token 2: importance [0.6, 0.5], variance 0.0025.
        mask = np.array([True, True, False])
        self.assertAllClose(
            losses.importance_loss(gates, mask), 0.0025 / 0.55**2, rtol=1e-5
        )

    def test_balanced_gates_give_zero(self):
        gates = np.array([[0.5, 0.0], [0.0, 0.5]], "float32")
        self.assertAllClose(losses.importance_loss(gates), 0.0)


class NoisyTopKLoadTest(testing.TestCase):
    def test_hand_computed_case(self):
        # One token, 3 experts, k=1. Noisy logits [1.5, 0.2, -2]: expert 0
        # is selected; its threshold is the 2nd largest noisy logit (0.2),
        # the others' is the largest (1.5).
        clean = np.array([[1.0, 0.0, -1.0]], "float32")
        noisy = np.array([[1.5, 0.2, -2.0]], "float32")
        index = np.array([[0]], "int32")
        std = np.array([[0.5, 1.0, 2.0]], "float32")
        expected = [
            normal_cdf((1.0 - 0.2) / 0.5),
            normal_cdf((0.0 - 1.5) / 1.0),
            normal_cdf((-1.0 - 1.5) / 2.0),
        ]
        load = losses.noisy_top_k_expected_load(clean, noisy, std, index)
        self.assertAllClose(load, expected, atol=1e-6)
        self.assertAllClose(
            losses.noisy_top_k_load_loss(clean, noisy, std, index),
            np.var(expected) / np.mean(expected) ** 2,
            atol=1e-6,
        )

    def test_sums_over_valid_tokens_and_top_2(self):
        # Two tokens, k=2, scalar std 1; the second token is padding.
        clean = np.array([[0.0, 1.0, 2.0], [9.0, 9.0, 9.0]], "float32")
        noisy = np.array([[0.5, 1.0, 3.0], [9.0, 9.0, 9.0]], "float32")
        index = np.array([[2, 1], [0, 1]], "int32")
        mask = np.array([True, False])
        # Selected {2, 1}: threshold 0.5 (3rd largest); expert 0: 1.0.
        expected = [
            normal_cdf(0.0 - 1.0),
            normal_cdf(1.0 - 0.5),
            normal_cdf(2.0 - 0.5),
        ]
        load = losses.noisy_top_k_expected_load(
            clean, noisy, np.float32(1.0), index, mask
        )
        self.assertAllClose(load, expected, atol=1e-6)

    def test_top_k_equal_to_num_experts_counts_every_token(self):
        logits = np.zeros((3, 2), "float32")
        index = np.array([[0, 1]] * 3, "int32")
        load = losses.noisy_top_k_expected_load(logits, logits, 1.0, index)
        self.assertAllClose(load, [3.0, 3.0])
        self.assertAllClose(
            losses.noisy_top_k_load_loss(logits, logits, 1.0, index), 0.0
        )


class SequenceBalanceLossTest(testing.TestCase):
    def test_hand_computed_case(self):
        # Two sequences of 2 tokens, 2 experts, k=1.
        scores = np.array(
            [[[0.8, 0.2], [0.6, 0.2]], [[0.5, 0.5], [0.1, 0.3]]], "float32"
        )
        index = np.array([[[0], [0]], [[0], [1]]], "int32")
        # Sequence 0: normalised scores [0.8, 0.2], [0.75, 0.25] ->
        # P = [0.775, 0.225]; f = 2 / (1 * 2) * [2, 0] = [2, 0] -> 1.55.
        # Sequence 1: [0.5, 0.5], [0.25, 0.75] -> P = [0.375, 0.625];
        # f = [1, 1] -> 1.0. Mean 1.275.
        self.assertAllClose(
            losses.sequence_balance_loss(scores, index), 1.275, atol=1e-6
        )
        # A fully padded sequence does not count.
        mask = np.array([[True, True], [False, False]])
        self.assertAllClose(
            losses.sequence_balance_loss(scores, index, mask), 1.55, atol=1e-6
        )

    def test_one_softmax_sequence_is_the_switch_loss(self):
        rng = np.random.default_rng(0)
        logits = rng.normal(size=(1, 7, 4))
        probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(
            "float32"
        )
        index = np.argsort(-probs, axis=-1)[..., :2].astype("int32")
        self.assertAllClose(
            losses.sequence_balance_loss(probs, index),
            losses.load_balancing_loss(probs[0], index[0]),
            atol=1e-6,
        )
