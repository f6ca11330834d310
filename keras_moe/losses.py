"""Balancing terms for MoE routers, as plain functions of float32 tensors.

Each function takes an optional `mask` (true for real tokens) so padding never
counts, and returns an unweighted float32 scalar (`expert_assignment_counts`
and `noisy_top_k_expected_load` return the per-expert `(E,)` vectors behind
them); the layers multiply by their own weight arguments before `add_loss`.
"""

import math

from keras import ops

from keras_moe.routing.top_k import stable_top_k


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


def cv_squared(values):
    """Squared coefficient of variation, `variance / mean^2`, of a vector.

    Population variance (divided by the length), as in Shazeer et al.'s
    implementation; a tiny epsilon keeps an all-zero vector at 0.

    Args:
        values: float `(E,)`.

    Returns:
        float32 scalar, 0 for a constant vector (and for E = 1).
    """
    values = ops.cast(values, "float32")
    mean = ops.mean(values)
    variance = ops.mean(ops.square(values - mean))
    return variance / (ops.square(mean) + 1e-10)


def importance_loss(gates, mask=None):
    """Importance loss: CV^2 of each expert's summed gate values.

    `Importance(X)_i = sum_t G(x_t)_i`, where `G(x_t)` is the token's gate
    vector over all E experts (its combine weights at the chosen experts and
    0 elsewhere); the loss `CV(Importance)^2` is 0 when every expert gets
    the same total gate weight.

    Args:
        gates: float `(..., E)`, each token's gate values.
        mask: optional bool `(...)`, false for tokens that do not count.

    Returns:
        float32 scalar.

    Reference:
        Shazeer et al., 2017, "Outrageously Large Neural Networks", eq. (6)
        and (7).
    """
    gates = ops.cast(gates, "float32")
    num_experts = ops.shape(gates)[-1]
    token_weights = ops.reshape(_token_weights(gates, mask), (-1, 1))
    importance = ops.sum(
        ops.reshape(gates, (-1, num_experts)) * token_weights, axis=0
    )  # (E,)
    return cv_squared(importance)


def _normal_cdf(x):
    return 0.5 * (1.0 + ops.erf(x / math.sqrt(2.0)))


def noisy_top_k_expected_load(
    clean_logits, noisy_logits, noise_std, expert_index, mask=None
):
    """Expected number of tokens per expert under noisy top-k gating.

    For token x and expert i, the probability that i is among the top k when
    only i's noise is drawn again, the other noisy logits staying fixed:

    `P(x, i) = Phi((clean_i - threshold_i) / noise_std_i)`, where the
    threshold is the k-th largest noisy logit *excluding* expert i: the
    (k+1)-th largest overall when i is selected, the k-th largest when it is
    not. Unlike the selection counts, this is smooth in the logits and the
    noise scale, so the load loss has a gradient.
    `Load(X)_i = sum_x P(x, i)`.

    Args:
        clean_logits: float `(..., E)`, logits without the noise.
        noisy_logits: float `(..., E)`, the logits the selection used.
        noise_std: float `(..., E)` (or anything broadcasting to it), the
            std of the noise, > 0.
        expert_index: int `(..., k)`, the experts selected on
            `noisy_logits`.
        mask: optional bool `(...)`.

    Returns:
        float32 `(E,)`. With k = E every expert is always selected and the
        load is the number of valid tokens for each.

    Reference:
        Shazeer et al., 2017, appendix A, eq. (8)-(10).
    """
    clean_logits = ops.cast(clean_logits, "float32")
    noisy_logits = ops.cast(noisy_logits, "float32")
    num_experts = ops.shape(noisy_logits)[-1]
    top_k = ops.shape(expert_index)[-1]
    token_weights = _token_weights(noisy_logits, mask)  # (...)
    if top_k >= num_experts:
        return ops.ones((num_experts,), "float32") * ops.sum(token_weights)
    top_values, _ = stable_top_k(noisy_logits, top_k + 1)  # (..., k+1)
    threshold_if_in = top_values[..., top_k : top_k + 1]  # (k+1)-th
    threshold_if_out = top_values[..., top_k - 1 : top_k]  # k-th
    is_in = ops.sum(
        ops.one_hot(ops.cast(expert_index, "int32"), num_experts), axis=-2
    ) > 0  # (..., E)
    threshold = ops.where(is_in, threshold_if_in, threshold_if_out)
    probability = _normal_cdf(
        (clean_logits - threshold) / ops.cast(noise_std, "float32")
    )  # (..., E)
    flat = ops.reshape(probability, (-1, num_experts))
    return ops.sum(flat * ops.reshape(token_weights, (-1, 1)), axis=0)


def noisy_top_k_load_loss(
    clean_logits, noisy_logits, noise_std, expert_index, mask=None
):
    """Load loss: CV^2 of `noisy_top_k_expected_load` (Shazeer et al.).

    Arguments as `noisy_top_k_expected_load`; returns a float32 scalar, 0
    when every expert expects the same number of tokens.

    Reference:
        Shazeer et al., 2017, appendix A, eq. (11); Riquelme et al., 2021,
        "Scaling Vision with Sparse Mixture of Experts", appendix A.
    """
    return cv_squared(
        noisy_top_k_expected_load(
            clean_logits, noisy_logits, noise_std, expert_index, mask
        )
    )


def sequence_balance_loss(scores, expert_index, mask=None):
    """DeepSeek-V3's complementary sequence-wise balance loss (unweighted).

    Per sequence (here: per leading index, a routing group) of T tokens:
    `sum_i f_i P_i`, with `s'` the scores normalised to sum to 1 over the
    experts, `P_i = mean_t s'_{i,t}` and `f_i = E / (k T) * (number of the
    sequence's selections that chose i)`; 1.0 when balanced. The result is
    the mean over sequences that hold a valid token. For one sequence and
    softmax scores this is exactly `load_balancing_loss`.

    Args:
        scores: float `(N, G, E)`, non-negative router scores (sigmoid in
            DeepSeek-V3).
        expert_index: int `(N, G, k)`, the selected experts.
        mask: optional bool `(N, G)`.

    Returns:
        float32 scalar.

    Reference:
        DeepSeek-AI, 2024, "DeepSeek-V3 Technical Report", eq. (17)-(20).
    """
    scores = ops.cast(scores, "float32")
    num_experts = ops.shape(scores)[-1]
    top_k = ops.shape(expert_index)[-1]
    token_weights = _token_weights(scores, mask)  # (N, G)
    num_tokens = ops.sum(token_weights, axis=1)  # (N,)
    safe_tokens = ops.maximum(num_tokens, 1.0)
    normalized = scores / ops.maximum(
        ops.sum(scores, axis=-1, keepdims=True), 1e-20
    )
    mean_scores = ops.sum(
        normalized * ops.expand_dims(token_weights, -1), axis=1
    ) / ops.expand_dims(safe_tokens, -1)  # (N, E)
    selections = ops.one_hot(
        ops.cast(expert_index, "int32"), num_experts
    )  # (N, G, k, E)
    counts = ops.sum(
        selections * token_weights[:, :, None, None], axis=(1, 2)
    )  # (N, E)
    fractions = num_experts * counts / (
        top_k * ops.expand_dims(safe_tokens, -1)
    )
    per_sequence = ops.sum(fractions * mean_scores, axis=-1)  # (N,)
    has_tokens = ops.cast(num_tokens > 0, "float32")
    return ops.sum(per_sequence * has_tokens) / ops.maximum(
        ops.sum(has_tokens), 1.0
    )
