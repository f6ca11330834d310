import numpy as np
from keras.src import testing

from keras_moe import routing
from tests.utils import to_numpy


def layout_of(expert_index, valid, num_experts):
    layout = routing.dropless_layout(
        np.asarray(expert_index, "int32"), np.asarray(valid, bool), num_experts
    )
    return {name: to_numpy(value) for name, value in layout._asdict().items()}


class DroplessLayoutTest(testing.TestCase):
    def test_hand_computed_layout(self):
        # Tokens 0 and 2 valid, token 1 padding; k = 2, E = 3.
        # Assignments (token, choice -> expert): (0,0->1) (0,1->0) (2,0->0)
        # (2,1->2); sorted by expert, then token: rows 0: (0,1), 1: (2,0),
        # 2: (0,0), 3: (2,1); token 1's two assignments are not routed.
        layout = layout_of([[1, 0], [2, 2], [0, 2]], [True, False, True], 3)
        self.assertEqual(layout["group_sizes"].tolist(), [2, 1, 1])
        self.assertEqual(layout["source_token"].tolist(), [0, 2, 0, 2, 3, 3])
        self.assertEqual(layout["rows"].tolist(), [[2, 0], [6, 6], [1, 3]])

    def test_every_assignment_gets_one_row_of_its_expert(self):
        rng = np.random.default_rng(0)
        num_tokens, top_k, num_experts = 50, 3, 7
        expert_index = np.stack(
            [rng.choice(num_experts, top_k, replace=False) for _ in range(num_tokens)]
        )
        valid = rng.random(num_tokens) > 0.2
        layout = layout_of(expert_index, valid, num_experts)
        sizes = layout["group_sizes"]
        self.assertEqual(sizes.sum(), top_k * valid.sum())
        self.assertEqual(
            sizes.tolist(),
            np.bincount(expert_index[valid].ravel(), minlength=num_experts).tolist(),
        )
        ends = np.cumsum(sizes)
        rows = layout["rows"]
        for token in range(num_tokens):
            for choice in range(top_k):
                row = rows[token, choice]
                if not valid[token]:
                    self.assertEqual(row, num_tokens * top_k)
                    continue
                # The row holds this token and lies in its expert's range.
                self.assertEqual(layout["source_token"][row], token)
                expert = np.searchsorted(ends, row, side="right")
                self.assertEqual(expert, expert_index[token, choice])
        # Every used row is used once; the rest point at the zero token.
        used = rows[valid].ravel()
        self.assertEqual(len(set(used.tolist())), len(used))
        self.assertTrue(
            (layout["source_token"][sizes.sum():] == num_tokens).all()
        )

    def test_dispatch_then_identity_then_combine_returns_weighted_tokens(self):
        tokens = np.arange(12, dtype="float32").reshape(4, 3)
        expert_index = np.array([[0, 1], [1, 0], [2, 1], [0, 2]], "int32")
        weights = np.array([[0.5, 0.25], [1.0, 2.0], [0.1, 0.2], [3.0, 0.0]])
        layout = routing.dropless_layout(
            expert_index, np.array([True, True, False, True]), 3
        )
        buffer = routing.dropless_dispatch(tokens, layout)  # (8, 3)
        self.assertEqual(tuple(buffer.shape), (8, 3))
        outputs = to_numpy(routing.dropless_combine(buffer, layout, weights))
        expected = tokens * weights.sum(axis=1, keepdims=True)
        expected[2] = 0.0  # masked token
        self.assertAllClose(outputs, expected)
