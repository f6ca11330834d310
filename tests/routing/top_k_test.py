import numpy as np
from keras.src import testing

from keras_moe.routing import stable_top_k
from tests.utils import to_numpy


class StableTopKTest(testing.TestCase):
    def test_ties_go_to_the_lower_index(self):
        scores = np.zeros((3, 8), "float32")
        scores[1, [2, 5, 6]] = 1.0
        scores[2, [7, 3]] = 0.5
        values, indices = stable_top_k(scores, 3)
        self.assertEqual(
            to_numpy(indices).tolist(), [[0, 1, 2], [2, 5, 6], [3, 7, 0]]
        )
        self.assertAllClose(values, [[0, 0, 0], [1, 1, 1], [0.5, 0.5, 0]])

    def test_matches_a_stable_argsort_on_random_scores_with_ties(self):
        rng = np.random.default_rng(0)
        # Few distinct values, so ties are everywhere.
        scores = rng.integers(0, 4, size=(64, 16)).astype("float32")
        _, indices = stable_top_k(scores, 5)
        expected = np.argsort(-scores, axis=-1, kind="stable")[:, :5]
        self.assertEqual(to_numpy(indices).tolist(), expected.tolist())
        self.assertEqual(str(to_numpy(indices).dtype), "int32")

    def test_leading_axes_are_kept(self):
        scores = np.random.default_rng(1).normal(size=(2, 3, 6)).astype("float32")
        values, indices = stable_top_k(scores, 2)
        self.assertEqual(tuple(indices.shape), (2, 3, 2))
        self.assertAllClose(values, -np.sort(-scores, axis=-1)[..., :2])
