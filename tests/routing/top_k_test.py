import keras
import numpy as np
import pytest
from keras import ops
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

    def test_reduction_and_sort_paths_agree_with_ties_nan_and_infinities(self):
        from keras_moe.routing.top_k import MAX_K_BY_REDUCTION
        from keras_moe.routing.top_k import _top_k_by_reduction

        rng = np.random.default_rng(4)
        scores = np.concatenate(
            [rng.normal(size=(32, 12)), rng.integers(0, 3, size=(32, 12))]
        ).astype("float32")
        scores[0, [2, 9]] = np.nan
        scores[1, :] = -np.inf
        scores[2, [4, 5]] = np.inf
        scores[3, :10] = -np.inf  # fewer finite entries than k
        scores[4, [0, 1]] = [-0.0, 0.0]
        # NumPy's stable sort of -scores: NaN first, ties to the lower index.
        keys = np.where(np.isnan(scores), np.inf, scores)
        for k in (1, 2, 3, MAX_K_BY_REDUCTION):
            values, indices = _top_k_by_reduction(scores, k)
            expected = np.argsort(-keys, axis=-1, kind="stable")[:, :k]
            self.assertEqual(to_numpy(indices).tolist(), expected.tolist())
            np.testing.assert_array_equal(
                to_numpy(values), np.take_along_axis(scores, expected, -1)
            )
            # The public function takes this path for small k.
            _, public = stable_top_k(scores, k)
            self.assertEqual(to_numpy(public).tolist(), expected.tolist())

    def test_gradient_reaches_the_selected_scores(self):
        scores = np.random.default_rng(5).normal(size=(3, 6)).astype("float32")
        values, indices = stable_top_k(scores, 2)
        expected = np.zeros_like(scores)
        np.put_along_axis(expected, to_numpy(indices), 1.0, axis=-1)
        gradient = _gradient_of_sum(lambda s: stable_top_k(s, 2)[0], scores)
        self.assertAllClose(gradient, expected)

    def test_leading_axes_are_kept(self):
        scores = np.random.default_rng(1).normal(size=(2, 3, 6)).astype("float32")
        values, indices = stable_top_k(scores, 2)
        self.assertEqual(tuple(indices.shape), (2, 3, 2))
        self.assertAllClose(values, -np.sort(-scores, axis=-1)[..., :2])


@pytest.mark.skipif(
    keras.backend.backend() != "jax", reason="the sort path is JAX only"
)
class SortedTopKTest(testing.TestCase):
    """The sort-based top-k used under a keras.distribution equals XLA's TopK."""

    def test_matches_xla_top_k_with_ties_and_nan(self):
        from keras_moe.routing.top_k import _sorted_top_k_jax

        rng = np.random.default_rng(2)
        scores = np.concatenate(
            [
                rng.normal(size=(64, 16)),
                # Few distinct values: ties everywhere.
                rng.integers(0, 4, size=(64, 16)),
            ]
        ).astype("float32")
        scores[3, [1, 7]] = np.nan  # both rank NaN first
        for k in (1, 2, 5, 16):
            values, indices = _sorted_top_k_jax(scores, k)
            expected_values, expected_indices = ops.top_k(scores, k)
            self.assertEqual(
                to_numpy(indices).tolist(), to_numpy(expected_indices).tolist()
            )
            np.testing.assert_array_equal(
                to_numpy(values), to_numpy(expected_values)
            )
            self.assertEqual(str(to_numpy(indices).dtype), "int32")

    def test_selected_under_a_distribution(self):
        import jax

        k = 10  # above MAX_K_BY_REDUCTION: a TopK or a sort
        scores = np.random.default_rng(3).normal(size=(4, 16)).astype("float32")
        mesh = keras.distribution.DeviceMesh((1,), ("batch",), devices=["cpu:0"])
        plain = str(jax.make_jaxpr(lambda s: stable_top_k(s, k))(scores))
        with keras.distribution.DataParallel(device_mesh=mesh).scope():
            distributed = str(jax.make_jaxpr(lambda s: stable_top_k(s, k))(scores))
            values, indices = stable_top_k(scores, k)
            small_k = str(jax.make_jaxpr(lambda s: stable_top_k(s, 2))(scores))
        self.assertIn("top_k", plain)
        self.assertNotIn("top_k", distributed)
        self.assertIn("sort", distributed)
        # Small k: reductions only, which XLA partitions along tokens.
        self.assertNotRegex(small_k, r"\b(top_k|sort)\[")
        expected_values, expected_indices = ops.top_k(scores, k)
        self.assertEqual(
            to_numpy(indices).tolist(), to_numpy(expected_indices).tolist()
        )
        self.assertAllClose(values, expected_values)


@pytest.mark.skipif(
    keras.backend.backend() != "tensorflow",
    reason="only TensorFlow traces with unknown dimensions (k a tensor)",
)
class UnknownKTest(testing.TestCase):
    def test_k_from_an_unknown_dimension(self):
        # Keras retraces TensorFlow functions with unknown dimensions; an
        # expert-choice capacity or a batch-prioritised sort of a group
        # then asks for k = a scalar tensor, small or not.
        import tensorflow as tf

        @tf.function(input_signature=[tf.TensorSpec((None, None), "float32")])
        def top_half(scores):
            return stable_top_k(scores, tf.shape(scores)[-1] // 2)

        rng = np.random.default_rng(5)
        for width in (6, 24):
            scores = rng.integers(0, 3, size=(4, width)).astype("float32")
            values, indices = top_half(scores)
            expected = np.argsort(-scores, axis=-1, kind="stable")[:, : width // 2]
            self.assertEqual(to_numpy(indices).tolist(), expected.tolist())
            self.assertAllClose(
                values, np.take_along_axis(scores, expected, axis=-1)
            )


def _gradient_of_sum(function, x):
    """d sum(function(x)) / dx on the current backend, as NumPy."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return np.asarray(jax.grad(lambda a: function(a).sum())(x))
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            value = tf.reduce_sum(function(x))
        return tape.gradient(value, x).numpy()
    import torch

    x = torch.tensor(x, requires_grad=True)
    function(x).sum().backward()
    return x.grad.numpy()
