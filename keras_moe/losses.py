"""Balancing terms for MoE routers, as plain functions of float32 tensors.

Each function takes an optional `mask` (true for real tokens) so padding never
counts, and returns an unweighted float32 scalar; the layers multiply by their
own weight arguments before `add_loss`.
"""

from keras import ops


def _token_weights(shape_source, mask):
    """float32 weights `(...,)`: the mask as 0/1, or ones."""
    token_shape = ops.shape(shape_source)[:-1]
    if mask is None:
        return ops.ones(token_shape, dtype="float32")
    return ops.cast(ops.reshape(mask, token_shape), "float32")


def expert_assignment_counts(expert_index, num_experts, mask=None):
    """Assignments each expert receives, before any capacity limit.

    Args:
        expert_index: int `(..., k)`.
        num_experts: int E.
        mask: optional bool `(...)`, false for tokens that are not routed.

    Returns:
        float32 `(E,)`, summing to `k * (number of valid tokens)`.
    """
    weights = ops.broadcast_to(
        ops.expand_dims(_token_weights(expert_index, mask), -1),
        ops.shape(expert_index),
    )
    # segment_sum with a static segment count stays jittable, unlike bincount.
    return ops.segment_sum(
        ops.reshape(weights, (-1,)),
        ops.reshape(ops.cast(expert_index, "int32"), (-1,)),
        num_segments=num_experts,
    )


def load_balancing_loss(router_probs, expert_index, mask=None):
    """Switch Transformer load-balancing loss, generalised to top-k.

    `loss = E * sum_i f_i * P_i`, where `P_i` is the mean router probability of
    expert i over valid tokens and `f_i` is the fraction of all *assignments*
    (every one of the k choices of every valid token) that go to expert i, so
    `sum_i f_i = 1`. The loss is 1 under perfectly uniform routing for any k,
    and E when every token sends everything to one expert with certainty.
    (Switch, with k=1, uses each token's top-1 choice; with k > 1 we average
    over the k choices, as GShard and Mixtral's auxiliary loss do up to scale.)

    Args:
        router_probs: float `(..., E)`, softmax of the router logits.
        expert_index: int `(..., k)`, chosen experts.
        mask: optional bool `(...)`.

    Returns:
        float32 scalar.

    Reference:
        Fedus et al., 2021, "Switch Transformers", eq. (4).
    """
    router_probs = ops.cast(router_probs, "float32")
    num_experts = ops.shape(router_probs)[-1]
    top_k = ops.shape(expert_index)[-1]
    token_weights = _token_weights(router_probs, mask)  # (...)
    num_tokens = ops.maximum(ops.sum(token_weights), 1.0)
    flat_probs = ops.reshape(router_probs, (-1, num_experts))
    mean_probs = (
        ops.sum(flat_probs * ops.reshape(token_weights, (-1, 1)), axis=0)
        / num_tokens
    )  # (E,)
    counts = expert_assignment_counts(expert_index, num_experts, mask)
    fractions = counts / (num_tokens * top_k)  # (E,)
    return num_experts * ops.sum(fractions * mean_probs)


def router_z_loss(router_logits, mask=None):
    """ST-MoE router z-loss: mean over tokens of `logsumexp(logits)^2`.

    Penalises large logits, which keeps the router's softmax in a range where
    float32 (and bfloat16 downstream) round-off stays small.

    Args:
        router_logits: float `(..., E)`.
        mask: optional bool `(...)`.

    Returns:
        float32 scalar.

    Reference:
        Zoph et al., 2022, "ST-MoE: Designing Stable and Transferable Sparse
        Expert Models", eq. (5).
    """
    router_logits = ops.cast(router_logits, "float32")
    token_weights = _token_weights(router_logits, mask)
    log_z = ops.logsumexp(router_logits, axis=-1)  # (...)
    num_tokens = ops.maximum(ops.sum(token_weights), 1.0)
    return ops.sum(ops.square(log_z) * token_weights) / num_tokens
