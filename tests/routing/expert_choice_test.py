import numpy as np
from keras.src import testing

from keras_moe.routing import expert_choice
from tests.utils import to_numpy

# One group of 4 tokens over 3 experts. Expert 0 ranks t0 (0.5) first,
# expert 1 ranks t0 (0.45) first, expert 2 ranks t1 (0.8) first.
PROBS = np.array(
    [[[0.5, 0.45, 0.05], [0.1, 0.1, 0.8], [0.3, 0.3, 0.4], [0.4, 0.2, 0.4]]],
    "float32",
)
VALID = np.ones((1, 4), bool)


def select(probs=PROBS, valid=VALID, capacity=1):
    return expert_choice.select_tokens(probs, valid, capacity)


class SelectTokensTest(testing.TestCase):
    def test_hand_computed_capacity_one(self):
        plan = select()
        self.assertEqual(to_numpy(plan.token_index).tolist(), [[[0], [0], [1]]])
        self.assertAllClose(plan.combine_weights, [[[0.5], [0.45], [0.8]]])
        self.assertTrue(to_numpy(plan.kept).all())
        # t0 is taken by two experts, t2 and t3 by none.
        per_token = to_numpy(expert_choice.experts_per_token(plan, 4))
        self.assertEqual(per_token.tolist(), [[2.0, 1.0, 0.0, 0.0]])

    def test_hand_computed_capacity_two_with_ties(self):
        # Expert 0: t0 (0.5), t3 (0.4). Expert 1: t0 (0.45), then t2 and
        # t3 tie at 0.3 / 0.2 -> t2. Expert 2: t1 (0.8), then t2 and t3 tie
        # at 0.4: the lower index, t2, wins.
        plan = select(capacity=2)
        self.assertEqual(
            to_numpy(plan.token_index).tolist(), [[[0, 3], [0, 2], [1, 2]]]
        )
        self.assertAllClose(
            plan.combine_weights, [[[0.5, 0.4], [0.45, 0.3], [0.8, 0.4]]]
        )

    def test_every_expert_takes_exactly_capacity_distinct_tokens(self):
        rng = np.random.default_rng(0)
        logits = rng.normal(size=(3, 16, 5))
        probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
        plan = expert_choice.select_tokens(
            probs.astype("float32"), np.ones((3, 16), bool), 3
        )
        index = to_numpy(plan.token_index)
        self.assertEqual(index.shape, (3, 5, 3))
        for group in index:
            for chosen in group:
                self.assertLen(set(chosen.tolist()), 3)
        self.assertEqual(int(to_numpy(plan.kept).sum()), 3 * 5 * 3)
        # 15 slots over 16 tokens per group: some token gets no expert
        # (pigeonhole), and here some get several.
        per_token = to_numpy(expert_choice.experts_per_token(plan, 16))
        self.assertEqual(per_token.sum(), 3 * 15)
        self.assertGreater(per_token.max(), 1)
        self.assertEqual(per_token.min(), 0)

    def test_padding_is_never_taken_before_valid_tokens(self):
        # t0 would be every expert's favourite but is padding; with capacity
        # 3 and 2 valid tokens the third slot holds padding, not kept.
        valid = np.array([[False, True, True, False]])
        plan = select(valid=valid, capacity=3)
        index, kept = to_numpy(plan.token_index), to_numpy(plan.kept)
        for expert in range(3):
            self.assertEqual(sorted(index[0, expert, :2].tolist()), [1, 2])
            self.assertEqual(kept[0, expert].tolist(), [True, True, False])
        self.assertAllClose(to_numpy(plan.combine_weights)[..., 2], np.zeros((1, 3)))


class GatherAndCombineTest(testing.TestCase):
    def test_round_trip_matches_a_loop(self):
        rng = np.random.default_rng(1)
        tokens = rng.normal(size=(2, 6, 3)).astype("float32")
        logits = rng.normal(size=(2, 6, 4))
        probs = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype(
            "float32"
        )
        valid = np.array([[True] * 6, [True] * 4 + [False] * 2])
        plan = expert_choice.select_tokens(probs, valid, 5)
        buffers = to_numpy(expert_choice.gather_tokens(tokens, plan.token_index))
        index = to_numpy(plan.token_index)
        weights = to_numpy(plan.combine_weights)
        self.assertAllClose(buffers, tokens[np.arange(2)[:, None, None], index])
        # Pretend expert e multiplies by (e + 1).
        outputs = buffers * (np.arange(4) + 1.0)[None, :, None, None]
        combined = to_numpy(
            expert_choice.combine_outputs(outputs.astype("float32"), plan, 6)
        )
        expected = np.zeros_like(tokens)
        for n in range(2):
            for e in range(4):
                for c in range(5):
                    expected[n, index[n, e, c]] += weights[n, e, c] * outputs[n, e, c]
        self.assertAllClose(combined, expected, atol=1e-6)
        # Padding tokens get nothing.
        self.assertAllClose(combined[1, 4:], np.zeros((2, 3)))
        # The dense view holds the same weights.
        dense = to_numpy(expert_choice.token_weights(plan, 6))
        for n in range(2):
            for e in range(4):
                for c in range(5):
                    self.assertAllClose(dense[n, index[n, e, c], e], weights[n, e, c])
        self.assertEqual(int((dense > 0).sum()), int(to_numpy(plan.kept).sum()))

    def test_combine_is_bit_identical_across_runs(self):
        rng = np.random.default_rng(2)
        probs = rng.dirichlet(np.ones(8), size=(2, 32)).astype("float32")
        plan = expert_choice.select_tokens(probs, np.ones((2, 32), bool), 12)
        outputs = rng.normal(size=(2, 8, 12, 16)).astype("float32")
        first = to_numpy(expert_choice.combine_outputs(outputs, plan, 32))
        for _ in range(3):
            again = to_numpy(expert_choice.combine_outputs(outputs, plan, 32))
            self.assertEqual(first.tobytes(), again.tobytes())
