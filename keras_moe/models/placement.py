"""Which blocks of a transformer get a Mixture-of-Experts feed-forward."""

import numbers

PLACEMENTS = ("all", "none", "every-N", "last-N", "first-N")


def _invalid(moe_layers, num_layers, reason):
    return ValueError(
        f"Received an invalid value for `moe_layers`: {reason}. Expected "
        '"all", "none", "every-N" (every N-th block: "every-2" is blocks '
        '1, 3, 5, ...), "last-N", "first-N", or a list of block indices in '
        f"[0, {num_layers}). Received: moe_layers={moe_layers!r}"
    )


def _parse_count(moe_layers, num_layers, text):
    try:
        count = int(text)
    except ValueError:
        raise _invalid(moe_layers, num_layers, "N is not an integer") from None
    if count < 1:
        raise _invalid(moe_layers, num_layers, "N must be >= 1")
    return count


def moe_block_indices(num_layers, moe_layers):
    """Indices of the blocks whose feed-forward is a `SparseMoE`.

    The placements of the MoE literature:
    - `"every-2"`: every other block, the second of each pair (blocks 1, 3,
      5, ...), as in GShard, Switch Transformer and V-MoE's "Every-2";
      `"every-N"` generally takes blocks `N-1, 2N-1, ...`.
    - `"last-N"`: the last N blocks (V-MoE's "Last-n"); `"first-N"` the first.
    - `"all"`: every block (Mixtral); `"none"`: no block (the dense model).
    - a list or tuple of block indices (negative ones count from the end).

    Args:
        num_layers: int >= 1, number of blocks.
        moe_layers: one of the forms above.

    Returns:
        A sorted tuple of distinct block indices in `[0, num_layers)`.

    Example:

    >>> moe_block_indices(4, "every-2")
    (1, 3)
    >>> moe_block_indices(6, "last-2")
    (4, 5)
    """
    if isinstance(moe_layers, str):
        text = moe_layers.strip().lower()
        if text == "all":
            return tuple(range(num_layers))
        if text == "none":
            return ()
        for prefix in ("every-", "last-", "first-"):
            if text.startswith(prefix):
                count = _parse_count(
                    moe_layers, num_layers, text[len(prefix):]
                )
                if prefix == "every-":
                    return tuple(range(count - 1, num_layers, count))
                if count > num_layers:
                    raise _invalid(
                        moe_layers,
                        num_layers,
                        f"N={count} is more than the {num_layers} blocks",
                    )
                if prefix == "last-":
                    return tuple(range(num_layers - count, num_layers))
                return tuple(range(count))
        raise _invalid(moe_layers, num_layers, "unknown placement")
    if isinstance(moe_layers, (list, tuple)):
        indices = set()
        for index in moe_layers:
            if not isinstance(index, numbers.Integral) or isinstance(
                index, bool
            ):
                raise _invalid(
                    moe_layers, num_layers, f"{index!r} is not an integer"
                )
            if not -num_layers <= index < num_layers:
                raise _invalid(
                    moe_layers, num_layers, f"block {index} does not exist"
                )
            indices.add(int(index) % num_layers)
        return tuple(sorted(indices))
    raise _invalid(moe_layers, num_layers, "not a string or a list")
