"""
Title: Routing and load balancing
Author: keras-moe authors
Date created: 2026/12/01
Last modified: 2026/12/01
Description: Top-1 against top-2 routing, capacity and dropped tokens, expert collapse, and the three ways to balance experts.
Accelerator: None
"""

"""
## Introduction

A sparse MoE layer is only as good as its router. Two things go wrong in
practice:

- **Dropped tokens.** Every expert has a fixed number of slots per batch, its
  *capacity*. Tokens routed to a full expert are dropped: the layer outputs
  zero for them (a residual connection around the layer carries them
  through unchanged).
- **Expert collapse.** Nothing in the task loss asks the router to spread
  tokens. An expert that gets more tokens early trains faster, becomes more
  useful, and gets chosen even more; the others starve. The model then has
  the parameters of 8 experts and the capacity of 2 or 3, and drops most of
  what the busy experts cannot hold.

This guide shows both on a small task built to make them visible, and then
the three remedies keras-moe has: the Switch load-balancing loss, the ST-MoE
router z-loss (which keeps the router stable rather than balanced), and
DeepSeek-V3's bias balancing, which needs no auxiliary loss at all. Plots of
the expert load over training are written to PNG files.

With the default sizes the guide trains five small models in about 30
seconds on two CPU cores (JAX; TensorFlow and PyTorch take longer);
`KERAS_MOE_GUIDE_FAST=1` trains them for 64 steps each, enough to see the
trends but not the end points.
"""

"""
## Setup

The backend comes from `KERAS_BACKEND` (JAX if unset) and has to be set
before Keras is imported. Everything here runs on JAX, TensorFlow and
PyTorch.
"""

import os

# Set the backend before importing Keras: KERAS_BACKEND from the environment
# if it is set, JAX otherwise.
os.environ.setdefault("KERAS_BACKEND", "jax")

import keras
import numpy as np

import keras_moe

# KERAS_MOE_GUIDE_FAST=1: tiny sizes, to check that the guide runs.
FAST = os.environ.get("KERAS_MOE_GUIDE_FAST", "0") not in ("", "0")
# The figures go here.
OUTPUT_DIR = os.environ.get(
    "KERAS_MOE_GUIDE_OUTPUT_DIR",
    os.path.join("guides_output", "routing_and_load_balancing"),
)
os.makedirs(OUTPUT_DIR, exist_ok=True)
print(f"Keras {keras.__version__}, backend: {keras.backend.backend()}")

"""
## A task that needs eight experts

Sequences of 32 tokens of width 16. Every token is of one of 8 *kinds*; a
token of kind `c` sits near its kind's center, and its target is its own
transformation, `tanh((x - offset) @ M_c)` with a random matrix `M_c` per
kind. An expert with 16 hidden units cannot fit all eight transformations
well, eight of them can, one per kind, if the router sends each kind to its
own expert.

All tokens also share a common `offset`. Hidden states of real networks are
like that: far from zero-mean, and dominated by a few shared directions. At
initialisation the router's logits are then mostly `offset @ W_router`, the
same for every token, so most tokens start out preferring the same expert.
That is what makes collapse likely here. On the built-in text data of the
other guides, where a layer normalisation precedes every MoE layer, the
imbalance without balancing is milder (around 2-3 times the fair share at
the start, falling towards 2; see `benchmarks/ROUTING.md`).

We hold out validation sequences, whose loss `fit` reports every epoch.
"""

TOKENS, MODEL_DIM, NUM_KINDS, NUM_EXPERTS = 32, 16, 8, 8
BATCH_SIZE = 32
if FAST:
    NUM_TRAIN, NUM_VALIDATION, EPOCHS = 1024, 256, 2
else:
    NUM_TRAIN, NUM_VALIDATION, EPOCHS = 8192, 1024, 6

rng = np.random.default_rng(0)
centers = rng.normal(size=(NUM_KINDS, MODEL_DIM))
centers /= np.linalg.norm(centers, axis=1, keepdims=True)
transforms = rng.normal(size=(NUM_KINDS, MODEL_DIM, MODEL_DIM)) / np.sqrt(MODEL_DIM)
offset = rng.normal(size=(MODEL_DIM,))
offset *= 3.0 / np.linalg.norm(offset)


def make_sequences(num_sequences):
    """(inputs, targets, kinds): `(n, 32, 16)`, `(n, 32, 16)`, `(n, 32)`."""
    kinds = rng.integers(0, NUM_KINDS, size=(num_sequences, TOKENS))
    noise = 0.3 * rng.normal(size=(num_sequences, TOKENS, MODEL_DIM))
    inputs = offset + 2.0 * centers[kinds] + noise
    targets = np.tanh(
        np.einsum("ntd,ntde->nte", inputs - offset, transforms[kinds])
    )
    return inputs.astype("float32"), targets.astype("float32"), kinds


x_train, y_train, kinds_train = make_sequences(NUM_TRAIN)
x_validation, y_validation, kinds_validation = make_sequences(NUM_VALIDATION)
print(
    f"{NUM_TRAIN} training and {NUM_VALIDATION} validation sequences of "
    f"{TOKENS} tokens; target variance {y_train.var():.3f} (the loss of "
    "predicting 0)"
)

"""
The model is the MoE layer and a linear read-out, trained with the mean
squared error. Every model is built right after
`keras.utils.set_random_seed(0)`, so the top-k models all start from the
same weights. `SparseMoE` gets its balancing through
arguments:

- `load_balance_loss_weight`: the Switch loss (default `1e-2`);
- `z_loss_weight`: the router z-loss (default `1e-3`);
- `router=`: another router, such as the bias-balanced one.
"""


def build_model(top_k=1, **moe_options):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((TOKENS, MODEL_DIM), name="tokens")
    moe = keras_moe.SparseMoE(
        num_experts=NUM_EXPERTS,
        intermediate_dim=16,
        top_k=top_k,
        name="moe",
        **moe_options,
    )
    outputs = keras.layers.Dense(MODEL_DIM, name="readout")(moe(inputs))
    return keras.Model(inputs, outputs, name=f"top_{top_k}")


def train(model):
    """Fits `model`; returns (History, RoutingMonitor)."""
    model.compile(optimizer=keras.optimizers.Adam(3e-3), loss="mse")
    monitor = keras_moe.callbacks.RoutingMonitor()
    history = model.fit(
        x_train,
        y_train,
        batch_size=BATCH_SIZE,
        epochs=EPOCHS,
        validation_data=(x_validation, y_validation),
        callbacks=[monitor],
        verbose=2,
    )
    return history, monitor


def expert_load(moe, inputs, training=False):
    """Share of the kept assignments per expert `(E,)`, from `moe.route`."""
    decisions = moe.route(inputs, training=training)
    index = keras.ops.convert_to_numpy(decisions["expert_index"])
    kept = keras.ops.convert_to_numpy(decisions["kept"])
    counts = np.bincount(index[kept], minlength=moe.num_experts)
    return counts / max(counts.sum(), 1)


"""
## Top-1 against top-2

`top_k` is the number of experts each token goes to. Switch Transformer uses
1 (the cheapest: one expert's compute per token), GShard and Mixtral use 2
(each token's output is a weighted mix of two experts). Doubling `top_k`
doubles the expert compute per token, not the parameters:
"""

top_1 = build_model(top_k=1)
top_2 = build_model(top_k=2)
for model in (top_1, top_2):
    counts = keras_moe.utils.count_parameters(model)
    flops = keras_moe.utils.flops_per_token(model)
    print(
        f"{model.name}: {counts.total:,} parameters, {counts.active:,} active "
        f"per token, {flops:,.0f} FLOPs per token"
    )

"""
Before any training, the router's choices show the offset at work: the load
is far from the fair share of 1/8 = 0.125 per expert.
"""

first_batch = x_validation[:BATCH_SIZE]
for model in (top_1, top_2):
    load = expert_load(model.get_layer("moe"), first_batch)
    print(f"{model.name} before training, expert load: {np.round(load, 3)}")

"""
With top-1, a token's output is its expert's output times the router's
probability for that expert (the gradient through that weight is how the
router learns). With top-2 the two weights are the two largest probabilities.
"""

for model in (top_1, top_2):
    decisions = model.get_layer("moe").route(first_batch[:1])
    weights = keras.ops.convert_to_numpy(decisions["combine_weights"])[0, 0]
    index = keras.ops.convert_to_numpy(decisions["expert_index"])[0, 0]
    print(
        f"{model.name}: first token -> experts {index}, "
        f"weights {np.round(weights, 3)}"
    )

"""
Both train with the default balancing (load-balancing loss `1e-2`, z-loss
`1e-3`) and a capacity factor of 1.25.
"""

settings = {}  # what each way of balancing gave, for the comparison below


def summarize(label, model, history, monitor):
    """Keeps the last epoch's numbers of a trained model under `label`."""
    statistics = monitor.history["moe"]
    load = statistics["expert_load"][-1]
    settings[label] = {
        "model": model,
        "monitor": monitor,
        "validation_loss": history.history["val_loss"][-1],
        "imbalance": statistics["load_imbalance"][-1],
        "dropped": statistics["dropped_fraction"][-1],
        "z_loss": statistics["z_loss"][-1],
        "idle_experts": int((load < 0.01).sum()),
        "load": load,
    }
    print(f"{label}: expert load in the last epoch {np.round(load, 3)}")


for model in (top_1, top_2):
    print(f"--- {model.name}")
    history, monitor = train(model)
    summarize(f"{model.name}, default balancing", model, history, monitor)

"""
Twice the expert compute per token buys top-2 a lower loss. What about
dropped tokens? Both have a capacity factor of 1.25, so top-2 experts have
twice the slots for twice the assignments, and a similar fraction of
assignments may be dropped. But a token is only lost entirely when *all* its
assignments are dropped, and with top-2 a token whose first choice is full
often still gets its second. `route()` tells them apart (here with the
training capacity, `training=True`, on the validation data):
"""

for model in (top_1, top_2):
    decisions = model.get_layer("moe").route(x_validation, training=True)
    kept = keras.ops.convert_to_numpy(decisions["kept"])  # (n, tokens, k)
    print(
        f"{model.name}: validation loss "
        f"{settings[f'{model.name}, default balancing']['validation_loss']:.4f}, "
        f"{100 * (~kept).mean():.1f}% of assignments dropped, "
        f"{100 * (~kept.any(axis=-1)).mean():.1f}% of tokens with no expert"
    )

"""

## Capacity and dropped tokens

Tokens are routed in *groups* (by default all tokens of one call, here a
batch of 32 x 32 = 1,024 tokens). Within a group, each expert has

```
capacity = max(min_capacity, ceil(capacity_factor * group_size * top_k / num_experts))
```

slots: `capacity_factor=1.0` is exactly the fair share, 1.25 leaves 25% of
headroom. Assignments beyond an expert's capacity are dropped (first choices
of all tokens are served before second choices). `capacity_factor=None` is
*dropless*: no capacity at all, every assignment is computed.

`SparseMoE` has one capacity factor for training (`capacity_factor`, 1.25 by
default) and one for inference (`eval_capacity_factor`, 2.0). The counts
below come from `route(..., training=True)` on one batch, with the same router
weights and five capacity factors, for the untrained router (imbalanced by
the offset) and the trained one.
"""


def with_capacity(moe, capacity_factor):
    """A copy of `moe` (same weights) with another training capacity factor."""
    config = {**moe.get_config(), "capacity_factor": capacity_factor}
    config["name"] = f"{moe.name}_capacity"
    copy = keras_moe.SparseMoE.from_config(config)
    copy.build((None, TOKENS, MODEL_DIM))
    copy.set_weights(moe.get_weights())
    return copy


untrained = build_model(top_k=1).get_layer("moe")
trained = top_1.get_layer("moe")
num_assignments = first_batch.shape[0] * TOKENS  # top-1: one per token
print(f"one batch: {num_assignments} assignments, fair share "
      f"{num_assignments // NUM_EXPERTS} per expert")
dropped_counts = {}
for capacity_factor in (0.5, 1.0, 1.25, 2.0, None):
    row = []
    for label, moe in (("untrained", untrained), ("trained", trained)):
        copy = with_capacity(moe, capacity_factor)
        decisions = copy.route(first_batch, training=True)
        kept = keras.ops.convert_to_numpy(decisions["kept"])
        dropped = int((~kept).sum())
        dropped_counts[(label, capacity_factor)] = dropped
        share = 100 * dropped / kept.size
        row.append(f"{label} router: dropped {dropped:4d} ({share:4.1f}%)")
    capacity = keras_moe.routing.compute_capacity(
        num_assignments, NUM_EXPERTS, 1, capacity_factor, untrained.min_capacity
    )
    print(
        f"capacity factor {str(capacity_factor):>4}: capacity {capacity:4d} "
        f"per expert; " + ", ".join(row)
    )

"""
Two things to read from the table. More capacity drops fewer tokens, at the
price of bigger expert buffers (compute and memory grow with the capacity,
whether the slots are used or not). And balance decides how much capacity
you need: the same capacity factor drops far more with the imbalanced,
untrained router than with the trained one. Dropless routing avoids the
question, at the price of buffers whose size depends on the routing.

During training the monitor logs the fraction dropped as
`moe_dropped_fraction`; `routing_statistics()` also has the count per step:
"""

statistics = trained.routing_statistics()
print(
    f"top_1, last epoch: {statistics['dropped_assignments']:.1f} assignments "
    f"dropped per training step ({100 * statistics['dropped_fraction']:.2f}%)"
)

"""
## Expert collapse: no balancing at all

Now the same top-1 model with both auxiliary losses switched off. Watch the
`moe_load_imbalance` (largest expert load over the mean, 8.0 would be
everything on one expert) and `moe_dropped_fraction` columns.
"""



def run_setting(label, **moe_options):
    """Trains a top-1 model with these SparseMoE options; keeps its numbers."""
    print(f"--- {label}")
    model = build_model(top_k=1, **moe_options)
    history, monitor = train(model)
    summarize(label, model, history, monitor)


run_setting("no balancing", load_balance_loss_weight=0.0, z_loss_weight=0.0)

"""
A few experts take everything, the others get (almost) nothing, and the
busy experts drop a large part of their tokens at capacity. The validation
loss is correspondingly worse than with balancing (compare with top-1
above).

## The load-balancing loss

The Switch loss `E * sum_i f_i * P_i` (`f_i`: fraction of assignments to
expert `i`, `P_i`: its mean router probability) is 1.0 when balanced. Its
gradient lowers the router probability of overloaded experts, which moves
tokens to the others. The default weight, `1e-2`, is small next to the task
loss, and enough:
"""

run_setting("load-balancing loss", load_balance_loss_weight=1e-2, z_loss_weight=0.0)

"""
## The router z-loss

The z-loss `mean(logsumexp(logits)^2)` does not balance anything: it keeps
the router's logits small. Large logits make the softmax saturate, its
gradients vanish, and in low precision round-off grows with them; ST-MoE
found the z-loss removed training instabilities of large sparse models
without hurting quality. Its effect shows in the `moe_z_loss` statistic,
which is logged whether the loss is used or not. The top-1 model of the
first section had both losses (the defaults), and is otherwise the same as
the one just trained:
"""

settings["load-balancing + z-loss"] = settings.pop("top_1, default balancing")
print(
    f"router z-loss statistic in the last epoch: "
    f"{settings['load-balancing loss']['z_loss']:.2f} without the z-loss, "
    f"{settings['load-balancing + z-loss']['z_loss']:.2f} with it"
)

"""
## Bias balancing, without an auxiliary loss

DeepSeek-V3 balances without adding anything to the loss: every expert has a
bias that is added to its score for the *selection* only (not to the combine
weights). After each training step the bias of every overloaded expert goes
down by `bias_update_rate` and that of every underloaded one goes up. The
gradients of the task loss are left untouched.

`router="bias_balanced"` gives this router with DeepSeek-V3's defaults
(sigmoid scores, `bias_update_rate=1e-3`, weights renormalised over the
`top_k`). Two changes for this guide: a faster rate, `1e-2`, because we train
for a few hundred steps rather than DeepSeek's hundreds of thousands; and
`normalize_weights=False`, because with `top_k=1` a renormalised weight is
always exactly 1, and the router would then get no gradient from the task
at all (only the bias would move).
"""

bias_router = keras_moe.BiasBalancedRouter(
    num_experts=NUM_EXPERTS,
    top_k=1,
    bias_update_rate=1e-2,
    normalize_weights=False,
    name="router",
)
run_setting("bias balancing", router=bias_router, z_loss_weight=0.0)
expert_bias = keras.ops.convert_to_numpy(
    settings["bias balancing"]["model"].get_layer("moe").router.expert_bias
)
print(f"learned expert bias: {np.round(expert_bias, 3)}")

"""
## All four, side by side

The numbers of the last epoch (idle experts: fewer than 1% of the
assignments):
"""

order = (
    "no balancing",
    "load-balancing loss",
    "load-balancing + z-loss",
    "bias balancing",
)
settings = {label: settings[label] for label in order}
print(
    f"{'setting':<26}{'val loss':>10}{'imbalance':>11}{'dropped':>9}"
    f"{'idle experts':>14}{'z-loss':>9}"
)
for label, result in settings.items():
    print(
        f"{label:<26}{result['validation_loss']:>10.4f}"
        f"{result['imbalance']:>11.2f}{100 * result['dropped']:>8.1f}%"
        f"{result['idle_experts']:>14d}{result['z_loss']:>9.2f}"
    )

"""
And the expert load over training, one panel per setting (a moving average
over steps; the dashed line is the fair share):
"""

load_figure = os.path.join(OUTPUT_DIR, "expert_load_comparison.png")
step_histories = {
    label: setting["monitor"].step_history["moe"]
    for label, setting in settings.items()
}
keras_moe.plotting.plot_expert_load(
    step_histories,
    load_figure,
    title="Top-1 expert load during training",
)
print(f"saved {load_figure}")

"""
Where does each kind of token go? `keras_moe.utils.routing_map` turns the
routing decisions into a `(kinds, experts)` table of shares. With balancing,
each kind goes mostly to one expert of its own; without it, several kinds
share the few busy experts.
"""

maps = {}
for label in ("no balancing", "load-balancing loss"):
    moe = settings[label]["model"].get_layer("moe")
    decisions = moe.route(x_validation[:256])
    index = keras.ops.convert_to_numpy(decisions["expert_index"])
    fractions = keras_moe.utils.routing_map(
        index, kinds_validation[:256], NUM_KINDS, NUM_EXPERTS
    )
    maps[label] = (fractions, [f"kind {kind}" for kind in range(NUM_KINDS)])
map_figure = os.path.join(OUTPUT_DIR, "routing_by_kind.png")
keras_moe.plotting.plot_routing_map(
    maps, map_figure, title="Share of each kind's tokens per expert (%)"
)
print(f"saved {map_figure}")

"""
## What the numbers show

In our run with the default sizes (JAX, CPU), without balancing 5 of the 8
experts were idle at the end, more than half of the assignments were dropped
in every step of the last epoch, and the validation loss ended more than ten
times higher than with balancing (about 0.08 against 0.005). The
load-balancing loss and bias balancing both brought the load within about
15% of the fair share (imbalance 1.13 to 1.16) and then dropped nothing; bias
balancing did it with no term in the loss, at a slightly higher loss here
(about 0.008). The z-loss left the balance as it was and cut the z-loss
statistic from about 9 to 0.15, which is its job. In fast mode the models
train for only 64 steps: the same trends show, less far along (the
balancing losses still leave one or two experts nearly idle, bias balancing
is already close to even). Exact numbers vary between backends and runs
(each backend draws different random numbers).

Two cautions. This task was built so that collapse is easy to see; on real
data it is usually slower and partial, which makes it easy to miss unless
you watch `moe_load_imbalance` and `moe_dropped_fraction`. And balance is not
the goal in itself: a perfectly balanced router that sends tokens to
arbitrary experts is useless. The routing map is the check that the
experts split the work by content.

## What to read next

- `keras_moe.SparseMoE(router="noisy_top_k")` (Shazeer et al.'s noisy
  gating), `router="expert_choice"` (every expert picks its tokens, balanced
  by construction) and `priority="batch_prioritized"` (V-MoE: drop the
  least confident tokens first) are the other options;
  `benchmarks/ROUTING.md` compares them on the built-in text data.
- `guides/vit_moe.py` looks at routing in a trained vision model.
"""
