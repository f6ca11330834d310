"""Grouped matmul: each contiguous group of rows times its own expert kernel.

`grouped_matmul(x, kernel, group_sizes)` is the compute core of the dropless
mode: rows sorted by expert, `group_sizes[e]` of them for expert e, and
`rows_e @ kernel[e]` for every e, in a cost proportional to the rows (not to
`rows x experts`). Each backend has a fast path behind this one function:

- JAX on GPU / TPU: `jax.lax.ragged_dot`, XLA's grouped matmul.
- JAX on CPU: XLA's CPU `ragged_dot` computes every group for every row
  (measured here: ~15x a plain matmul at 8 experts, ~40x at 128). Instead
  the rows are cut into tiles (`_jax_cpu_tile_rows`), each tile into
  pieces where an expert's rows begin, and a `fori_loop` with a *dynamic*
  trip count multiplies only the pieces that hold rows, each as a whole
  tile masked to its own rows (custom VJP, loops of the same length in the
  backward pass). Static shapes, no buffer larger than the rows, work
  proportional to `rows + experts x tile` (a tile per expert boundary).
- PyTorch (eager): one matmul per non-empty group, on slices.
- TensorFlow: one matmul per group on `tf.split` slices. Dynamic shapes
  are fine in TF graphs but not under XLA, so a dropless `SparseMoE` sets
  `supports_jit = False` on TensorFlow (Keras then trains without XLA).
- Portable fallback (`_masked_grouped_matmul`): every expert on every row,
  masked. Exact and backend-agnostic but E times the work; used only where
  no fast path applies, and by the tests as the reference of the fast paths.
"""

import functools

import keras
from keras import ops


# Rows per tile of the JAX CPU path. Every expert boundary costs up to a
# tile of wasted rows, so the work is about `rows + experts x tile`: large
# tiles multiply more efficiently, small ones waste less when experts have
# few rows each. Measured (one projection 256 -> 512, forward + backward,
# 8192 rows): 1024 rows per expert, tiles of 128 beat 64 (37 vs 47-71 ms);
# 64 rows per expert (128 experts), tiles of 64 beat 128 (78-84 vs 89-99
# ms) and 32 (80-82 ms).
JAX_CPU_TILE_ROWS = 128
JAX_CPU_SMALL_TILE_ROWS = 64


def _jax_cpu_tile_rows(num_rows, num_groups):
    """Tile height for `num_rows` rows over `num_groups` groups (static)."""
    if num_rows <= JAX_CPU_TILE_ROWS * num_groups:  # <= 128 rows per group
        return JAX_CPU_SMALL_TILE_ROWS
    return JAX_CPU_TILE_ROWS


def _jax_platform():
    import jax

    return jax.devices()[0].platform


def grouped_matmul(x, kernel, group_sizes):
    """`rows_e @ kernel[e]` for the contiguous row groups of `x`.

    Args:
        x: `(R, d)` rows, sorted by group: rows `[start_e, start_e +
            group_sizes[e])` belong to group e, with `start` the exclusive
            cumulative sum of `group_sizes`.
        kernel: `(E, d, h)`, one kernel per group.
        group_sizes: int32 `(E,)`, `sum(group_sizes) <= R`.

    Returns:
        `(R, h)`; rows past `sum(group_sizes)` are zeros.
    """
    # Keras variables (the experts' kernels) become backend tensors here.
    x, kernel = ops.convert_to_tensor(x), ops.convert_to_tensor(kernel)
    group_sizes = ops.cast(group_sizes, "int32")
    backend = keras.backend.backend()
    if backend == "jax":
        if _jax_platform() in ("gpu", "cuda", "rocm", "tpu"):
            return _jax_ragged_dot(x, kernel, group_sizes)
        tile_rows = _jax_cpu_tile_rows(x.shape[0], kernel.shape[0])
        return _jax_tiled_matmul(x, kernel, group_sizes, tile_rows)
    if backend == "torch":
        return _torch_grouped_matmul(x, kernel, group_sizes)
    if backend == "tensorflow":
        return _tf_grouped_matmul(x, kernel, group_sizes)
    return _masked_grouped_matmul(x, kernel, group_sizes)


def _masked_grouped_matmul(x, kernel, group_sizes):
    """Portable reference: every kernel on every row, keep each row's own."""
    num_rows = ops.shape(x)[0]
    group_of_row = group_of_rows(group_sizes, num_rows)  # (R,), E = past the end
    outputs = ops.einsum("rd,edh->reh", x, kernel)  # (R, E, h)
    num_groups = ops.shape(kernel)[0]
    # E + 1 classes: rows past the groups get the extra one, dropped here.
    one_hot = ops.one_hot(group_of_row, num_groups + 1, dtype=x.dtype)[:, :-1]
    return ops.einsum("reh,re->rh", outputs, one_hot)


def group_of_rows(group_sizes, num_rows):
    """int32 `(R,)`: the group each row belongs to, E for rows past the end."""
    ends = ops.cumsum(ops.cast(group_sizes, "int32"))  # (E,)
    rows = ops.arange(num_rows, dtype="int32")
    return ops.cast(ops.searchsorted(ends, rows, side="right"), "int32")


# === JAX ===


def _jax_ragged_dot(x, kernel, group_sizes):
    import jax

    return jax.lax.ragged_dot(x, kernel, group_sizes.astype("int32"))


def _jax_tiled_matmul(x, kernel, group_sizes, tile_rows):
    import jax.numpy as jnp

    num_rows = x.shape[0]
    num_groups = kernel.shape[0]
    # Pad to whole tiles; the padding rows are past every group.
    padding = -num_rows % tile_rows
    if padding:
        x = jnp.pad(x, ((0, padding), (0, 0)))
    padded_rows = x.shape[0]
    num_tiles = padded_rows // tile_rows
    ends = jnp.cumsum(group_sizes)  # (E,)
    starts = ends - group_sizes  # (E,)
    # Pieces: the rows between consecutive boundaries, where a boundary is
    # a tile start or a group start; each piece is one group's rows within
    # one tile. At most num_tiles + E of them, most often far fewer.
    boundaries = jnp.sort(
        jnp.concatenate([jnp.arange(num_tiles, dtype="int32") * tile_rows, starts])
    )  # (P,), P = num_tiles + E
    piece_ends = jnp.concatenate(
        [boundaries[1:], jnp.full((1,), padded_rows, "int32")]
    )
    active = jnp.logical_and(piece_ends > boundaries, boundaries < ends[-1])
    # Active pieces first, in row order, for a loop of dynamic length.
    order = jnp.argsort(jnp.logical_not(active), stable=True)
    piece_start = boundaries[order]
    piece_end = jnp.minimum(piece_ends[order], ends[-1])
    piece_group = jnp.minimum(
        jnp.searchsorted(ends, piece_start, side="right"), num_groups - 1
    ).astype("int32")
    pieces = (piece_start, piece_end, piece_group)
    num_active = jnp.sum(active).astype("int32")
    outputs = _tiled_matmul(x, kernel, pieces, num_active, tile_rows)
    return outputs[:num_rows]


def _piece(pieces, index, tile_rows):
    """(first row of the piece's tile, row mask `(B, 1)`, group) of a piece."""
    import jax.numpy as jnp

    piece_start, piece_end, piece_group = pieces
    start = piece_start[index]
    tile_start = start // tile_rows * tile_rows
    rows = tile_start + jnp.arange(tile_rows, dtype="int32")
    mask = jnp.logical_and(rows >= start, rows < piece_end[index])
    return tile_start, mask[:, None], piece_group[index]


def _piece_loop(x, kernel, pieces, num_active, tile_rows, transpose=False):
    """`y[piece rows] = x[piece rows] @ kernel[piece group]`, piece by piece.

    With `transpose=True`, `@ kernel[group].T` (the backward pass), without
    materialising a transposed copy of the whole `(E, d, h)` kernel: at 128
    experts that copy alone cost more than all the pieces' matmuls.
    """
    import jax

    out_dim = kernel.shape[1] if transpose else kernel.shape[2]
    outputs = jax.numpy.zeros((x.shape[0], out_dim), x.dtype)
    contract = 1 if transpose else 0  # kernel axis contracted with rows' 1

    def body(index, outputs):
        tile_start, mask, group = _piece(pieces, index, tile_rows)
        rows = jax.lax.dynamic_slice_in_dim(x, tile_start, tile_rows)
        weights = jax.lax.dynamic_index_in_dim(kernel, group, keepdims=False)
        product = jax.lax.dot_general(rows, weights, (((1,), (contract,)), ((), ())))
        previous = jax.lax.dynamic_slice_in_dim(outputs, tile_start, tile_rows)
        update = jax.numpy.where(mask, product, previous)
        return jax.lax.dynamic_update_slice_in_dim(outputs, update, tile_start, 0)

    return jax.lax.fori_loop(0, num_active, body, outputs)


@functools.lru_cache(maxsize=None)
def _make_tiled_matmul():
    import jax

    @functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
    def tiled_matmul(x, kernel, pieces, num_active, tile_rows):
        return _piece_loop(x, kernel, pieces, num_active, tile_rows)

    def forward(x, kernel, pieces, num_active, tile_rows):
        outputs = _piece_loop(x, kernel, pieces, num_active, tile_rows)
        return outputs, (x, kernel, pieces, num_active)

    def backward(tile_rows, residuals, output_grad):
        x, kernel, pieces, num_active = residuals
        # dx[rows] = dy[rows] @ kernel[e]^T: the same loop, transposed kernel.
        x_grad = _piece_loop(
            output_grad, kernel, pieces, num_active, tile_rows, transpose=True
        )

        # dkernel[e] += x[rows]^T @ dy[rows], piece by piece in row order.
        def body(index, kernel_grad):
            tile_start, mask, group = _piece(pieces, index, tile_rows)
            rows = jax.lax.dynamic_slice_in_dim(x, tile_start, tile_rows)
            grads = jax.lax.dynamic_slice_in_dim(output_grad, tile_start, tile_rows)
            grads = jax.numpy.where(mask, grads, 0)
            current = jax.lax.dynamic_index_in_dim(kernel_grad, group, keepdims=False)
            return jax.lax.dynamic_update_index_in_dim(
                kernel_grad, current + rows.T @ grads, group, 0
            )

        kernel_grad = jax.lax.fori_loop(
            0, num_active, body, jax.numpy.zeros_like(kernel)
        )
        pieces_grad = jax.tree_util.tree_map(lambda _: None, pieces)
        return x_grad, kernel_grad, pieces_grad, None

    tiled_matmul.defvjp(forward, backward)
    return tiled_matmul


def _tiled_matmul(x, kernel, pieces, num_active, tile_rows):
    return _make_tiled_matmul()(x, kernel, pieces, num_active, tile_rows)


# === PyTorch ===


def _torch_grouped_matmul(x, kernel, group_sizes):
    import torch

    sizes = [int(s) for s in group_sizes.tolist()]
    used = sum(sizes)
    # `unbind`, not `kernel[e]`: the backward of each indexing would build
    # a zero tensor of the whole kernel (E times the kernel in all); that of
    # `unbind` stacks the E gradients once.
    kernels = torch.unbind(kernel, dim=0)
    pieces = [
        rows @ kernels[e]
        for e, rows in enumerate(torch.split(x[:used], sizes))
        if sizes[e]
    ]
    tail = x.new_zeros((x.shape[0] - used, kernel.shape[2]))
    return torch.cat(pieces + [tail], dim=0)


# === TensorFlow ===


def _tf_grouped_matmul(x, kernel, group_sizes):
    import tensorflow as tf

    group_sizes = tf.cast(group_sizes, "int32")
    used = tf.reduce_sum(group_sizes)
    num_groups = kernel.shape[0]
    pieces = tf.split(x[:used], group_sizes, num=num_groups, axis=0)
    # `unstack`, not `kernel[e]`: the gradient of each slice would be a
    # zero-padded tensor of the whole kernel; that of `unstack` is one stack.
    kernels = tf.unstack(kernel, num=num_groups, axis=0)
    outputs = [tf.matmul(rows, kernels[e]) for e, rows in enumerate(pieces)]
    tail = tf.zeros((tf.shape(x)[0] - used, tf.shape(kernel)[2]), x.dtype)
    return tf.concat(outputs + [tail], axis=0)
