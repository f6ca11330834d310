"""What bounds a SparseMoE training step on this machine (JAX).

`benchmarks.moe_layer` measures whole layers; this script splits the cost of
the capacity mode to show where it goes as the number of experts grows at a
fixed active size (4096 tokens, d_model 256, expert hidden 512, top-2,
SwiGLU, capacity factor 1.25, forward + backward, `jax.jit`):

- `dense`: the dense feed-forward of the same active size (1024 units);
- `experts only`: `ExpertFFN` alone on `(E, C, d_model)` buffers of exactly
  the layer's capacity `C = 1.25 * tokens * top_k / E`: the expert matmuls
  with their capacity padding, no router, dispatch or combine;
- `whole layer`: `SparseMoE`, router, losses, dispatch and combine included;
- `weights read + write`: the cheapest computation that reads every expert
  weight once and writes a tensor of the same size (`2 * w`), the memory
  traffic any training step pays at least once for the weight gradients
  (a real step reads the weights twice: forward and input gradient).

    KERAS_BACKEND=jax python -m benchmarks.bounds

Prints a Markdown table of medians (ms) and their ratios to `dense` (all four
timed round-robin, one call each per round; ratios are medians of the
per-round ratios).
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "jax")

import numpy as np  # noqa: E402


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32, 64, 128])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--expert-hidden", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--repetitions", type=int, default=7)
    return parser.parse_args(argv)


def interleaved_ms(functions, repetitions):
    """Per-function lists of ms, timed round-robin (one call each per round)."""
    import jax

    for function in functions:  # compile, warm up
        for _ in range(2):
            jax.block_until_ready(function())
    times = [[] for _ in functions]
    for _ in range(repetitions):
        for function, own in zip(functions, times):
            start = time.perf_counter()
            jax.block_until_ready(function())
            own.append((time.perf_counter() - start) * 1e3)
    return times


def median_ratio(numerator, denominator):
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def training_step(layer, inputs):
    """A jitted forward + backward of `sum(outputs^2)` through `layer`."""
    import jax
    import jax.numpy as jnp

    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def objective(trainable, x):
        outputs, _ = layer.stateless_call(trainable, non_trainable, x, training=True)
        return jnp.sum(jnp.square(outputs))

    step = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))
    return lambda: step(trainable, inputs)


def main(argv=None):
    import jax
    import keras

    import keras_moe

    if keras.backend.backend() != "jax":
        raise SystemExit("benchmarks.bounds measures JAX only (KERAS_BACKEND=jax).")
    args = parse_args(argv)
    rng = np.random.default_rng(0)
    tokens = rng.normal(size=(args.tokens, args.d_model)).astype("float32")
    layer_options = dict(gated=True, activation="silu", use_bias=False)
    dense = keras_moe.FeedForward(args.top_k * args.expert_hidden, **layer_options)
    dense.build((None, args.d_model))
    dense_step = training_step(dense, tokens)
    print(
        "| experts | capacity | dense ms | experts only ms | / dense | whole layer ms "
        "| / dense | expert weights MiB | weights read + write ms |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    copy = jax.jit(lambda weights: [2.0 * w for w in weights])
    for num_experts in args.experts:
        capacity = int(
            np.ceil(args.capacity_factor * args.tokens * args.top_k / num_experts)
        )
        experts = keras_moe.ExpertFFN(num_experts, args.expert_hidden, **layer_options)
        experts.build((num_experts, None, args.d_model))
        buffers = rng.normal(size=(num_experts, capacity, args.d_model)).astype("float32")
        moe = keras_moe.SparseMoE(
            num_experts, args.expert_hidden, top_k=args.top_k,
            capacity_factor=args.capacity_factor, **layer_options,
        )
        moe.build((1, args.tokens, args.d_model))
        weights = [v.value for v in experts.trainable_variables]
        weight_bytes = sum(int(np.prod(w.shape)) * 4 for w in weights)
        # Round-robin, so that the ratios compare calls made side by side.
        dense_ms, experts_ms, layer_ms, copy_ms = interleaved_ms(
            [
                dense_step,
                training_step(experts, buffers),
                training_step(moe, tokens[None]),
                lambda: copy(weights),
            ],
            args.repetitions,
        )
        median = statistics.median
        print(
            f"| {num_experts} | {capacity} | {median(dense_ms):.1f} "
            f"| {median(experts_ms):.1f} | {median_ratio(experts_ms, dense_ms):.2f} "
            f"| {median(layer_ms):.1f} | {median_ratio(layer_ms, dense_ms):.2f} "
            f"| {weight_bytes / 2**20:.0f} | {median(copy_ms):.1f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
