"""Step time and memory of SparseMoE vs a dense FFN and KerasHub's Mixtral block.

Run from the repository root, once per backend:

    KERAS_BACKEND=jax python -m benchmarks.moe_layer
    KERAS_BACKEND=tensorflow python -m benchmarks.moe_layer --experts 8 64
    KERAS_BACKEND=torch python -m benchmarks.moe_layer --experts 8 64

Everything is measured in one process and one run, so the ratios compare
numbers taken under the same conditions:
- `dense`: `keras_moe.FeedForward` with `top_k * expert hidden` units, the
  dense layer of the same active size (same gating, same router-free cost);
- `capacity`: `SparseMoE(capacity_factor=1.25)`;
- `dropless`: `SparseMoE(capacity_factor=None)`;
- `keras_hub`: KerasHub's `MixtralSparseMoeBlock` (every expert on every
  token, then masked), the block Keras users have today.
All are SwiGLU experts without biases (as Mixtral), float32, `tokens`
tokens of width `d_model`, `top_k` experts of `expert_hidden` units each.

For each, the median over `--repetitions` timed calls (after warm-up), the
layers of one expert count timed round-robin (one call of each per round;
ratios to `dense` are medians of the per-round ratios; KerasHub's block is
timed after them in rounds of its own), of:
- `train`: forward + backward (gradients of every weight and of the input)
  of `sum(outputs^2) + added losses`, compiled as each backend compiles a
  training step (`jax.jit`; `tf.function`; eager PyTorch);
- `infer`: forward only, in tokens per second.
Memory: on JAX the compiled training step's temporary buffers (XLA's own
count, exact); on every backend the growth of the process's peak resident
memory during one training step (Linux `VmHWM`, reset before the step), a
coarser figure that includes allocator caching.

Prints a Markdown table and writes JSON (`--json`, default
`benchmarks/results/moe_layer_<backend>.json`).
"""

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import time

import keras
import numpy as np

import keras_moe

KERAS_HUB_MIXTRAL = "keras_hub.src.models.mixtral.mixtral_decoder"


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experts", type=int, nargs="+", default=[8, 32, 64, 128])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--expert-hidden", type=int, default=512)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--capacity-factor", type=float, default=1.25)
    parser.add_argument("--group-size", type=int, default=None)
    parser.add_argument("--repetitions", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--layers",
        nargs="+",
        default=["dense", "capacity", "dropless", "keras_hub"],
        help="which layers to measure",
    )
    parser.add_argument(
        "--keras-hub-max-experts",
        type=int,
        default=64,
        help="skip KerasHub's block above this many experts (it is slow)",
    )
    parser.add_argument("--json", default=None)
    return parser.parse_args(argv)


# === Layers under test ===


def make_layer(kind, num_experts, args):
    if kind == "dense":
        return keras_moe.FeedForward(
            intermediate_dim=args.top_k * args.expert_hidden,
            activation="silu",
            gated=True,
            use_bias=False,
        )
    if kind in ("capacity", "dropless"):
        return keras_moe.SparseMoE(
            num_experts=num_experts,
            intermediate_dim=args.expert_hidden,
            top_k=args.top_k,
            capacity_factor=args.capacity_factor if kind == "capacity" else None,
            group_size=args.group_size,
            activation="silu",
            gated=True,
            use_bias=False,
        )
    if kind == "keras_hub":
        import importlib

        mixtral = importlib.import_module(KERAS_HUB_MIXTRAL)
        return _FirstOutput(
            mixtral.MixtralSparseMoeBlock(
                hidden_dim=args.d_model,
                intermediate_dim=args.expert_hidden,
                num_experts=num_experts,
                top_k=args.top_k,
            )
        )
    raise ValueError(f"Unknown layer kind: {kind!r}")


class _FirstOutput(keras.layers.Layer):
    """KerasHub's block returns `(outputs, router_logits)`; keep the first."""

    def __init__(self, block, name="keras_hub_first_output", **kwargs):
        # An explicit name: TensorFlow refuses the derived "_first_output"
        # as a name scope (a leading underscore).
        super().__init__(name=name, **kwargs)
        self.block = block

    def build(self, input_shape):
        self.block.build(input_shape)

    def call(self, inputs, training=None):
        return self.block(inputs, training=training)[0]


# === Per-backend compiled steps ===
# Each returns (train_step, infer_step, jax_temp_bytes); calling a step runs
# it to completion (results are synchronised), so wall time is its cost.


def _jax_steps(layer, inputs):
    import jax
    import jax.numpy as jnp

    trainable = [v.value for v in layer.trainable_variables]
    non_trainable = [v.value for v in layer.non_trainable_variables]

    def objective(trainable, x):
        outputs, _, losses = layer.stateless_call(
            trainable, non_trainable, x, training=True, return_losses=True
        )
        return jnp.sum(jnp.square(outputs)) + sum(losses)

    grad = jax.jit(jax.value_and_grad(objective, argnums=(0, 1)))
    forward = jax.jit(
        lambda trainable, x: layer.stateless_call(
            trainable, non_trainable, x, training=False
        )[0]
    )
    temp_bytes = (
        grad.lower(trainable, inputs).compile().memory_analysis().temp_size_in_bytes
    )
    train = lambda: jax.block_until_ready(grad(trainable, inputs))
    infer = lambda: jax.block_until_ready(forward(trainable, inputs))
    return train, infer, temp_bytes


def _tensorflow_steps(layer, inputs):
    import tensorflow as tf

    inputs = tf.convert_to_tensor(inputs)
    variables = layer.trainable_variables

    @tf.function
    def grad():
        with tf.GradientTape() as tape:
            tape.watch(inputs)
            outputs = layer(inputs, training=True)
            loss = tf.reduce_sum(tf.square(outputs)) + tf.add_n(
                [tf.constant(0.0)] + list(layer.losses)
            )
        return loss, tape.gradient(loss, [inputs] + variables)

    @tf.function
    def forward():
        return layer(inputs, training=False)

    def run(function):
        return lambda: [t.numpy() for t in tf.nest.flatten(function())][0]

    return run(grad), run(forward), None


def _torch_steps(layer, inputs):
    import torch

    inputs = torch.tensor(inputs, requires_grad=True)

    def train():
        layer.zero_grad(set_to_none=True)
        inputs.grad = None
        outputs = layer(inputs, training=True)
        loss = torch.sum(torch.square(outputs)) + sum(layer.losses)
        loss.backward()
        return float(loss)

    def infer():
        with torch.no_grad():
            return layer(inputs, training=False).sum().item()

    return train, infer, None


STEPS = {
    "jax": _jax_steps,
    "tensorflow": _tensorflow_steps,
    "torch": _torch_steps,
}


# === Measurement ===


def _peak_rss_growth(function):
    """Growth of the peak resident memory (bytes) while `function` runs."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current VmRSS
    except OSError:
        return None

    def read(field):
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field):
                    return int(line.split()[1]) * 1024
        return None

    before = read("VmRSS:")
    function()
    peak = read("VmHWM:")
    return None if before is None or peak is None else peak - before


def _median_seconds(function, repetitions, warmup):
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repetitions):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def prepare(kind, num_experts, args, inputs):
    """Builds one layer and its compiled steps, run once each (compiled)."""
    keras.utils.set_random_seed(0)
    layer = make_layer(kind, num_experts, args)
    layer.build(inputs.shape)
    train, infer, temp_bytes = STEPS[keras.backend.backend()](layer, inputs)
    train()  # compile
    infer()
    return {"kind": kind, "train": train, "infer": infer, "temp_bytes": temp_bytes}


def _timed(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def measure_interleaved(prepared, num_experts, args):
    """Times the prepared layers round-robin: one call of each per round.

    The machine's speed drifts between runs and within one (other tenants,
    clocks): timing each layer's repetitions in a block of its own turns
    that drift into differences between layers. Round-robin, every round
    sees all layers under the same conditions, and the ratios in the table
    are medians of the per-round ratios.
    """
    for entry in prepared:
        for _ in range(args.warmup):
            entry["train"]()
    train_times = {entry["kind"]: [] for entry in prepared}
    for _ in range(args.repetitions):
        for entry in prepared:
            train_times[entry["kind"]].append(_timed(entry["train"]))
    infer_times = {entry["kind"]: [] for entry in prepared}
    for _ in range(args.repetitions):
        for entry in prepared:
            infer_times[entry["kind"]].append(_timed(entry["infer"]))
    results = []
    for entry in prepared:
        gc.collect()
        rss_growth = _peak_rss_growth(entry["train"])
        kind, temp_bytes = entry["kind"], entry["temp_bytes"]
        results.append(
            {
                "layer": kind,
                "num_experts": num_experts,
                "train_ms": 1e3 * statistics.median(train_times[kind]),
                # One entry per round, in round order: aligned across layers.
                "train_ms_all": [1e3 * t for t in train_times[kind]],
                "infer_tokens_per_s": args.tokens / statistics.median(infer_times[kind]),
                "jax_temp_mib": None if temp_bytes is None else temp_bytes / 2**20,
                "peak_rss_growth_mib": (
                    None if rss_growth is None else rss_growth / 2**20
                ),
            }
        )
    return results


def median_ratio(numerator, denominator):
    """Median over rounds of `numerator / denominator` (aligned round lists)."""
    return statistics.median(
        a / b for a, b in zip(numerator["train_ms_all"], denominator["train_ms_all"])
    )


def markdown_table(results, args):
    dense = {r["num_experts"]: r for r in results if r["layer"] == "dense"}
    hub = {r["num_experts"]: r for r in results if r["layer"] == "keras_hub"}
    # The same layer at the fewest experts measured: how its cost grows with
    # the number of experts at a fixed active size.
    fewest = {}
    for r in sorted(results, key=lambda r: r["num_experts"]):
        fewest.setdefault(r["layer"], r)
    lines = [
        "| layer | experts | train ms | / dense | / fewest experts | KerasHub / this "
        "| infer tok/s | JAX temp MiB | peak RSS growth MiB |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    for r in results:
        base = dense.get(r["num_experts"])
        peer = hub.get(r["num_experts"])
        if base is None:
            ratio = None
        elif r["layer"] == "keras_hub":  # not interleaved with the dense layer
            ratio = r["train_ms"] / base["train_ms"]
        else:
            ratio = median_ratio(r, base)
        # KerasHub's block runs in rounds of its own: a ratio of medians.
        speedup = (
            peer["train_ms"] / r["train_ms"]
            if peer and r["layer"] not in ("keras_hub", "dense")
            else None
        )
        growth = (
            r["train_ms"] / fewest[r["layer"]]["train_ms"]
            if r["layer"] != "dense"
            else None
        )
        experts = "-" if r["layer"] == "dense" else r["num_experts"]
        lines.append(
            f"| {r['layer']} | {experts} | {r['train_ms']:.1f} | {fmt(ratio, '.2f')} "
            f"| {fmt(growth, '.2f')} | {fmt(speedup, '.1f')} "
            f"| {r['infer_tokens_per_s']:.0f} "
            f"| {fmt(r['jax_temp_mib'], '.1f')} "
            f"| {fmt(r['peak_rss_growth_mib'], '.1f')} |"
        )
    return "\n".join(lines)


def machine_description():
    cores = os.cpu_count()
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    description = f"{cpu}, {cores} cores, {platform.system()}"
    try:
        # Other work on the machine skews the medians: say how busy it was.
        description += f", load average {os.getloadavg()[0]:.2f} at the start"
    except OSError:
        pass
    return description


def main(argv=None):
    args = parse_args(argv)
    machine = machine_description()
    backend = keras.backend.backend()
    rng = np.random.default_rng(0)
    inputs = rng.normal(size=(1, args.tokens, args.d_model)).astype("float32")
    results = []
    for num_experts in args.experts:
        keras.utils.clear_session()
        kinds = [
            kind
            for kind in args.layers
            if not (kind == "keras_hub" and num_experts > args.keras_hub_max_experts)
        ]
        # The dense layer does not depend on the number of experts: it is
        # measured again in every round of every expert count, so each
        # ratio compares calls made next to each other.
        # KerasHub's block is timed after the others, in rounds of its own:
        # its step frees gigabytes of buffers, and whichever layer ran next
        # paid for it (the dense layer, 2-4x slower right after it).
        measured = []
        for group in (
            [kind for kind in kinds if kind != "keras_hub"],
            [kind for kind in kinds if kind == "keras_hub"],
        ):
            prepared = [prepare(kind, num_experts, args, inputs) for kind in group]
            measured += measure_interleaved(prepared, num_experts, args)
            del prepared
            gc.collect()
        results.extend(measured)
        for result in measured:
            print(
                f"{result['layer']:>9} E={num_experts:<4} train "
                f"{result['train_ms']:8.1f} ms",
                file=sys.stderr,
                flush=True,
            )
    table = markdown_table(results, args)
    header = (
        f"backend {backend}, keras {keras.__version__}, {machine}; "
        f"tokens {args.tokens}, d_model {args.d_model}, expert hidden "
        f"{args.expert_hidden}, top-{args.top_k}, capacity factor "
        f"{args.capacity_factor}, group size {args.group_size}, float32, "
        f"median of {args.repetitions} rounds (layers interleaved)"
    )
    print(header)
    print()
    print(table)
    path = args.json or os.path.join(
        os.path.dirname(__file__), "results", f"moe_layer_{backend}.json"
    )
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        json.dump(
            {"header": header, "args": vars(args), "results": results}, f, indent=1
        )


if __name__ == "__main__":
    main()
