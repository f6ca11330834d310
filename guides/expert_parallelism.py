"""
Title: Expert parallelism: sharding experts over devices
Author: keras-moe authors
Date created: 2026/12/01
Last modified: 2026/12/01
Description: Split the experts of an MoE model over a device mesh with keras.distribution, check where each expert lives, train, and take the same code to GPUs, TPUs and several hosts.
Accelerator: None
"""

"""
## Introduction

An MoE model's parameters grow with its number of experts; past some size
they no longer fit on one device. *Expert parallelism* (GShard, Lepikhin et
al., 2020) puts different experts on different devices. Everything else is
data parallel: every device holds the attention and embedding weights and
processes its own slice of the batch. Inside each MoE layer, every device
sends each token to the device that holds the token's expert and gets the
output back: two *all-to-all* exchanges per layer, each device sending only
the tokens routed elsewhere.

`keras_moe.distribution` sets this up through Keras' own distribution API
(`keras.distribution`): a device mesh with a `"batch"` and an `"expert"`
axis, a layout map that puts the experts' first dimension on `"expert"`,
and a distribution that splits every batch over all devices. Keras
implements `keras.distribution` on the **JAX backend only**, so this guide
needs `KERAS_BACKEND=jax` (it stops with a message on the others).

You do not need several accelerators to follow it: JAX can split the CPU
into virtual devices. The guide uses 8, so it runs on any laptop in well
under a minute (`KERAS_MOE_GUIDE_FAST=1`: a few seconds of training).
Virtual devices share the same CPU cores, so this shows how the sharding
works, not a speed-up; on real accelerators the same code is what scales.
"""

"""
## Setup

Two environment variables have to be set before Keras (and so JAX) is
imported: the backend, and the number of virtual CPU devices
(`JAX_NUM_CPU_DEVICES`). On a machine with GPUs or TPUs, leave the second
one out and JAX uses the accelerators.
"""

import os
import re
import sys

# Set the backend before importing Keras: KERAS_BACKEND from the environment
# if it is set, JAX otherwise. Then split the CPU into 8 virtual devices
# (before JAX is imported; ignored on GPUs and TPUs).
os.environ.setdefault("KERAS_BACKEND", "jax")
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "8")

import keras

if keras.backend.backend() != "jax":
    print(
        "This guide shards experts with keras.distribution, which only the "
        f"JAX backend implements; KERAS_BACKEND={keras.backend.backend()}. "
        "Run it with KERAS_BACKEND=jax."
    )
    sys.exit(0)

import jax
import numpy as np

import keras_moe
from keras_moe import datasets
from keras_moe import models

# KERAS_MOE_GUIDE_FAST=1: tiny sizes, to check that the guide runs.
FAST = os.environ.get("KERAS_MOE_GUIDE_FAST", "0") not in ("", "0")
OUTPUT_DIR = os.environ.get(
    "KERAS_MOE_GUIDE_OUTPUT_DIR", os.path.join("guides_output", "expert_parallelism")
)
os.makedirs(OUTPUT_DIR, exist_ok=True)

keras.utils.set_random_seed(0)
devices = keras.distribution.list_devices()
print(f"Keras {keras.__version__}, backend: {keras.backend.backend()}")
print(f"{len(devices)} devices: {devices}")

"""
## A device mesh with an expert axis

A `keras.distribution.DeviceMesh` arranges the devices in a grid with named
axes. `keras_moe.distribution.expert_mesh(expert_parallel=4)` makes a
`("batch", "expert")` mesh whose `"expert"` axis has 4 devices; the rest
(8 / 4 = 2) is the `"batch"` axis. With 8 experts per layer, each device
then holds 2 experts of every MoE layer, and each expert lives on 2 devices
(one per `"batch"` row). `expert_parallel=8` would give every device one
expert of its own; `expert_parallel=1` is plain data parallelism.
"""

NUM_EXPERTS = 8
expert_parallel = 4 if len(devices) % 4 == 0 else len(devices)
mesh = keras_moe.distribution.expert_mesh(expert_parallel=expert_parallel)
print(f"mesh: {dict(zip(mesh.axis_names, mesh.shape))}")
print(np.asarray(mesh.devices))

"""
## The model and its data

A small transformer text classifier from `keras_moe.models`, with a
`SparseMoE` in every block, on the built-in text classification data. One
setting matters for expert parallelism: **routing groups**. Tokens are
routed (and expert capacity is counted) per group, and the groups are what
gets split over the devices, so their number must be divisible by the 8
devices. With `group_size` equal to the sequence length every sequence is
a group, and a global batch of 32 sequences splits into 4 per device.
"""

SEQUENCE_LENGTH = 64
BATCH_SIZE = 32  # global: 4 sequences per device
if FAST:
    NUM_LAYERS, NUM_TRAIN, NUM_VALIDATION, EPOCHS = 1, 256, 64, 1
else:
    NUM_LAYERS, NUM_TRAIN, NUM_VALIDATION, EPOCHS = 2, 3200, 320, 3

train, _, _ = datasets.load_text_classification(
    num_train=NUM_TRAIN + NUM_VALIDATION, num_test=32, sequence_length=SEQUENCE_LENGTH
)
x_train, y_train = train.x[:NUM_TRAIN], train.y[:NUM_TRAIN]
x_validation, y_validation = train.x[NUM_TRAIN:], train.y[NUM_TRAIN:]

model = models.text_classifier(
    num_classes=2,
    sequence_length=SEQUENCE_LENGTH,
    num_layers=NUM_LAYERS,
    model_dim=64,
    intermediate_dim=64,
    num_experts=NUM_EXPERTS,
    top_k=2,
    moe_layers="all",
    capacity_factor=1.25,
    moe_options={"group_size": SEQUENCE_LENGTH},  # one routing group per sequence
    seed=0,
)
counts = keras_moe.utils.count_parameters(model)
print(
    f"{model.name}: {counts.total:,} parameters, of which {counts.expert_total:,} "
    "in the experts"
)

"""
## The layout map: which weights are split, and how

A `keras.distribution.LayoutMap` maps variable paths to *layouts*: for each
dimension of the variable, the mesh axis it is split over (or `None`:
not split). `keras_moe.distribution.expert_layout_map(model, mesh)` writes
one entry per expert weight, with the expert dimension (the first) on
`"expert"`, and one per router weight, replicated. Variables without an
entry (attention, embeddings, norms) are replicated on every device.
"""

layout_map = keras_moe.distribution.expert_layout_map(model, mesh)
for path in layout_map:
    print(f"{path:<50} {layout_map[path].axes}")

"""
`ExpertParallel` is the distribution that uses this map. Compared with
Keras' `ModelParallel` it splits every batch over *both* mesh axes, so the
layers outside the MoE layers are data parallel over all 8 devices:
"""

distribution = keras_moe.distribution.ExpertParallel(layout_map)
batch_layout = distribution.get_data_layout((BATCH_SIZE, SEQUENCE_LENGTH))
print("a batch of token ids is split as", batch_layout.axes)

"""
## Putting the model on the mesh

A variable gets its sharding when it is created, from the distribution that
is active then. There are two ways to get a sharded model:

1. Build (or load) the model inside `with distribution.scope():`. The
   layout map needs the variable paths, which is why we built one model
   above to read them; a second build in the scope gives the same paths when
   the layers have the same names.
2. Re-create an existing model on the mesh with
   `keras_moe.distribution.distribute_model(model, mesh)`: it rebuilds the
   model from its config in the scope and copies the weights, for example
   from a model trained (or loaded) on one device.

We take the second way (`distribute_model` makes the layout map and the
`ExpertParallel` distribution itself, as above). The sharded model computes
the same function as the one on a single device:
"""

sharded_model, distribution = keras_moe.distribution.distribute_model(model, mesh)
probe = x_validation[:BATCH_SIZE]
single_device = model.predict(probe, batch_size=BATCH_SIZE, verbose=0)
with distribution.scope():
    on_the_mesh = sharded_model.predict(probe, batch_size=BATCH_SIZE, verbose=0)
print(
    "same predictions on the mesh as on one device:",
    bool(np.allclose(single_device, on_the_mesh, atol=1e-5)),
)

"""
## Where each expert lives

Every Keras variable on JAX holds a `jax.Array`, whose `.sharding` says how
it is laid out: its `PartitionSpec`, and which slice sits on which device.
The expert kernels are split on their first (expert) dimension, each device
holding a `(2, 64, 64)` slice of the `(8, 64, 64)` kernel; the router and
the attention weights are whole on every device.
"""

for variable in sharded_model.weights:
    if variable.path.endswith(("intermediate_kernel", "router/kernel", "query/kernel")):
        value = variable.value
        local = value.addressable_shards[0].data.shape
        print(
            f"{variable.path:<45} shape {tuple(value.shape)}, "
            f"spec {value.sharding.spec}, per device {tuple(local)}"
        )

"""
And expert by expert, for every MoE layer: which devices hold which
experts (read from the kernel's `devices_indices_map`).
"""

placement = []
for moe in keras_moe.callbacks.moe_layers(sharded_model):
    kernel = moe.experts.intermediate_kernel.value
    experts_on = {}
    for device, index in kernel.sharding.devices_indices_map(kernel.shape).items():
        first, stop, _ = index[0].indices(moe.num_experts)
        holder = f"{device.platform}:{device.id}"
        experts_on.setdefault((first, stop - 1), []).append(holder)
    for (first, last), holders in sorted(experts_on.items()):
        placement.append((moe.name, first, last, sorted(holders)))
        print(f"{moe.name}: experts {first}-{last} on {', '.join(sorted(holders))}")

"""
The same as a picture of the mesh, saved to the output directory: one cell
per device, with the experts of the first MoE layer it holds (every MoE
layer is split the same way).
"""

from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

first_layer = placement[0][0]
experts_of = {
    device: f"experts {first}-{last}"
    for layer, first, last, holders in placement
    if layer == first_layer
    for device in holders
}
rows, columns = mesh.shape
figure = Figure(figsize=(2.0 * columns + 1.2, 1.3 * rows + 1.0), layout="constrained")
axis = figure.subplots()
mesh_devices = np.asarray(mesh.devices)
for row in range(rows):
    for column in range(columns):
        device = str(mesh_devices[row, column])
        axis.add_patch(
            Rectangle(
                (column, rows - 1 - row), 0.92, 0.88, color=f"C{column}", alpha=0.35
            )
        )
        axis.text(
            column + 0.46, rows - 1 - row + 0.44,
            f"{device}\n{experts_of.get(device, '')}", ha="center", va="center",
        )
axis.set_xlim(-0.1, columns)
axis.set_ylim(-0.1, rows)
axis.set_xticks(
    [c + 0.46 for c in range(columns)], [f"expert {c}" for c in range(columns)]
)
axis.set_yticks(
    [rows - 1 - r + 0.44 for r in range(rows)], [f"batch {r}" for r in range(rows)]
)
axis.set_xlabel('mesh axis "expert"')
axis.set_ylabel('mesh axis "batch"')
axis.set_title(f"{first_layer}: experts per device")
placement_figure = os.path.join(OUTPUT_DIR, "expert_placement.png")
figure.savefig(placement_figure, dpi=100)
print(f"saved {placement_figure}")

"""
## How tokens reach their experts

Inside a `SparseMoE`, the token groups `(groups, group_size, d)` are split
over all 8 devices and the expert buffers `(experts, slots, d)` over the
`"expert"` axis. XLA turns the switch from one to the other into an
all-to-all. We can check that in the compiled forward pass: two all-to-alls
per MoE layer (to the experts and back) and no all-gather, so no device ever
collects every token.
"""


def forward(trainable_values, non_trainable_values, token_ids):
    logits, _ = sharded_model.stateless_call(
        trainable_values, non_trainable_values, token_ids, training=False
    )
    return logits


with distribution.scope():
    token_ids = jax.device_put(
        probe, distribution.get_data_layout(probe.shape).backend_layout
    )
    compiled = jax.jit(forward).lower(
        [v.value for v in sharded_model.trainable_variables],
        [v.value for v in sharded_model.non_trainable_variables],
        token_ids,
    ).compile()
hlo = compiled.as_text()
for collective in ("all-to-all", "all-gather"):
    count = len(re.findall(rf"\b{collective}(?:-start)?\(", hlo))
    print(f"{collective} operations in the forward pass: {count}")

"""
## Training on the mesh

Compile and fit inside the distribution's scope. `fit` splits every global
batch of 32 sequences over the 8 devices. The gradients of the replicated
weights are summed over all devices (an all-reduce), those of an expert only
over the devices that hold it (the `"batch"` axis). Routing statistics and
balancing losses work as on one device.
"""

with distribution.scope():
    sharded_model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=2e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    history = sharded_model.fit(
        x_train,
        y_train,
        batch_size=BATCH_SIZE,
        epochs=EPOCHS,
        validation_data=(x_validation, y_validation),
        callbacks=[keras_moe.callbacks.RoutingMonitor()],
        verbose=2,
    )
print(
    f"after {EPOCHS} epoch(s) on the mesh: validation accuracy "
    f"{history.history['val_accuracy'][-1]:.4f}, load imbalance "
    f"{history.history['moe_load_imbalance'][-1]:.2f}"
)

"""
The trained experts are still where they were:
"""

kernel = keras_moe.callbacks.moe_layers(sharded_model)[0].experts.intermediate_kernel
sharding = kernel.value.sharding
print(f"{kernel.path}: spec {sharding.spec}, on {len(sharding.device_set)} devices")

"""
## Saving and loading

`model.save` gathers the shards into one `.keras` file. It loads on one
device as usual, and loads sharded again when `keras.saving.load_model`
runs inside a distribution's scope.
"""

path = os.path.join(OUTPUT_DIR, "sharded_moe.keras")
sharded_model.save(path)
restored = keras.saving.load_model(path)
restored_moe = keras_moe.callbacks.moe_layers(restored)[0]
restored_kernel = restored_moe.experts.intermediate_kernel
print(
    f"loaded {path} outside the scope: experts on "
    f"{len(restored_kernel.value.sharding.device_set)} device(s)"
)

"""
## The same code on GPUs, TPUs and several hosts

Nothing above is specific to CPU devices.

**One machine with several GPUs, or a TPU host.** Drop the
`JAX_NUM_CPU_DEVICES` line; `keras.distribution.list_devices()` then returns
the accelerators (`["gpu:0", ..., "gpu:7"]` or `["tpu:0", ...]`), and
`expert_mesh` arranges them. Choose `expert_parallel` so that every device
gets a whole number of experts (`num_experts` divisible by it) and keep the
number of routing groups per batch divisible by the number of devices. Put
the `"expert"` axis on the devices with the fastest links between them (the
GPUs of one NVLink domain, neighbours on a TPU slice's torus), because the
all-to-alls run along it, in every MoE layer of every step. To
also split every expert's hidden dimension, make a three-axis mesh with
`expert_mesh(expert_parallel=..., model_parallel=...)` and pass
`shard_hidden=True` to `distribute_model` or `expert_layout_map`.

**Several hosts.** Start the same program on every host, and call
`keras.distribution.initialize` first, before any other JAX work:

```python
keras.distribution.initialize(
    job_addresses="10.0.0.1:1234",  # the coordinator: process 0's host:port
    num_processes=4,                # processes (hosts) in the job
    process_id=0,                   # this process: 0 .. num_processes - 1
)
```

or set `KERAS_DISTRIBUTION_JOB_ADDRESSES`, `KERAS_DISTRIBUTION_NUM_PROCESSES`
and `KERAS_DISTRIBUTION_PROCESS_ID` in each process's environment and call
`keras.distribution.initialize()` without arguments. On Cloud TPU pods all
three can be left out: JAX reads them from the TPU environment. After that,
`list_devices()` returns the devices of *all* hosts and the mesh spans them;
each process only holds the shards of its own devices. Two things change:

- **Input.** Each process feeds only its part of every global batch. A
  `tf.data.Dataset` is split for you (`auto_shard_dataset=True`, the
  default); with NumPy arrays set `distribution.auto_shard_dataset = False`
  and give every process the rows of each global batch that its devices
  hold.
- **Saving.** `model.save` cannot read the shards held by other processes:
  gather the weights first (`jax.experimental.multihost_utils.
  process_allgather`) and save from process 0.

`examples/expert_parallel.py` does both and can be tried on one machine:
`python examples/expert_parallel.py --mesh 1x8 --local-processes 2` starts
two processes with 4 virtual CPU devices each, wired up on localhost.

## What to read next

- The module docstring of `keras_moe.distribution` lists the requirements
  and the error messages for meshes, group sizes and layout maps.
- `guides/routing_and_load_balancing.py`: balance matters more when experts
  sit on different devices, since the busiest expert sets the pace of the
  all-to-all.
"""
