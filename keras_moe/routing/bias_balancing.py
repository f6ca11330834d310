"""Auxiliary-loss-free load balancing (DeepSeek-V3), as pure functions.

A per-expert bias `b` is added to the router scores for the top-k *selection*
only; the combine weights use the scores without it. After each training step
the bias moves against the observed load:

    b_i <- b_i + gamma * sign(mean_load - load_i)

so an overloaded expert becomes less likely to be picked and an underloaded
one more likely, with no gradient through the bias and no balancing term in
the loss.

Reference:
    DeepSeek-AI, 2024, "DeepSeek-V3 Technical Report", section 2.1.2
    (eq. 16 and the bias update below it); Wang et al., 2024,
    "Auxiliary-Loss-Free Load Balancing Strategy for Mixture-of-Experts".
"""

from keras import ops

from keras_moe.routing.top_k import stable_top_k


def biased_top_k(scores, expert_bias, k):
    """Top-k selection on `scores + expert_bias`, weights from `scores`.

    Args:
        scores: float `(..., E)`, the router's scores (sigmoid or softmax).
        expert_bias: float `(E,)`, added for the selection only.
        k: int, experts per token.

    Returns:
        Tuple `(weights, expert_index)`, float `(..., k)` and int32
        `(..., k)`: the chosen experts, best biased score first (ties to the
        lower index), and their *unbiased* scores.
    """
    _, expert_index = stable_top_k(scores + expert_bias, k)  # (..., k)
    weights = ops.take_along_axis(scores, expert_index, axis=-1)
    return weights, expert_index


def update_expert_bias(expert_bias, expert_counts, update_rate):
    """One bias step: `b + update_rate * sign(mean(counts) - counts)`.

    Args:
        expert_bias: float32 `(E,)`.
        expert_counts: float `(E,)`, assignments each expert received in the
            step (any scale: only the sign of the difference to the mean is
            used).
        update_rate: float, gamma.

    Returns:
        float32 `(E,)`, the new bias. Experts exactly at the mean load (and
        all experts when no token was routed) keep their bias.
    """
    expert_counts = ops.cast(expert_counts, "float32")
    mean_load = ops.mean(expert_counts)
    return ops.cast(expert_bias, "float32") + update_rate * ops.sign(
        mean_load - expert_counts
    )
