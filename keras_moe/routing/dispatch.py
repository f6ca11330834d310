"""Pure routing maths for token-choice MoE: capacity, slots, dispatch, combine.

Every function here is a plain function of tensors (no layer state), so tests
call them directly and the layers stay thin.

Notation used in shapes:
    N: number of routing groups, G: tokens per group, k: experts per token,
    E: number of experts, C: capacity (buffer slots per expert per group),
    d: model width.

Buffers are laid out expert-major: row `e * (N * C) + n * C + slot` of the
flat `(E * N * C, d)` buffer holds the token that group `n` sent to slot
`slot` of expert `e`. Reshaping that flat buffer to `(E, N * C, d)` gives each
expert its contiguous input without any transpose.
"""

import collections
import math

from keras import ops

RoutingPlan = collections.namedtuple("RoutingPlan", ["slot", "kept"])
RoutingPlan.__doc__ = """Where each (token, choice) assignment goes.

Fields:
    slot: int32 `(N, G, k)`, the assignment's position in its expert's queue
        within the group, counted in priority order; -1 for invalid tokens.
    kept: bool `(N, G, k)`, true when the token is valid and
        `slot < capacity`; false assignments are dropped.
"""

PRIORITIES = ("k_major", "token_major")


def is_static(*values):
    """True when every value is a Python int (a shape known at trace time)."""
    return all(isinstance(v, int) for v in values)


def compute_capacity(
    group_size, num_experts, top_k, capacity_factor, min_capacity=4
):
    """Buffer slots per expert per group.

    `capacity = min(group_size, max(min_capacity,
    ceil(capacity_factor * group_size * top_k / num_experts)))`.
    An expert can never receive more than `group_size` assignments from one
    group (a token picks distinct experts), so `capacity_factor=None`
    (dropless) gives `group_size`, which drops nothing.

    Args:
        group_size: int, or a scalar int tensor when the token count is only
            known at run time (TensorFlow graphs with a `None` batch).
        num_experts: int.
        top_k: int.
        capacity_factor: positive float, or `None` for no dropping.
        min_capacity: int, lower bound on the capacity.

    Returns:
        The capacity, a Python int when `group_size` is one.
    """
    if is_static(group_size):
        if capacity_factor is None:
            return group_size
        capacity = math.ceil(capacity_factor * group_size * top_k / num_experts)
        return min(group_size, max(min_capacity, capacity))
    group_size = ops.cast(group_size, "int32")
    if capacity_factor is None:
        return group_size
    capacity = ops.cast(
        ops.ceil(
            ops.cast(group_size, "float32")
            * (capacity_factor * top_k / num_experts)
        ),
        "int32",
    )
    return ops.minimum(group_size, ops.maximum(min_capacity, capacity))


def compute_routing_plan(
    expert_index, valid, num_experts, capacity, priority="k_major"
):
    """Gives every assignment a slot in its expert's buffer.

    Slots are handed out per group in priority order:
    - `"k_major"` (GShard, Switch): every token's first choice before any
      token's second choice, then token order. Best quality, but a token's
      second choice can be displaced by a *later* token's first choice.
    - `"token_major"`: token order first, then choice order, so a token's
      slots depend only on earlier tokens (needed by causal models).

    The positions come from a cumulative sum over a one-hot of the chosen
    experts, `(N, k * G, E)` int32, the formulation XLA fuses well.

    Args:
        expert_index: int `(N, G, k)`, chosen experts.
        valid: bool `(N, G)`, false for padding (never routed).
        num_experts: int, E.
        capacity: int (or scalar int tensor), C.
        priority: `"k_major"` or `"token_major"`.

    Returns:
        A `RoutingPlan`.
    """
    if priority not in PRIORITIES:
        raise ValueError(
            f"Received an invalid value for `priority`, expected one of "
            f"{PRIORITIES}. Received: priority={priority!r}"
        )
    num_groups, group_size, top_k = ops.shape(expert_index)
    expert_index = ops.cast(expert_index, "int32")
    valid_k = ops.broadcast_to(
        ops.expand_dims(ops.cast(valid, "int32"), -1), ops.shape(expert_index)
    )
    if priority == "k_major":
        # (N, G, k) -> (N, k, G) -> (N, k * G): choice 0 of every token first.
        order = lambda t: ops.reshape(
            ops.transpose(t, (0, 2, 1)), (num_groups, -1)
        )
    else:
        order = lambda t: ops.reshape(t, (num_groups, -1))
    ordered_index = order(expert_index)  # (N, A) with A = k * G
    ordered_valid = order(valid_k)  # (N, A)

    # (N, A, E): 1 where an assignment asks for that expert.
    one_hot = ops.one_hot(ordered_index, num_experts, dtype="int32")
    one_hot = one_hot * ops.expand_dims(ordered_valid, -1)
    # Queue position = number of earlier requests to the same expert.
    position = ops.cumsum(one_hot, axis=1)  # (N, A, E)
    ordered_slot = ops.sum(position * one_hot, axis=-1) - 1  # (N, A), -1 invalid

    if priority == "k_major":
        slot = ops.transpose(
            ops.reshape(ordered_slot, (num_groups, top_k, group_size)),
            (0, 2, 1),
        )
    else:
        slot = ops.reshape(ordered_slot, (num_groups, group_size, top_k))
    kept = ops.logical_and(slot >= 0, slot < capacity)
    return RoutingPlan(slot=slot, kept=kept)


def buffer_rows(expert_index, plan, num_experts, capacity):
    """Row of the flat expert-major buffer for each assignment.

    Args:
        expert_index: int `(N, G, k)`.
        plan: `RoutingPlan` from `compute_routing_plan`.
        num_experts: int E.
        capacity: int C.

    Returns:
        int32 `(N, G, k)`: `e * (N * C) + n * C + slot` for kept assignments,
        and the dummy row `E * N * C` (one past the buffer) for dropped ones.
    """
    num_groups = ops.shape(expert_index)[0]
    rows_per_expert = num_groups * capacity
    group_offset = ops.reshape(
        ops.arange(num_groups, dtype="int32") * capacity, (-1, 1, 1)
    )  # (N, 1, 1)
    rows = (
        ops.cast(expert_index, "int32") * rows_per_expert
        + group_offset
        + plan.slot
    )
    dummy_row = num_experts * rows_per_expert
    return ops.where(plan.kept, rows, dummy_row)


def dispatch(tokens, rows, num_experts, capacity):
    """Copies each kept token into its expert's buffer.

    Built as a gather: first an int32 map from buffer row to token (one
    scatter of `N * G * k` ints), then one gather of `E * N * C` rows of the
    tokens. Empty slots read a zero row. No `(tokens, experts, capacity)`
    one-hot is ever formed, and each slot is written at most once, so the
    result does not depend on scatter order.

    Args:
        tokens: `(N, G, d)`.
        rows: int32 `(N, G, k)` from `buffer_rows` (dummy row for dropped).
        num_experts: int E.
        capacity: int C.

    Returns:
        Expert buffers `(E, N * C, d)`.
    """
    num_groups, group_size, model_dim = ops.shape(tokens)
    num_tokens = num_groups * group_size
    num_rows = num_experts * num_groups * capacity
    top_k = ops.shape(rows)[-1]
    token_id = ops.broadcast_to(
        ops.reshape(ops.arange(num_tokens, dtype="int32"), (num_groups, group_size, 1)),
        (num_groups, group_size, top_k),
    )
    # Row -> token map; unfilled rows (and the dummy row) point at the zero
    # row appended after the tokens, index `num_tokens`.
    row_to_token = ops.scatter_update(
        ops.full((num_rows + 1,), num_tokens, dtype="int32"),
        ops.reshape(rows, (-1, 1)),
        ops.reshape(token_id, (-1,)),
    )[:num_rows]
    flat_tokens = ops.concatenate(
        [
            ops.reshape(tokens, (num_tokens, model_dim)),
            ops.zeros((1, model_dim), dtype=tokens.dtype),
        ],
        axis=0,
    )  # (N * G + 1, d)
    buffers = ops.take(flat_tokens, row_to_token, axis=0)  # (E * N * C, d)
    return ops.reshape(buffers, (num_experts, num_groups * capacity, model_dim))


def combine(expert_outputs, rows, combine_weights):
    """Gathers each assignment's expert output and sums them weighted.

    Args:
        expert_outputs: `(E, N * C, d)`.
        rows: int32 `(N, G, k)` from `buffer_rows`.
        combine_weights: `(N, G, k)`; dropped assignments contribute 0
            whatever their weight, because they read the zero row.

    Returns:
        `(N, G, d)` in the dtype of `expert_outputs`. The k outputs are summed
        in choice order with a fixed-shape reduction, so repeated runs give
        bit-identical results.
    """
    num_experts, rows_per_expert, model_dim = ops.shape(expert_outputs)
    flat_outputs = ops.concatenate(
        [
            ops.reshape(expert_outputs, (-1, model_dim)),
            ops.zeros((1, model_dim), dtype=expert_outputs.dtype),
        ],
        axis=0,
    )  # (E * N * C + 1, d)
    gathered = ops.take(flat_outputs, rows, axis=0)  # (N, G, k, d)
    weights = ops.cast(combine_weights, expert_outputs.dtype)
    return ops.sum(gathered * ops.expand_dims(weights, -1), axis=2)
