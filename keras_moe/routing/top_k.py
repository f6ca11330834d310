"""Top-k with the same tie-breaking on every backend."""

import numbers

import keras
from keras import ops

from keras_moe.distribution import _partitioned_top_k_needed


# Up to this k, `stable_top_k` picks the entries one at a time with
# reductions over the last axis (O(k * E) per row) instead of a sort or a
# TopK. Routers use k = 1, 2 (rarely up to 8), where that is the fastest
# way on every backend: XLA's CPU backend turns the TopK of a training step
# into a full sort of every row, 42 ms of a 230 ms step at 4096 tokens and
# 128 experts, against 0.3 ms for two reductions (measured here).
MAX_K_BY_REDUCTION = 8


def stable_top_k(scores, k):
    """Returns the `k` largest entries along the last axis, ties to the lower index.

    The same values and indices on every backend, whatever the ties: NaN
    ranks above everything (as in XLA's TopK and NumPy's sort), equal
    values go to the lower index, -0.0 and 0.0 are equal.

    How:
    - `k <= MAX_K_BY_REDUCTION`: k rounds of a max and a min-index over the
      last axis, each excluding the entries already chosen. Only
      reductions over the expert axis, so under a `keras.distribution` the
      work stays where the tokens are (XLA does not partition its TopK
      along token dimensions and would gather the router output of every
      device onto every device).
    - larger k (expert-choice routing picks its top-C tokens): `ops.top_k`
      on JAX and TensorFlow (both break ties to the lower index), a stable
      descending sort on PyTorch (whose `topk` returns the higher index
      first on CPU) and on JAX under a distribution (a sort is partitioned
      along token dimensions, TopK is not).

    Args:
        scores: float tensor of shape `(..., num_experts)`.
        k: int, number of entries to keep, `1 <= k <= num_experts`; a
            scalar int tensor where shapes are unknown when tracing
            (TensorFlow retraces with unknown dimensions, and an
            expert-choice capacity or a batch-prioritised sort then depends
            on the token count).

    Returns:
        Tuple `(values, indices)`, each of shape `(..., k)`, sorted by
        decreasing value; `indices` are int32.
    """
    # A tensor k (unknown shapes) cannot pick a Python loop's length.
    if isinstance(k, numbers.Integral) and k <= MAX_K_BY_REDUCTION:
        return _top_k_by_reduction(scores, k)
    if keras.backend.backend() == "torch":
        import torch

        scores = ops.convert_to_tensor(scores)
        values, indices = torch.sort(scores, dim=-1, descending=True, stable=True)
        return values[..., :k], indices[..., :k].to(torch.int32)
    if _partitioned_top_k_needed():
        return _sorted_top_k_jax(scores, k)
    values, indices = ops.top_k(scores, k, sorted=True)
    return values, ops.cast(indices, "int32")


def _top_k_by_reduction(scores, k):
    """`stable_top_k` by k rounds of max / min-index over the last axis."""
    scores = ops.convert_to_tensor(scores)
    num_entries = scores.shape[-1]
    position = ops.arange(num_entries, dtype="int32")  # (E,)
    # NaN ranks first: as +inf for the choice, returned as NaN.
    keys = ops.where(ops.isnan(scores), float("inf"), scores)
    chosen = ops.zeros_like(keys, dtype="bool")  # (..., E)
    indices = []
    for _ in range(k):
        candidates = ops.where(chosen, float("-inf"), keys)
        best = ops.max(candidates, axis=-1, keepdims=True)  # (..., 1)
        # Lowest unchosen index holding the best value (ties, and rows
        # where only -inf is left).
        is_best = ops.logical_and(candidates == best, ops.logical_not(chosen))
        index = ops.min(ops.where(is_best, position, num_entries), axis=-1)
        indices.append(index)
        chosen = ops.logical_or(chosen, position == ops.expand_dims(index, -1))
    indices = ops.cast(ops.stack(indices, axis=-1), "int32")  # (..., k)
    return ops.take_along_axis(scores, indices, axis=-1), indices


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
