"""Dropless token-choice dispatch: rows sorted by expert, no capacity.

With `capacity_factor=None` no assignment may be dropped, and a capacity
buffer large enough for any routing (`C = G` per expert) would make every
expert process as many rows as there are tokens. Instead every assignment
gets one row of a buffer sorted by expert, and `grouped_matmul` multiplies
each expert's rows by its own kernel, so the work is proportional to
`tokens x k` whatever the number of experts (MegaBlocks' formulation).

Shapes stay static: the buffer has one row per assignment, `A = T * k`
rows whatever the routing; only the group sizes depend on it.

Notation: T tokens, k choices, A = T * k assignments, E experts, d width.
"""

import collections

from keras import ops

from keras_moe.routing.dispatch import weighted_sum_over_choices
from keras_moe.routing.top_k import stable_argsort

DroplessLayout = collections.namedtuple(
    "DroplessLayout", ["source_token", "rows", "group_sizes"]
)
DroplessLayout.__doc__ = """Where each assignment sits in the sorted buffer.

Fields:
    source_token: int32 `(A,)`, the token each buffer row holds; T (one
        past the last token, a zero row) for the rows past the experts'
        (those of masked tokens' assignments).
    rows: int32 `(T, k)`, the buffer row of each assignment; A (one past
        the buffer, a zero row) for masked tokens.
    group_sizes: int32 `(E,)`, rows of each expert, in expert order.
"""


def dropless_layout(expert_index, valid, num_experts):
    """Sorts the assignments by expert into a buffer of static size.

    Assignments are ordered by expert, then token, then choice (a stable
    sort of the expert ids), so the layout is the same on every backend.

    Args:
        expert_index: int `(T, k)`, chosen experts.
        valid: bool `(T,)`, false for padding (not routed).
        num_experts: int E.

    Returns:
        A `DroplessLayout`.
    """
    num_tokens, top_k = ops.shape(expert_index)
    num_assignments = num_tokens * top_k
    valid_k = ops.reshape(
        ops.broadcast_to(ops.expand_dims(valid, -1), ops.shape(expert_index)),
        (-1,),
    )  # (A,)
    # Masked assignments get expert id E, which sorts after every expert.
    expert = ops.where(
        valid_k,
        ops.reshape(ops.cast(expert_index, "int32"), (-1,)),
        num_experts,
    )  # (A,)
    order = stable_argsort(expert)  # (A,): assignment at each buffer row
    counts = ops.segment_sum(
        ops.ones((num_assignments,), "int32"),
        expert,
        num_segments=num_experts + 1,
    )  # (E + 1,): the last one counts masked assignments
    num_routed = num_assignments - counts[num_experts]
    rows_in_use = ops.arange(num_assignments, dtype="int32") < num_routed
    source_token = ops.where(rows_in_use, order // top_k, num_tokens)  # (A,)
    # Assignment -> buffer row: the inverse permutation of the sort.
    rows = stable_argsort(order)  # (A,)
    rows = ops.where(valid_k, rows, num_assignments)
    return DroplessLayout(
        source_token=ops.cast(source_token, "int32"),
        rows=ops.cast(ops.reshape(rows, (num_tokens, top_k)), "int32"),
        group_sizes=ops.cast(counts[:num_experts], "int32"),
    )


def dropless_dispatch(tokens, layout):
    """Gathers tokens `(T, d)` into the sorted buffer `(A, d)`."""
    padded = ops.concatenate(
        [tokens, ops.zeros((1, ops.shape(tokens)[1]), tokens.dtype)], axis=0
    )  # (T + 1, d): row T is the zero row of padding rows
    return ops.take(padded, layout.source_token, axis=0)


def dropless_combine(expert_outputs, layout, combine_weights):
    """Gathers each assignment's output `(A, d)` and sums the k weighted.

    Args:
        expert_outputs: `(A, d)`, the buffer after the experts.
        layout: the `DroplessLayout` of the dispatch.
        combine_weights: `(T, k)`.

    Returns:
        `(T, d)`. The k outputs of a token are summed in choice order with a
        fixed-shape reduction, so repeated runs give bit-identical results;
        masked tokens get zeros.
    """
    padded = ops.concatenate(
        [
            expert_outputs,
            ops.zeros((1, ops.shape(expert_outputs)[1]), expert_outputs.dtype),
        ],
        axis=0,
    )  # (A + 1, d): row A is the zero row of masked assignments
    gathered = ops.take(padded, layout.rows, axis=0)  # (T, k, d)
    return weighted_sum_over_choices(
        gathered, ops.cast(combine_weights, expert_outputs.dtype)
    )
