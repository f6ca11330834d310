"""Top-k with the same tie-breaking on every backend."""

import keras
from keras import ops


def stable_top_k(scores, k):
    """Returns the `k` largest entries along the last axis, ties to the lower index.

    `ops.top_k` breaks ties towards the lower index on JAX and TensorFlow
    (both document it) but not on PyTorch, whose `topk` returns the higher
    index first on CPU. Routing must not depend on the backend, so on PyTorch
    this uses a stable descending sort instead (O(E log E) per token, which is
    negligible next to the router matmul for any realistic number of experts).

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
    values, indices = ops.top_k(scores, k, sorted=True)
    return values, ops.cast(indices, "int32")
