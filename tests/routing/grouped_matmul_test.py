import keras
import numpy as np
import pytest
from absl.testing import parameterized
from keras import ops
from keras.src import testing

from keras_moe import routing
from keras_moe.routing.grouped_matmul import _jax_ragged_dot
from keras_moe.routing.grouped_matmul import _jax_tiled_matmul
from keras_moe.routing.grouped_matmul import _masked_grouped_matmul
from tests.utils import to_numpy


def naive_grouped_matmul(x, kernel, group_sizes):
    """Row by row: each row times its group's kernel, zeros past the groups."""
    outputs = np.zeros((x.shape[0], kernel.shape[2]))
    row = 0
    for group, size in enumerate(group_sizes):
        for _ in range(size):
            outputs[row] = x[row].astype(np.float64) @ kernel[group]
            row += 1
    return outputs


def random_case(seed, num_rows=37, num_groups=6, model_dim=5, hidden=3):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_rows, model_dim)).astype("float32")
    kernel = rng.normal(size=(num_groups, model_dim, hidden)).astype("float32")
    # Empty groups and rows past the last group (masked assignments).
    sizes = rng.multinomial(num_rows - 4, np.ones(num_groups) / num_groups)
    sizes[1] = 0
    return x, kernel, sizes.astype("int32")


class GroupedMatmulTest(testing.TestCase):
    @parameterized.parameters(0, 1, 2)
    def test_fast_path_matches_row_by_row(self, seed):
        x, kernel, sizes = random_case(seed)
        outputs = to_numpy(routing.grouped_matmul(x, kernel, sizes))
        self.assertAllClose(
            outputs, naive_grouped_matmul(x, kernel, sizes), atol=1e-5
        )

    def test_portable_path_matches_the_fast_path(self):
        x, kernel, sizes = random_case(3)
        fast = to_numpy(routing.grouped_matmul(x, kernel, sizes))
        portable = to_numpy(_masked_grouped_matmul(x, kernel, sizes))
        self.assertAllClose(fast, portable, atol=1e-5)

    def test_every_row_in_one_group_and_no_row_at_all(self):
        x, kernel, _ = random_case(4)
        for sizes in ([0, 0, 37, 0, 0, 0], [0] * 6):
            sizes = np.array(sizes, "int32")
            self.assertAllClose(
                to_numpy(routing.grouped_matmul(x, kernel, sizes)),
                naive_grouped_matmul(x, kernel, sizes),
                atol=1e-5,
            )

    def test_gradients_match_the_portable_path(self):
        x, kernel, sizes = random_case(5)
        upstream = np.random.default_rng(6).normal(size=(37, 3)).astype("float32")

        def gradients(function):
            return _gradients(
                lambda a, b: ops.sum(
                    function(a, b, sizes) * ops.convert_to_tensor(upstream)
                ),
                x,
                kernel,
            )

        fast = gradients(routing.grouped_matmul)
        portable = gradients(_masked_grouped_matmul)
        for got, expected in zip(fast, portable):
            self.assertAllClose(got, expected, atol=1e-5)


def _gradients(loss, x, kernel):
    """d loss / d (x, kernel) on the current backend, as NumPy."""
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        return [np.asarray(g) for g in jax.grad(loss, argnums=(0, 1))(x, kernel)]
    if backend == "tensorflow":
        import tensorflow as tf

        x, kernel = tf.Variable(x), tf.Variable(kernel)
        with tf.GradientTape() as tape:
            value = loss(x, kernel)
        return [g.numpy() for g in tape.gradient(value, [x, kernel])]
    import torch

    x = torch.tensor(x, requires_grad=True)
    kernel = torch.tensor(kernel, requires_grad=True)
    loss(x, kernel).backward()
    return [x.grad.detach().numpy(), kernel.grad.detach().numpy()]


@pytest.mark.skipif(keras.backend.backend() != "jax", reason="JAX's paths")
class JaxPathsTest(testing.TestCase):
    """JAX's two fast paths, whichever one this platform would pick."""

    @parameterized.parameters(1, 4, 8, 64)
    def test_cpu_tiles_match_row_by_row(self, tile_rows):
        # Small tiles put many group boundaries inside tiles.
        x, kernel, sizes = random_case(7)
        outputs = np.asarray(
            _jax_tiled_matmul(x, kernel, np.asarray(sizes), tile_rows)
        )
        self.assertAllClose(outputs, naive_grouped_matmul(x, kernel, sizes), atol=1e-5)

    def test_cpu_tile_gradients_match_the_portable_path(self):
        import jax

        x, kernel, sizes = random_case(8)
        upstream = np.random.default_rng(9).normal(size=(37, 3)).astype("float32")

        def loss(function):
            return lambda a, b: (function(a, b) * upstream).sum()

        tiled = jax.grad(
            loss(lambda a, b: _jax_tiled_matmul(a, b, sizes, 8)),
            argnums=(0, 1),
        )(x, kernel)
        portable = jax.grad(
            loss(lambda a, b: _masked_grouped_matmul(a, b, sizes)),
            argnums=(0, 1),
        )(x, kernel)
        for got, expected in zip(tiled, portable):
            self.assertAllClose(got, expected, atol=1e-5)

    def test_ragged_dot_matches_row_by_row(self):
        # The GPU / TPU path, run on whatever platform this is.
        x, kernel, sizes = random_case(10)
        outputs = np.asarray(_jax_ragged_dot(x, kernel, np.asarray(sizes)))
        self.assertAllClose(outputs, naive_grouped_matmul(x, kernel, sizes), atol=1e-5)
