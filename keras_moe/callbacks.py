"""RoutingMonitor: routing statistics of every MoE layer in `model.fit` logs."""

import numpy as np
import keras


def moe_layers(model):
    """Every sublayer of `model` that keeps routing statistics, in model order."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if hasattr(layer, "routing_statistics")
        and hasattr(layer, "reset_routing_statistics")
    ]


class RoutingMonitor(keras.callbacks.Callback):
    """Shows what the routers do, in the progress bar and in `History`.

    MoE layers (`SparseMoE` and any layer with `routing_statistics()` and
    `reset_routing_statistics()`) accumulate routing statistics in state
    variables during training steps; this callback resets them at the start
    of each epoch and copies their running means into the logs after every
    training batch and at the end of the epoch. Works on JAX (where the
    statistics are jit-carried state, synced when read), TensorFlow and
    PyTorch without any custom training loop.

    Log keys (averaged over the MoE layers; one value per layer too with
    `per_layer=True`, as `"{prefix}{layer.name}/{stat}"`):
    - `moe_balance_loss`: unweighted load-balancing loss (1.0 = balanced);
    - `moe_z_loss`: unweighted router z-loss;
    - `moe_dropped_fraction`: fraction of token-to-expert assignments
      dropped at capacity;
    - `moe_load_imbalance`: max expert load / mean expert load (1.0 =
      balanced), averaged over steps;
    - one key per balancing loss a router declares, e.g.
      `moe_importance_loss` and `moe_load_loss` (`NoisyTopKRouter`),
      `moe_sequence_balance_loss` (`BiasBalancedRouter`), averaged over
      the layers that have it.

    After training, `history[layer_name][stat]` holds one value per epoch
    (`expert_load` is a `(E,)` array per epoch) and
    `step_history[layer_name][stat]` one value per training step, which is
    what the plotting helpers draw.

    Args:
        prefix: str, prefix of the log keys.
        per_layer: bool, also log each layer's statistics.

    Example:

    ```python
    model.fit(x, y, epochs=3, callbacks=[keras_moe.callbacks.RoutingMonitor()])
    # Epoch 1/3 ... loss: 0.41 - moe_balance_loss: 1.02 - moe_dropped_fraction: 0.013 ...
    ```
    """

    LOGGED = ("balance_loss", "z_loss", "dropped_fraction", "load_imbalance")
    # Kept in `history`/`step_history` but not in the logs.
    NOT_LOGGED = ("steps", "dropped_assignments", "expert_load")

    def __init__(self, prefix="moe_", per_layer=False):
        super().__init__()
        self.prefix = prefix
        self.per_layer = per_layer
        self.history = {}
        self.step_history = {}
        self._layers = None
        self._previous = {}

    def _moe_layers(self):
        # Reading `self.model` also syncs the JAX trainer's state into the
        # layers' variables, which the statistics are read from.
        model = self.model
        if self._layers is None:
            self._layers = moe_layers(model)
        return self._layers

    def on_train_begin(self, logs=None):
        self._layers = None
        for layer in self._moe_layers():
            self.history.setdefault(layer.name, {})
            self.step_history.setdefault(layer.name, {})

    def on_epoch_begin(self, epoch, logs=None):
        for layer in self._moe_layers():
            layer.reset_routing_statistics()
        self._previous = {}

    def _read(self):
        """{layer name: running means} for layers that trained this epoch."""
        return {
            layer.name: stats
            for layer in self._moe_layers()
            if (stats := layer.routing_statistics())["steps"] > 0
        }

    def _logged(self, statistics):
        """LOGGED, then the routers' own balancing losses, by name."""
        extra = sorted(
            {
                stat
                for layer_stats in statistics.values()
                for stat in layer_stats
                if stat not in self.LOGGED and stat not in self.NOT_LOGGED
            }
        )
        return self.LOGGED + tuple(extra)

    def _write_logs(self, logs, statistics):
        if logs is None or not statistics:
            return
        for stat in self._logged(statistics):
            # Averaged over the layers whose router reports it.
            having = {
                name: layer_stats[stat]
                for name, layer_stats in statistics.items()
                if stat in layer_stats
            }
            logs[f"{self.prefix}{stat}"] = float(np.mean(list(having.values())))
            if self.per_layer:
                for name, value in having.items():
                    logs[f"{self.prefix}{name}/{stat}"] = float(value)

    def on_train_batch_end(self, batch, logs=None):
        statistics = self._read()
        self._write_logs(logs, statistics)
        # Per-step values from the change of the running sums.
        for name, stats in statistics.items():
            previous = self._previous.get(name)
            steps = stats["steps"]
            previous_steps = previous["steps"] if previous else 0.0
            if steps <= previous_steps:
                continue
            for stat, value in stats.items():
                if stat == "steps":
                    continue
                total = np.asarray(value) * steps
                previous_total = (
                    np.asarray(previous[stat]) * previous_steps
                    if previous
                    else 0.0
                )
                step_value = (total - previous_total) / (steps - previous_steps)
                self.step_history[name].setdefault(stat, []).append(step_value)
            self._previous[name] = stats

    def on_epoch_end(self, epoch, logs=None):
        statistics = self._read()
        self._write_logs(logs, statistics)
        for name, stats in statistics.items():
            for stat, value in stats.items():
                if stat != "steps":
                    self.history[name].setdefault(stat, []).append(value)
