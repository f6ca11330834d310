"""Compares the routing options on the built-in text classification data.

Trains the same small byte-level transformer classifier (2 pre-norm blocks,
64 wide) on `keras_moe.datasets.load_text_classification` once per routing
option, with the feed-forward block of both layers replaced by the option,
and prints a Markdown table of test accuracy and load balance:

- `accuracy`: test accuracy after the last epoch;
- `train imbalance`: max expert load / mean expert load in training (1.0 =
  balanced, E = everything on one expert), averaged over the last epoch
  and the two MoE layers (from `RoutingMonitor`);
- `test imbalance`: the same at inference on the test set (from
  `SparseMoE.route`, with the inference capacity factor), averaged over
  the layers;
- `dropped`: fraction of token-to-expert assignments dropped at capacity in
  the last training epoch (expert choice: fraction of tokens no expert
  took);
- `s/epoch`: mean wall-clock seconds per epoch after the first (the first
  includes compilation).

Dense and soft mixtures run every expert on every token (or slot), so their
load is equal by construction and they have no imbalance to report.

Every MoE option has 8 experts of width 64 with top-2 routing (the dense
baseline is one FeedForward of width 128, the same active width); the
capacity factor is 1.25 in training and 2.0 at inference, routing groups
are whole batches, padding is masked. Run from the repository root:

    KERAS_BACKEND=jax python -m benchmarks.routing_comparison

`--options top_k,expert_choice` runs a subset; `--epochs`, `--num-train`
change the budget (the defaults take a few minutes on two CPU cores).
"""

import argparse
import os
import time

os.environ.setdefault("KERAS_BACKEND", "jax")  # Before importing Keras.

import keras  # noqa: E402
import numpy as np  # noqa: E402
from keras import layers  # noqa: E402
from keras import ops  # noqa: E402

import keras_moe  # noqa: E402
from keras_moe import datasets  # noqa: E402

NUM_EXPERTS = 8
EXPERT_DIM = 64
TOP_K = 2
HIDDEN_DIM = 64


def _sparse(**kwargs):
    def make(name):
        return keras_moe.SparseMoE(
            NUM_EXPERTS, EXPERT_DIM, top_k=TOP_K, name=name, **kwargs
        )

    return make


# name -> (description, factory(name) -> feed-forward layer)
OPTIONS = {
    "dense_ffn": (
        "dense FeedForward(128), no experts",
        lambda name: keras_moe.FeedForward(TOP_K * EXPERT_DIM, name=name),
    ),
    "top_k": (
        "top-2 + Switch balance loss (1e-2)",
        _sparse(),
    ),
    "top_k_no_loss": (
        "top-2, no balancing loss",
        _sparse(load_balance_loss_weight=0.0),
    ),
    "noisy_top_k": (
        "noisy top-2, learned noise, importance + load losses (1e-2 each)",
        _sparse(router="noisy_top_k"),
    ),
    "batch_prioritized": (
        "top-2 + Switch loss, batch prioritized slots",
        _sparse(priority="batch_prioritized"),
    ),
    "expert_choice": (
        "expert choice, C = 1.25 * 2 * G / E",
        _sparse(router="expert_choice"),
    ),
    "bias_balanced": (
        "sigmoid top-2, bias balancing (gamma 1e-2), no balancing loss",
        lambda name: keras_moe.SparseMoE(
            NUM_EXPERTS, EXPERT_DIM, top_k=TOP_K, name=name,
            router=keras_moe.BiasBalancedRouter(
                NUM_EXPERTS, TOP_K, bias_update_rate=1e-2
            ),
        ),
    ),
    "shared_expert": (
        "1 shared expert + top-2 + Switch loss",
        _sparse(num_shared_experts=1),
    ),
    "dense_mixture": (
        "DenseMoE: all 8 experts on every token",
        lambda name: keras_moe.DenseMoE(NUM_EXPERTS, EXPERT_DIM, name=name),
    ),
    "soft_moe": (
        "SoftMoE, 2 slots per expert",
        lambda name: keras_moe.SoftMoE(
            NUM_EXPERTS, EXPERT_DIM, slots_per_expert=2, name=name
        ),
    ),
}


def text_classifier(sequence_length, make_feed_forward, num_layers=2):
    """Byte transformer.

    Returns:
        `(model, feed_forward_layers, feed_forward_inputs)`, the last two
        one per layer (the inputs as symbolic tensors of the model).
    """
    token_ids = keras.Input((sequence_length,), dtype="int32")
    mask = ops.not_equal(token_ids, 0)  # (batch, tokens)
    x = layers.Embedding(256, HIDDEN_DIM)(token_ids)
    x = x + layers.Embedding(sequence_length, HIDDEN_DIM)(
        ops.arange(sequence_length)[None]
    )
    feed_forwards, feed_forward_inputs = [], []
    for index in range(num_layers):
        residual = x
        x = layers.LayerNormalization()(x)
        x = layers.MultiHeadAttention(4, HIDDEN_DIM // 4)(
            x, x, attention_mask=mask[:, None, :]
        )
        x = x + residual
        residual = x
        feed_forward = make_feed_forward(f"feed_forward_{index}")
        feed_forwards.append(feed_forward)
        x = layers.LayerNormalization()(x)
        feed_forward_inputs.append(x)
        if isinstance(feed_forward, keras_moe.FeedForward):
            x = feed_forward(x)  # Per token: padding needs no mask.
        else:
            x = feed_forward(x, mask=mask)
        x = x + residual
    x = layers.LayerNormalization()(x)
    weights = ops.cast(mask, "float32")[..., None]
    x = ops.sum(x * weights, axis=1) / ops.sum(weights, axis=1)
    model = keras.Model(token_ids, layers.Dense(2)(x))
    return model, feed_forwards, feed_forward_inputs


def test_imbalance(model, feed_forwards, feed_forward_inputs, x):
    """Mean over the SparseMoE layers of max/mean load at inference."""
    values = []
    for layer, layer_input in zip(feed_forwards, feed_forward_inputs):
        if not isinstance(layer, keras_moe.SparseMoE):
            return None
        # The tokens this layer sees, and their padding mask.
        features = keras.Model(model.input, layer_input).predict(x, verbose=0)
        routing = layer.route(features, mask=x != 0)
        if "expert_weights" in routing:  # expert choice
            counts = np.asarray(
                ops.convert_to_numpy(routing["kept"]), "float32"
            ).sum(axis=(0, 2))
        else:
            kept = ops.convert_to_numpy(routing["kept"])
            index = ops.convert_to_numpy(routing["expert_index"])
            counts = np.bincount(
                index[kept].reshape(-1), minlength=NUM_EXPERTS
            )
        values.append(counts.max() / counts.mean())
    return float(np.mean(values))


def run(option, train, test, epochs, batch_size, seed):
    keras.utils.set_random_seed(seed)
    _, make = OPTIONS[option]
    model, feed_forwards, feed_forward_inputs = text_classifier(
        train.x.shape[1], make
    )
    model.compile(
        optimizer=keras.optimizers.Adam(1e-3),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    monitor = keras_moe.callbacks.RoutingMonitor()
    epoch_times = []

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            epoch_times.append(time.perf_counter() - self.start)

    history = model.fit(
        train.x, train.y, batch_size=batch_size, epochs=epochs, verbose=0,
        callbacks=[monitor, Timer()],
    )
    _, accuracy = model.evaluate(test.x, test.y, verbose=0)
    logs = history.history
    routed = "moe_load_imbalance" in logs
    return {
        "option": option,
        "accuracy": accuracy,
        "train_imbalance": logs["moe_load_imbalance"][-1] if routed else None,
        "test_imbalance": test_imbalance(
            model, feed_forwards, feed_forward_inputs, test.x
        ),
        "dropped": logs["moe_dropped_fraction"][-1] if routed else None,
        "seconds_per_epoch": float(np.mean(epoch_times[1:] or epoch_times)),
        "parameters": model.count_params(),
    }


def _format(value, digits=3):
    return "n/a" if value is None else f"{value:.{digits}f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", default=",".join(OPTIONS))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--num-train", type=int, default=4000)
    parser.add_argument("--num-test", type=int, default=1000)
    parser.add_argument("--sequence-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train, test, _ = datasets.load_text_classification(
        num_train=args.num_train, num_test=args.num_test,
        sequence_length=args.sequence_length, seed=args.seed,
    )
    print(
        f"backend {keras.backend.backend()}, {args.num_train} training "
        f"examples of {args.sequence_length} bytes, {args.epochs} epochs, "
        f"batch {args.batch_size}, seed {args.seed}",
        flush=True,
    )
    rows = []
    for option in args.options.split(","):
        result = run(
            option, train, test, args.epochs, args.batch_size, args.seed
        )
        print(result, flush=True)
        rows.append(result)
    print()
    print("| option | what | accuracy | train imbalance | test imbalance "
          "| dropped | s/epoch | parameters |")
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| `{row['option']}` | {OPTIONS[row['option']][0]} "
            f"| {_format(row['accuracy'])} "
            f"| {_format(row['train_imbalance'], 2)} "
            f"| {_format(row['test_imbalance'], 2)} "
            f"| {_format(row['dropped'])} "
            f"| {row['seconds_per_epoch']:.1f} | {row['parameters']:,} |"
        )


if __name__ == "__main__":
    main()
