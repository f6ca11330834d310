"""Figures of what MoE routers do: expert load over training, routing maps.

Uses matplotlib (`pip install matplotlib`, or `keras-moe[examples]`),
imported when a function is called; figures are drawn without `pyplot`, so
nothing here opens a window or needs a display.
"""

import numpy as np


def _figure(num_panels, panel_width=4.2, panel_height=3.2, columns=None):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(
            "keras_moe.plotting needs matplotlib: `pip install matplotlib`."
        ) from error
    columns = columns or min(num_panels, 3)
    rows = -(-num_panels // columns)
    figure = Figure(
        figsize=(panel_width * columns, panel_height * rows),
        layout="constrained",
    )
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for unused in axes[num_panels:]:
        unused.set_axis_off()
    return figure, axes[:num_panels]


def _smooth(values, window):
    """Moving average along axis 0 `(steps, ...)`, same length."""
    if window <= 1 or len(values) < 2:
        return values
    window = min(window, len(values))
    kernel = np.ones(window) / window
    padded = np.concatenate(
        [np.repeat(values[:1], window - 1, axis=0), values], axis=0
    )
    return np.stack(
        [
            np.convolve(padded[:, i], kernel, mode="valid")
            for i in range(values.shape[1])
        ],
        axis=1,
    )


def _expert_load_series(source):
    """{layer: (steps, E) array, x label} from a RoutingMonitor or a dict."""
    if hasattr(source, "step_history"):
        per_step = {
            name: stats["expert_load"]
            for name, stats in source.step_history.items()
            if stats.get("expert_load")
        }
        if per_step:
            return per_step, "training step"
        source = source.history
        label = "epoch"
    else:
        label = "training step"
    series = {
        name: stats["expert_load"]
        for name, stats in source.items()
        if len(stats.get("expert_load", ())) > 0
    }
    return series, label


def plot_expert_load(source, path=None, smoothing=10, title=None):
    """Plots the share of assignments each expert got, per MoE layer.

    One panel per MoE layer; one line per expert (a moving average over
    `smoothing` steps); the dashed line is the balanced share 1/E.

    Args:
        source: a `keras_moe.callbacks.RoutingMonitor` after `fit` (its
            per-step history, or per-epoch history if there is no step
            history), or a dict `{layer name: {"expert_load": [(E,) arrays,
            one per step]}}`.
        path: optional file name; the figure is saved there (PNG by suffix).
        smoothing: int, window of the moving average in steps.
        title: optional figure title.

    Returns:
        The matplotlib `Figure`.

    Example:

    ```python
    monitor = keras_moe.callbacks.RoutingMonitor()
    model.fit(x, y, epochs=3, callbacks=[monitor])
    keras_moe.plotting.plot_expert_load(monitor, "expert_load.png")
    ```
    """
    series, x_label = _expert_load_series(source)
    if not series:
        raise ValueError(
            "No expert load to plot: `source` has no `expert_load` history "
            "(did the model train with a RoutingMonitor and MoE layers?). "
            f"Received: source={source!r}"
        )
    figure, axes = _figure(len(series))
    for axis, (name, loads) in zip(axes, series.items()):
        loads = np.asarray(loads, dtype=float)  # (steps, E)
        num_experts = loads.shape[1]
        steps = np.arange(1, len(loads) + 1)
        smoothed = _smooth(loads, smoothing if x_label != "epoch" else 1)
        colors = _expert_colors(num_experts)
        for expert in range(num_experts):
            axis.plot(
                steps, smoothed[:, expert], color=colors[expert], lw=1.2,
                label=f"expert {expert}",
            )
        axis.axhline(1.0 / num_experts, color="black", ls="--", lw=1)
        axis.set_title(name)
        axis.set_xlabel(x_label)
        axis.set_ylabel("share of assignments")
        axis.set_ylim(0, max(0.05, float(smoothed.max()) * 1.1))
    axes[0].legend(fontsize="x-small", ncol=2, loc="upper right")
    if title:
        figure.suptitle(title)
    if path:
        figure.savefig(path, dpi=100)
    return figure


def _expert_colors(num_experts):
    from matplotlib import colormaps

    colormap = colormaps["tab10" if num_experts <= 10 else "tab20"]
    return [colormap(i % colormap.N) for i in range(num_experts)]


def plot_routing_map(maps, path=None, title=None, annotate=True):
    """Heat maps of which groups of tokens go to which experts.

    Args:
        maps: dict `{panel title: (fractions, row_names)}`, `fractions` a
            `(G, E)` array whose row g is the share of group g's assignments
            per expert (e.g. from `keras_moe.utils.routing_map`), `row_names`
            G labels (classes, domains, token kinds).
        path: optional file name; the figure is saved there.
        title: optional figure title.
        annotate: bool, write the percentages in the cells.

    Returns:
        The matplotlib `Figure`.

    Example:

    ```python
    fractions = keras_moe.utils.routing_map(index, domains, 5, 8, valid)
    keras_moe.plotting.plot_routing_map(
        {"block_1_moe": (fractions, domain_names)}, "routing_map.png")
    ```
    """
    if not maps:
        raise ValueError("Received an empty `maps`; nothing to plot.")
    max_experts = max(np.shape(f)[1] for f, _ in maps.values())
    max_rows = max(np.shape(f)[0] for f, _ in maps.values())
    figure, axes = _figure(
        len(maps),
        panel_width=1.6 + 0.55 * max_experts,
        panel_height=1.3 + 0.42 * max_rows,
        columns=min(len(maps), 2),
    )
    for axis, (panel_title, (fractions, row_names)) in zip(axes, maps.items()):
        fractions = np.asarray(fractions, dtype=float)
        num_rows, num_experts = fractions.shape
        if len(row_names) != num_rows:
            raise ValueError(
                f"Panel {panel_title!r}: {num_rows} rows of fractions but "
                f"{len(row_names)} row names."
            )
        image = axis.imshow(
            fractions, cmap="viridis", vmin=0.0, aspect="auto",
            vmax=max(float(fractions.max()), 1e-6),
        )
        axis.set_xticks(range(num_experts))
        axis.set_yticks(range(num_rows), labels=list(row_names))
        axis.set_xlabel("expert")
        axis.set_title(panel_title, fontsize="medium")
        if annotate:
            threshold = 0.6 * float(fractions.max())
            for row in range(num_rows):
                for expert in range(num_experts):
                    value = fractions[row, expert]
                    axis.text(
                        expert, row, f"{100 * value:.0f}", ha="center",
                        va="center", fontsize="x-small",
                        color="black" if value > threshold else "white",
                    )
        figure.colorbar(image, ax=axis, label="share of assignments")
    if title:
        figure.suptitle(title)
    if path:
        figure.savefig(path, dpi=100)
    return figure
