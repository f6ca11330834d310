import numpy as np
from keras import ops
from keras.src import testing

from keras_moe import routing
from tests.utils import to_numpy


def plan_of(expert_index, valid, num_experts, capacity, priority="k_major"):
    plan = routing.compute_routing_plan(
        np.asarray(expert_index, "int32"),
        np.asarray(valid, bool),
        num_experts,
        capacity,
        priority=priority,
    )
    return to_numpy(plan.slot), to_numpy(plan.kept)


class CapacityTest(testing.TestCase):
    def test_formula(self):
        # ceil(1.25 * 64 * 2 / 8) = 20.
        self.assertEqual(routing.compute_capacity(64, 8, 2, 1.25, 4), 20)
        # min_capacity wins: ceil(1.0 * 8 * 1 / 8) = 1 -> 4.
        self.assertEqual(routing.compute_capacity(8, 8, 1, 1.0, 4), 4)
        # Never more than the group: 2 tokens cannot fill 4 slots.
        self.assertEqual(routing.compute_capacity(2, 8, 1, 1.0, 4), 2)
        # Dropless.
        self.assertEqual(routing.compute_capacity(37, 8, 2, None, 4), 37)

    def test_dynamic_group_size_matches_static(self):
        for group, factor in [(64, 1.25), (8, 1.0), (2, 1.0), (37, None), (100, 0.3)]:
            dynamic = routing.compute_capacity(
                ops.convert_to_tensor(group, "int32"), 8, 2, factor, 4
            )
            self.assertEqual(
                int(to_numpy(dynamic)),
                routing.compute_capacity(group, 8, 2, factor, 4),
            )


class RoutingPlanTest(testing.TestCase):
    def test_k_major_priority_puts_every_first_choice_first(self):
        # One group of 3 tokens, k=2, 3 experts.
        expert_index = [[[0, 1], [1, 0], [0, 2]]]
        slot, kept = plan_of(expert_index, [[True] * 3], 3, capacity=1)
        # First choices in token order: t0->e0 s0, t1->e1 s0, t2->e0 s1;
        # then second choices: t0->e1 s1, t1->e0 s2, t2->e2 s0.
        self.assertEqual(slot.tolist(), [[[0, 1], [0, 2], [1, 0]]])
        self.assertEqual(
            kept.tolist(), [[[True, False], [True, False], [False, True]]]
        )

    def test_token_major_priority_follows_token_order(self):
        expert_index = [[[0, 1], [1, 0], [0, 2]]]
        slot, kept = plan_of(
            expert_index, [[True] * 3], 3, capacity=1, priority="token_major"
        )
        # t0: e0 s0, e1 s0; t1: e1 s1, e0 s1; t2: e0 s2, e2 s0.
        self.assertEqual(slot.tolist(), [[[0, 0], [1, 1], [2, 0]]])
        self.assertEqual(
            kept.tolist(), [[[True, True], [False, False], [False, True]]]
        )

    def test_invalid_tokens_take_no_slot(self):
        expert_index = [[[0], [0], [0]]]
        slot, kept = plan_of(expert_index, [[False, True, True]], 2, capacity=1)
        self.assertEqual(slot[0, :, 0].tolist(), [-1, 0, 1])
        self.assertEqual(kept[0, :, 0].tolist(), [False, True, False])

    def test_groups_are_independent(self):
        expert_index = [[[1], [1]], [[1], [1]]]
        slot, kept = plan_of(expert_index, [[True, True]] * 2, 2, capacity=1)
        self.assertEqual(slot[..., 0].tolist(), [[0, 1], [0, 1]])
        self.assertEqual(kept[..., 0].tolist(), [[True, False], [True, False]])

    def test_unknown_priority_is_refused(self):
        with self.assertRaisesRegex(ValueError, "priority='newest_first'"):
            plan_of([[[0]]], [[True]], 2, 1, priority="newest_first")


class DispatchCombineTest(testing.TestCase):
    def setUp(self):
        super().setUp()
        rng = np.random.default_rng(0)
        self.num_experts, self.capacity = 3, 2
        # 2 groups x 4 tokens x d=5, k=2.
        self.tokens = rng.normal(size=(2, 4, 5)).astype("float32")
        self.expert_index = np.array(
            [[[0, 1], [0, 2], [0, 1], [2, 1]], [[1, 0], [1, 2], [1, 0], [1, 2]]],
            "int32",
        )
        self.valid = np.ones((2, 4), bool)
        self.plan = routing.compute_routing_plan(
            self.expert_index, self.valid, self.num_experts, self.capacity
        )
        self.rows = routing.buffer_rows(
            self.expert_index, self.plan, self.num_experts, self.capacity
        )

    def test_buffer_rows_are_per_group(self):
        rows = to_numpy(self.rows)
        slot, kept = to_numpy(self.plan.slot), to_numpy(self.plan.kept)
        expected = np.where(kept, self.expert_index * self.capacity + slot, 3 * 2)
        self.assertEqual(rows.tolist(), expected.tolist())

    def test_dispatch_puts_each_kept_token_in_its_slot(self):
        buffers = to_numpy(
            routing.dispatch(self.tokens, self.rows, self.num_experts, self.capacity)
        )
        # Group-major: (N, E, C, d).
        self.assertEqual(buffers.shape, (2, 3, 2, 5))
        slot, kept = to_numpy(self.plan.slot), to_numpy(self.plan.kept)
        expected = np.zeros_like(buffers)
        for n in range(2):
            for g in range(4):
                for j in range(2):
                    if kept[n, g, j]:
                        e = self.expert_index[n, g, j]
                        expected[n, e, slot[n, g, j]] = self.tokens[n, g]
        self.assertAllClose(buffers, expected)
        # Group 1 asks expert 1 four times: two are dropped, and empty slots
        # stay zero (expert 0 in group 1 gets t0 and t2 second choices).
        self.assertEqual(int(kept[1, :, 0].sum()), 2)

    def test_empty_slots_are_zero(self):
        # 3 tokens, all to expert 0 (capacity 2): expert 0 keeps t0 and t1,
        # expert 1 gets nothing.
        tokens = np.arange(1, 7, dtype="float32").reshape(1, 3, 2)
        expert_index = np.zeros((1, 3, 1), "int32")
        plan = routing.compute_routing_plan(expert_index, np.ones((1, 3), bool), 2, 2)
        rows = routing.buffer_rows(expert_index, plan, 2, 2)
        buffers = to_numpy(routing.dispatch(tokens, rows, 2, 2))
        self.assertAllClose(buffers[0, 0], tokens[0, :2])
        self.assertAllClose(buffers[0, 1], np.zeros((2, 2)))

    def test_expert_major_layout_and_round_trip(self):
        buffers = np.random.default_rng(3).normal(size=(2, 3, 4, 5)).astype("float32")
        expert_major = to_numpy(routing.to_expert_major(buffers))
        self.assertEqual(expert_major.shape, (3, 2 * 4, 5))
        # Row n * C + c of expert e is slot c of group n.
        for n in range(2):
            for e in range(3):
                for c in range(4):
                    self.assertAllClose(expert_major[e, n * 4 + c], buffers[n, e, c])
        self.assertAllClose(routing.to_group_major(expert_major, 2), buffers)

    def test_combine_weights_the_kept_outputs(self):
        expert_outputs = np.random.default_rng(1).normal(size=(2, 3, 2, 5)).astype(
            "float32"
        )
        weights = np.random.default_rng(2).uniform(size=(2, 4, 2)).astype("float32")
        combined = to_numpy(routing.combine(expert_outputs, self.rows, weights))
        slot, kept = to_numpy(self.plan.slot), to_numpy(self.plan.kept)
        expected = np.zeros((2, 4, 5), "float32")
        for n in range(2):
            for g in range(4):
                for j in range(2):
                    if kept[n, g, j]:
                        e = self.expert_index[n, g, j]
                        expected[n, g] += weights[n, g, j] * expert_outputs[
                            n, e, slot[n, g, j]
                        ]
        self.assertAllClose(combined, expected, atol=1e-6)

    def test_dropped_assignments_ignore_non_finite_buffers(self):
        # A dropped assignment reads no buffer row, so even inf/NaN in the
        # buffers cannot leak into its token's output.
        expert_outputs = np.full((2, 3, 2, 5), np.nan, "float32")
        weights = np.ones((2, 4, 2), "float32")
        rows = np.full((2, 4, 2), 3 * 2, "int32")  # every assignment dropped
        combined = to_numpy(routing.combine(expert_outputs, rows, weights))
        self.assertAllClose(combined, np.zeros((2, 4, 5)))

    def test_dispatch_then_identity_experts_then_combine_returns_weighted_tokens(self):
        buffers = routing.dispatch(
            self.tokens, self.rows, self.num_experts, self.capacity
        )
        weights = np.full((2, 4, 2), 0.5, "float32")
        combined = to_numpy(routing.combine(buffers, self.rows, weights))
        kept = to_numpy(self.plan.kept)
        expected = self.tokens * (0.5 * kept.sum(-1, keepdims=True))
        self.assertAllClose(combined, expected, atol=1e-6)


class BatchPrioritizedPlanTest(testing.TestCase):
    def plan(self, expert_index, scores, num_experts, capacity, valid=None):
        expert_index = np.asarray(expert_index, "int32")
        if valid is None:
            valid = np.ones(expert_index.shape[:2], bool)
        plan = routing.compute_routing_plan(
            expert_index, valid, num_experts, capacity,
            priority="batch_prioritized",
            priority_scores=np.asarray(scores, "float32"),
        )
        return to_numpy(plan.slot), to_numpy(plan.kept)

    def test_most_confident_tokens_get_the_slots(self):
        # t0, t1 want e0; t2, t3 want e1; capacity 1. Scores rank
        # t1 (0.9) > t3 (0.8) > t2 (0.7) > t0 (0.6): t1 and t3 keep their
        # slot, the earlier but less confident t0 and t2 are dropped
        # (k-major order would keep t0 and t2).
        slot, kept = self.plan([[[0], [0], [1], [1]]], [[0.6, 0.9, 0.7, 0.8]], 2, 1)
        self.assertEqual(slot[0, :, 0].tolist(), [1, 0, 1, 0])
        self.assertEqual(kept[0, :, 0].tolist(), [False, True, False, True])

    def test_top_2_hands_out_first_choices_first_in_score_order(self):
        # Order t1 (0.9), t2 (0.7), t0 (0.5). First choices: t1->e1 s0,
        # t2->e0 s0, t0->e0 s1; second choices: t1->e0 s2, t2->e2 s0,
        # t0->e1 s1.
        slot, kept = self.plan(
            [[[0, 1], [1, 0], [0, 2]]], [[0.5, 0.9, 0.7]], 3, 1
        )
        self.assertEqual(slot.tolist(), [[[1, 1], [0, 2], [0, 0]]])
        self.assertEqual(
            kept.tolist(), [[[False, False], [True, False], [True, True]]]
        )

    def test_ties_keep_token_order_and_groups_are_independent(self):
        expert_index = [[[0], [0], [0]], [[0], [0], [0]]]
        slot, _ = self.plan(expert_index, [[0.5, 0.5, 0.5], [0.1, 0.5, 0.5]], 1, 1)
        self.assertEqual(slot[..., 0].tolist(), [[0, 1, 2], [2, 0, 1]])

    def test_invalid_tokens_take_no_slot(self):
        slot, kept = self.plan(
            [[[0], [0], [0]]], [[0.9, 0.2, 0.5]], 1, 1,
            valid=np.array([[False, True, True]]),
        )
        self.assertEqual(slot[0, :, 0].tolist(), [-1, 1, 0])
        self.assertEqual(kept[0, :, 0].tolist(), [False, False, True])

    def test_needs_scores(self):
        with self.assertRaisesRegex(ValueError, "priority_scores=None"):
            routing.compute_routing_plan(
                np.zeros((1, 2, 1), "int32"), np.ones((1, 2), bool), 2, 1,
                priority="batch_prioritized",
            )
