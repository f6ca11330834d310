"""Expert-choice routing (Zhou et al., 2022), as pure functions.

Instead of every token choosing its top-k experts, every expert chooses its
top-C tokens of the routing group, by router probability. Each expert
processes exactly C tokens (perfect load balance, no token dropped at
capacity and no balancing loss); a token can be taken by several experts or
by none (it then passes through the residual connection only).

Shapes: N groups of G tokens, E experts, C tokens per expert and group,
d model width. Expert `e`'s buffer row `c` of group `n` holds token
`token_index[n, e, c]`.

Because an expert's choice depends on all tokens of the group, expert choice
cannot be used in causal (autoregressive) models.

Reference:
    Zhou et al., 2022, "Mixture-of-Experts with Expert Choice Routing".
"""

import collections

from keras import ops

from keras_moe.routing.top_k import stable_top_k

ExpertChoicePlan = collections.namedtuple(
    "ExpertChoicePlan", ["token_index", "combine_weights", "kept"]
)
ExpertChoicePlan.__doc__ = """Which tokens each expert takes.

Fields:
    token_index: int32 `(N, E, C)`, the tokens of each expert's buffer, best
        first; within one expert all C are distinct.
    combine_weights: float32 `(N, E, C)`, the router probability of that
        token for that expert; 0 where the slot is not kept.
    kept: bool `(N, E, C)`, false where the expert could only fill the slot
        with a padding token (groups with fewer than C valid tokens).
"""


def select_tokens(router_probs, valid, capacity):
    """Each expert's top-`capacity` tokens of each group.

    Args:
        router_probs: float `(N, G, E)`, router probabilities (softmax over
            experts, as in Zhou et al.).
        valid: bool `(N, G)`, false for padding, which no expert takes
            while a valid token is left.
        capacity: int C, `1 <= C <= G`.

    Returns:
        An `ExpertChoicePlan`. Ties go to the lower token index.
    """
    router_probs = ops.cast(router_probs, "float32")
    scores = ops.transpose(router_probs, (0, 2, 1))  # (N, E, G)
    # Probabilities are >= 0, so padding at -1 ranks below every real token.
    scores = ops.where(ops.expand_dims(valid, 1), scores, -1.0)
    values, token_index = stable_top_k(scores, capacity)  # (N, E, C)
    kept = values >= 0.0
    combine_weights = ops.where(kept, values, 0.0)
    return ExpertChoicePlan(token_index, combine_weights, kept)


def gather_tokens(tokens, token_index):
    """Expert buffers `(N, E, C, d)` from tokens `(N, G, d)`.

    A gather within each group, batched over N (like token-choice
    `dispatch`), so the group axis can be split over devices.
    """
    num_groups, num_experts, capacity = ops.shape(token_index)
    model_dim = ops.shape(tokens)[-1]
    flat_index = ops.reshape(
        token_index, (num_groups, num_experts * capacity, 1)
    )
    buffers = ops.take_along_axis(tokens, flat_index, axis=1)  # (N, E*C, d)
    return ops.reshape(
        buffers, (num_groups, num_experts, capacity, model_dim)
    )


def _token_rows(token_index, group_size):
    """Flat row `n * G + t` of each chosen token, int32 `(N, E, C)`."""
    num_groups = ops.shape(token_index)[0]
    group_offset = ops.reshape(
        ops.arange(num_groups, dtype="int32") * group_size, (-1, 1, 1)
    )
    return ops.cast(token_index, "int32") + group_offset


def combine_outputs(expert_outputs, plan, group_size):
    """Weighted sum of each token's expert outputs, `(N, G, d)`.

    `outputs[n, t] = sum_e w[n, e, c] * expert_outputs[n, e, c]` over the
    slots `c` where expert e took token t. Within one expert the C tokens
    are distinct, so each expert's contribution is a scatter-add without
    collisions; the experts are then added one after another in index
    order. The summation order is therefore fixed (no float atomics racing
    on one token), and repeated runs are bit-identical on every device.

    Args:
        expert_outputs: `(N, E, C, d)`.
        plan: the `ExpertChoicePlan` the buffers were gathered with.
        group_size: int G.

    Returns:
        `(N, G, d)` in the dtype of `expert_outputs`; tokens no expert took
        are zeros.
    """
    expert_outputs = ops.convert_to_tensor(expert_outputs)
    num_groups, num_experts, capacity, model_dim = ops.shape(expert_outputs)
    weights = ops.cast(plan.combine_weights, expert_outputs.dtype)
    weighted = expert_outputs * ops.expand_dims(weights, -1)  # (N, E, C, d)
    rows = _token_rows(plan.token_index, group_size)  # (N, E, C)
    num_rows = num_groups * group_size
    outputs = None
    for expert in range(num_experts):
        contribution = ops.segment_sum(
            ops.reshape(weighted[:, expert], (-1, model_dim)),  # (N*C, d)
            ops.reshape(rows[:, expert], (-1,)),  # (N*C,), distinct
            num_segments=num_rows,
        )  # (N * G, d)
        outputs = contribution if outputs is None else outputs + contribution
    return ops.reshape(outputs, (num_groups, group_size, model_dim))


def token_weights(plan, group_size):
    """Dense per-token view of the plan: float32 `(N, G, E)`.

    `[n, t, e]` is the combine weight of expert e for token t (0 when e did
    not take t). `token_weights(...) > 0` counts the experts per token.
    """
    num_groups, num_experts, capacity = ops.shape(plan.token_index)
    rows = _token_rows(plan.token_index, group_size)  # (N, E, C)
    experts = ops.reshape(ops.arange(num_experts, dtype="int32"), (1, -1, 1))
    cells = rows * num_experts + experts  # (N, E, C), distinct
    dense = ops.segment_sum(
        ops.reshape(ops.cast(plan.combine_weights, "float32"), (-1,)),
        ops.reshape(cells, (-1,)),
        num_segments=num_groups * group_size * num_experts,
    )
    return ops.reshape(dense, (num_groups, group_size, num_experts))


def experts_per_token(plan, group_size):
    """float32 `(N, G)`: how many experts took each token (kept slots)."""
    num_groups = ops.shape(plan.token_index)[0]
    rows = _token_rows(plan.token_index, group_size)
    counts = ops.segment_sum(
        ops.reshape(ops.cast(plan.kept, "float32"), (-1,)),
        ops.reshape(rows, (-1,)),
        num_segments=num_groups * group_size,
    )
    return ops.reshape(counts, (num_groups, group_size))
