"""Top-k with the same tie-breaking on every backend."""

import keras
from keras import ops

from keras_moe.distribution import _partitioned_top_k_needed


def stable_top_k(scores, k):
    """Returns the `k` largest entries along the last axis, ties to the lower index.

    `ops.top_k` breaks ties towards the lower index on JAX and TensorFlow
    (both document it) but not on PyTorch, whose `topk` returns the higher
    index first on CPU. Routing must not depend on the backend, so on PyTorch
    this uses a stable descending sort instead (O(E log E) per token, which is
    negligible next to the router matmul for any realistic number of experts).

    On JAX with a `keras.distribution` active it also uses a stable sort:
    XLA does not partition its TopK along the token dimensions, so the router
    output of every device would be gathered onto every device; a sort is
    computed where the tokens are. Same values and indices (also for NaN,
    which both put first), except that the sort treats -0.0 and 0.0 as equal
    while XLA's TopK ranks 0.0 first.

    Args:
        scores: float tensor of shape `(..., num_experts)`.
        k: int, number of entries to keep, `1 <= k <= num_experts`.

    Returns:
        Tuple `(values, indices)`, each of shape `(..., k)`, sorted by
        decreasing value; `indices` are int32.
    """
    if keras.backend.backend() == "torch":
        import torch

        scores = ops.convert_to_tensor(scores)
        values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
        return values[..., :k], indices[..., :k].to(torch.int32)
    if _partitioned_top_k_needed():
        return _sorted_top_k_jax(scores, k)
    values, indices = ops.top_k(scores, k, sorted=True)
    return values, ops.cast(indices, "int32")


def _sorted_top_k_jax(scores, k):
    """`stable_top_k` by a stable descending argsort (JAX only)."""
    import jax.numpy as jnp

    indices = jnp.argsort(scores, axis=-1, descending=True, stable=True)
    indices = indices[..., :k].astype("int32")
    return jnp.take_along_axis(scores, indices, axis=-1), indices


def stable_argsort(values):
    """Indices that sort the 1-D `values` ascending, ties in index order.

    `ops.argsort` is stable on JAX but not on TensorFlow or PyTorch, where
    equal keys may come out in any order; routing layouts must not depend
    on the backend's sort, so each backend's stable sort is asked for.

    Args:
        values: 1-D int or float tensor.

    Returns:
        int32 indices, same length.
    """
    backend = keras.backend.backend()
    if backend == "torch":
        import torch

        values = ops.convert_to_tensor(values)
        return torch.argsort(values, stable=True).to(torch.int32)
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.cast(tf.argsort(values, stable=True), "int32")
    if backend == "jax":
        import jax.numpy as jnp

        return jnp.argsort(values, stable=True).astype("int32")
    return ops.cast(ops.argsort(values), "int32")
