"""Expert parallelism: a MoE transformer with its experts sharded over a mesh.

Trains a small causal MoE transformer on the synthetic byte-level corpus of
`keras_moe.datasets.load_language_modeling`, with every SparseMoE's experts
split over the `"expert"` axis of a `("batch", "expert")` device mesh, the
batch split over all devices, and everything else replicated. Prints which
devices hold which experts, and the losses.

Runs anywhere on virtual CPU devices (the script sets `JAX_NUM_CPU_DEVICES`
to the mesh size itself, unless it is set):

    python examples/expert_parallel.py --mesh 2x4        # ~1-2 min on 2 cores
    python examples/expert_parallel.py --mesh 1x8 --num-experts 16
    python examples/expert_parallel.py --mesh 2x2x2      # also split expert hidden dims
    python examples/expert_parallel.py --smoke           # a few seconds of training

Several processes (hosts): each one runs the script with the coordinator's
address and its id; every process sees only its own devices, the mesh spans
all of them. To try it on one machine, `--local-processes 2` starts two
local processes (4 CPU devices each for a 2x4 or 1x8 mesh) and wires them
up on localhost:

    python examples/expert_parallel.py --mesh 1x8 --local-processes 2
    # on real hosts, one per host:
    python examples/expert_parallel.py --mesh 1x8 --num-processes 2 \\
        --process-id 0 --coordinator host0:1234

Expert parallelism through `keras.distribution` needs the JAX backend.
"""

import argparse
import json
import math
import os
import socket
import subprocess
import sys

EXAMPLE_DIR = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--mesh",
        default="2x4",
        help="BATCHxEXPERT or BATCHxEXPERTxMODEL device mesh (default 2x4)",
    )
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--num-experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--model-dim", type=int, default=64)
    parser.add_argument("--intermediate-dim", type=int, default=128)
    parser.add_argument("--num-heads", type=int, default=4)
    parser.add_argument("--sequence-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32, help="global")
    parser.add_argument("--num-train", type=int, default=1024)
    parser.add_argument("--num-test", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny model and data, one epoch (a quick check that it runs)",
    )
    parser.add_argument("--save", default=None, help="save a .keras file")
    parser.add_argument(
        "--report", default=None, help="write losses and placement as JSON"
    )
    parser.add_argument(
        "--local-processes",
        type=int,
        default=1,
        help="start this many local processes sharing the mesh",
    )
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    parser.add_argument(
        "--coordinator", default=None, help="host:port of process 0"
    )
    args = parser.parse_args(argv)
    try:
        args.mesh_shape = tuple(int(s) for s in args.mesh.lower().split("x"))
    except ValueError:
        parser.error(f"--mesh must look like 2x4 or 2x2x2, got {args.mesh!r}")
    if len(args.mesh_shape) not in (2, 3) or min(args.mesh_shape) < 1:
        parser.error(f"--mesh must look like 2x4 or 2x2x2, got {args.mesh!r}")
    if args.smoke:
        args.epochs, args.num_layers = 1, 1
        args.model_dim, args.intermediate_dim = 32, 32
        args.sequence_length, args.batch_size = 16, 16
        args.num_train, args.num_test = 64, 16
    num_devices = math.prod(args.mesh_shape)
    if args.batch_size % num_devices:
        parser.error(
            f"--batch-size {args.batch_size} must be divisible by the "
            f"{num_devices} devices of the mesh"
        )
    return args


def launch_local(args, argv):
    """Starts `--local-processes` copies of this script on localhost."""
    num_processes = args.local_processes
    num_devices = math.prod(args.mesh_shape)
    if num_devices % num_processes:
        sys.exit(f"{num_devices} devices do not split over {num_processes} processes")
    child_argv = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--local-processes":
            skip = True
        elif not arg.startswith("--local-processes="):
            child_argv.append(arg)
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = dict(os.environ)
    env["KERAS_BACKEND"] = "jax"
    env["JAX_PLATFORMS"] = "cpu"
    env["JAX_NUM_CPU_DEVICES"] = str(num_devices // num_processes)
    children = [
        subprocess.Popen(
            [sys.executable, os.path.abspath(__file__), *child_argv,
             "--num-processes", str(num_processes), "--process-id", str(i),
             "--coordinator", f"localhost:{port}"],
            env=env,
        )
        for i in range(num_processes)
    ]
    codes = [child.wait() for child in children]
    if any(codes):
        sys.exit(f"process exit codes: {codes}")


def build_model(args, keras, keras_moe):
    """A pre-norm causal transformer whose feed-forward blocks are SparseMoE.

    `keras_moe.models.causal_language_model` with SwiGLU experts in every
    block. One routing group per sequence (`group_size=sequence_length`), so
    the number of groups is the batch size: divisible by the number of
    devices, as expert parallelism needs.
    """
    return keras_moe.models.causal_language_model(
        sequence_length=args.sequence_length,
        vocabulary_size=256,
        num_layers=args.num_layers,
        model_dim=args.model_dim,
        num_heads=args.num_heads,
        intermediate_dim=args.intermediate_dim,
        num_experts=args.num_experts,
        top_k=args.top_k,
        moe_layers="all",
        activation="silu",
        gated=True,
        moe_options={"group_size": args.sequence_length},
        name="moe_transformer",
    )


def expert_placement(model, keras_moe):
    """[(layer, first expert, last expert, [devices])] for every MoE layer."""
    rows = []
    for moe in keras_moe.callbacks.moe_layers(model):
        kernel = moe.experts.intermediate_kernel
        by_experts = {}
        for device, index in kernel.value.sharding.devices_indices_map(
            tuple(kernel.shape)
        ).items():
            experts = index[0].indices(moe.num_experts)[:2]
            by_experts.setdefault(experts, []).append(device)
        for (first, stop), devices in sorted(by_experts.items()):
            devices = sorted(devices, key=lambda d: d.id)
            names = [f"{d.platform}:{d.id}" for d in devices]
            rows.append((moe.name, first, stop - 1, names))
    return rows


def local_rows(distribution, global_batch):
    """Rows of each global batch that this process's devices hold."""
    import numpy as np

    layout = distribution.get_data_layout((global_batch,)).backend_layout
    index_map = layout.addressable_devices_indices_map((global_batch,))
    starts = sorted({index[0].start or 0 for index in index_map.values()})
    shard = global_batch // distribution.num_model_replicas
    return np.concatenate([np.arange(s, s + shard) for s in starts])


def per_process(array, rows, global_batch):
    """This process's rows of every global batch of `array`."""
    batches = array.reshape(-1, global_batch, *array.shape[1:])[:, rows]
    return batches.reshape(-1, *array.shape[1:])


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    args = parse_args(argv)
    if args.local_processes > 1:
        return launch_local(args, argv)
    num_devices = math.prod(args.mesh_shape)
    # The backend and the number of virtual CPU devices must be chosen before
    # Keras (and so JAX) is imported.
    os.environ.setdefault("KERAS_BACKEND", "jax")
    os.environ.setdefault(
        "JAX_NUM_CPU_DEVICES", str(num_devices // args.num_processes)
    )
    sys.path.insert(0, os.path.dirname(EXAMPLE_DIR))  # the repository root
    import keras
    import numpy as np

    if keras.backend.backend() != "jax":
        sys.exit(
            "Expert parallelism through keras.distribution needs the JAX "
            f"backend; KERAS_BACKEND={keras.backend.backend()}"
        )
    if args.num_processes > 1:
        keras.distribution.initialize(
            job_addresses=args.coordinator,
            num_processes=args.num_processes,
            process_id=args.process_id,
        )
    import jax

    import keras_moe
    from keras_moe import distribution as moe_distribution
    from keras_moe.datasets import load_language_modeling

    is_main = jax.process_index() == 0
    say = print if is_main else (lambda *a, **k: None)
    if len(keras.distribution.list_devices()) != num_devices:
        sys.exit(
            f"--mesh {args.mesh} needs {num_devices} devices; JAX sees "
            f"{len(keras.distribution.list_devices())}"
        )

    # === Data ===
    train, test, _ = load_language_modeling(
        num_train=args.num_train, num_test=args.num_test,
        sequence_length=args.sequence_length, seed=args.seed,
    )
    # Whole global batches only: every batch is split over all devices.
    num_train = len(train.x) // args.batch_size * args.batch_size
    num_test = max(len(test.x) // args.batch_size, 1) * args.batch_size
    x_train, y_train = train.x[:num_train], train.y[:num_train]
    x_test, y_test = test.x[:num_test], test.y[:num_test]
    if len(x_test) < num_test:
        sys.exit(f"--num-test must be at least --batch-size {args.batch_size}")

    # === Model, on the host, then re-created with its experts sharded ===
    keras.utils.set_random_seed(args.seed)
    model = build_model(args, keras, keras_moe)
    mesh = moe_distribution.expert_mesh(
        expert_parallel=args.mesh_shape[1],
        model_parallel=args.mesh_shape[2] if len(args.mesh_shape) == 3 else 1,
    )
    model, distribution = moe_distribution.distribute_model(
        model, mesh, shard_hidden=len(args.mesh_shape) == 3
    )
    say(f"mesh {dict(zip(mesh.axis_names, mesh.shape))} over {num_devices} "
        f"devices in {jax.process_count()} process(es)")
    if len(args.mesh_shape) == 3:
        say(f"(each device holds 1/{args.mesh_shape[2]} of the hidden units "
            "of its experts)")
    say(f"{'layer':<14} {'experts':>8}  devices")
    placement = expert_placement(model, keras_moe)
    for layer, first, last, devices in placement:
        experts = f"{first}" if first == last else f"{first}-{last}"
        say(f"{layer:<14} {experts:>8}  {', '.join(devices)}")

    # === Training ===
    batch_size = args.batch_size
    if jax.process_count() > 1:
        # Each process feeds the rows of each global batch its devices hold.
        distribution.auto_shard_dataset = False
        rows = local_rows(distribution, args.batch_size)
        x_train, y_train, x_test, y_test = (
            per_process(a, rows, args.batch_size)
            for a in (x_train, y_train, x_test, y_test)
        )
        batch_size = len(rows)
    with distribution.scope():
        model.compile(
            optimizer=keras.optimizers.Adam(args.learning_rate),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        history = model.fit(
            x_train, y_train, batch_size=batch_size, epochs=args.epochs,
            validation_data=(x_test, y_test), shuffle=False,
            verbose=2 if is_main else 0,
        )
    losses = [float(v) for v in history.history["loss"]]
    val_losses = [float(v) for v in history.history["val_loss"]]
    say("train loss per epoch:", ", ".join(f"{v:.4f}" for v in losses))
    say("validation loss per epoch:", ", ".join(f"{v:.4f}" for v in val_losses))

    if args.save:
        if jax.process_count() > 1:
            # `model.save` cannot read arrays spanning other processes'
            # devices: gather every weight, save a host copy on process 0.
            from jax.experimental import multihost_utils

            weights = [
                np.asarray(multihost_utils.process_allgather(v.value, tiled=True))
                for v in model.weights
            ]
            host_model = keras.Model.from_config(model.get_config())
            host_model.set_weights(weights)
            if is_main:
                host_model.save(args.save)
        else:
            model.save(args.save)
        say(f"saved {args.save}")
    if args.report and is_main:
        with open(args.report, "w") as f:
            json.dump(
                {
                    "mesh": list(mesh.shape),
                    "processes": jax.process_count(),
                    "loss": losses,
                    "val_loss": val_losses,
                    "placement": placement,
                },
                f,
            )


if __name__ == "__main__":
    main()
