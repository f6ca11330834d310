"""Expert parallelism through `keras.distribution`: experts sharded over a mesh.

Only the JAX backend of Keras 3 acts on `keras.distribution` (its variables
and trainer read the active distribution); TensorFlow and PyTorch ignore it
and would train an unsharded model without a word. So every helper here
raises on those backends, and a `SparseMoE` built while a distribution is
active on them warns.

How expert parallelism works here (GShard's arrangement):
- A `("batch", "expert")` device mesh (plus `"model"` to also split each
  expert's hidden dimension). Every batch is split over *all* devices,
  `batch x expert` ways (`ExpertParallel`); every `SparseMoE`'s expert
  weights are split over the `"expert"` axis (their first dimension),
  routers and all other weights are replicated.
- Inside a `SparseMoE` the token groups `(N, G, d)` are split over the
  `batch x expert` devices and the expert buffers `(E, N * C, d)` over
  `"expert"` (experts) and `"batch"` (groups). Switching the `"expert"` axis
  from the group dimension to the expert dimension and back is an
  all-to-all: each device sends each other device of its expert row only the
  tokens routed to that device's experts. No device gathers every token.
- An `8x1` mesh is plain data parallelism; `1x8` puts each expert on one
  device and splits the data 8 ways.

Requirements: `num_experts` divisible by the `"expert"` axis size; the
number of token groups of a call (`tokens / group_size`) divisible by
`batch x expert` (set `group_size` to the sequence length, or a divisor of
it, and use a global batch divisible by the number of devices); with
`shard_hidden=True`, `intermediate_dim` divisible by the `"model"` axis size.

Two ways to get a model onto the mesh. Variables take their sharding when
they are created, and only if a distribution is active then (a model built
outside and then used under a distribution fails in `fit` with "incompatible
devices"), so the model must be created, or re-created, in the scope:

```python
# 1. Any model, e.g. one trained on one device: re-create it on the mesh.
mesh = keras_moe.distribution.expert_mesh(expert_parallel=4)  # 2x4 on 8
model, distribution = keras_moe.distribution.distribute_model(model, mesh)
with distribution.scope():
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, batch_size=64)

# 2. Build directly in the scope (no unsharded copy). The layout map needs
# the variable paths, so build a first instance to read them; give the MoE
# layers explicit names (or call `keras.backend.clear_session()` before the
# second build) so that both builds give the same paths.
layout_map = keras_moe.distribution.expert_layout_map(build_model(), mesh)
distribution = keras_moe.distribution.ExpertParallel(layout_map)
with distribution.scope():
    model = build_model()
    model.compile(optimizer="adam", loss="mse")
    model.fit(x, y, batch_size=64)
```

A `.keras` file saved from a sharded model loads on one device as usual, and
loads sharded when `keras.saving.load_model` runs in a distribution's scope.
"""

import math
import warnings

import keras
import numpy as np

from keras_moe._checks import check_positive_int

BATCH_AXIS = "batch"
EXPERT_AXIS = "expert"
MODEL_AXIS = "model"

# ExpertFFN weight attribute -> what each of its dimensions is split on.
_EXPERT_WEIGHT_AXES = {
    "intermediate_kernel": (EXPERT_AXIS, None, MODEL_AXIS),  # (E, d, h)
    "gate_kernel": (EXPERT_AXIS, None, MODEL_AXIS),  # (E, d, h)
    "output_kernel": (EXPERT_AXIS, MODEL_AXIS, None),  # (E, h, d)
    "intermediate_bias": (EXPERT_AXIS, MODEL_AXIS),  # (E, h)
    "gate_bias": (EXPERT_AXIS, MODEL_AXIS),  # (E, h)
    "output_bias": (EXPERT_AXIS, None),  # (E, d)
}


def _require_jax(what):
    backend = keras.backend.backend()
    if backend != "jax":
        raise ValueError(
            f"`{what}` shards experts through `keras.distribution`, which "
            f"only the JAX backend of Keras implements: the '{backend}' "
            "backend ignores distributions and would train an unsharded "
            "model. Set KERAS_BACKEND=jax to shard experts. Received: "
            f"backend={backend!r}"
        )


def _axis_sizes(mesh):
    return dict(zip(mesh.axis_names, mesh.shape))


def expert_mesh(expert_parallel=None, model_parallel=1, devices=None):
    """A `("batch", "expert"[, "model"])` device mesh over the devices.

    Args:
        expert_parallel: int, devices the experts are split over (size of the
            `"expert"` axis). None uses all devices (`1 x n` mesh, or
            `1 x n/m x m` with `model_parallel=m`).
        model_parallel: int, devices each expert's hidden dimension is split
            over (size of a `"model"` axis, added only when > 1).
        devices: optional list of devices (e.g. `["cpu:0", ...]`); defaults
            to `keras.distribution.list_devices()`.

    Returns:
        A `keras.distribution.DeviceMesh` of shape
        `(n / (expert_parallel * model_parallel), expert_parallel
        [, model_parallel])`; the remaining factor is the `"batch"` axis
        (experts replicated, data split).

    Example:

    >>> mesh = expert_mesh(expert_parallel=4)  # with 8 devices
    >>> mesh.shape, mesh.axis_names
    ((2, 4), ('batch', 'expert'))
    """
    _require_jax("expert_mesh")
    check_positive_int("model_parallel", model_parallel)
    if devices is None:
        devices = keras.distribution.list_devices()
    devices = np.asarray(devices).reshape(-1)
    num_devices = devices.size
    if expert_parallel is None:
        expert_parallel = max(num_devices // model_parallel, 1)
    check_positive_int("expert_parallel", expert_parallel)
    if num_devices % (expert_parallel * model_parallel):
        raise ValueError(
            "The number of devices must be a multiple of expert_parallel * "
            f"model_parallel. Received: expert_parallel={expert_parallel}, "
            f"model_parallel={model_parallel} with {num_devices} devices"
        )
    shape = (num_devices // (expert_parallel * model_parallel), expert_parallel)
    axis_names = (BATCH_AXIS, EXPERT_AXIS)
    if model_parallel > 1:
        shape += (model_parallel,)
        axis_names += (MODEL_AXIS,)
    return keras.distribution.DeviceMesh(shape, axis_names, devices=devices)


def _moe_layers_and_experts(model):
    """(SparseMoE layers, ExpertFFN layers) anywhere inside `model`."""
    # Imported here: the layers import the routing functions, which import
    # this module.
    from keras_moe.layers.expert_ffn import ExpertFFN
    from keras_moe.layers.sparse_moe import SparseMoE

    # `_flatten_layers` is how Keras itself walks nested layers
    # (`Model.layers` lists the top level only).
    layers = list(model._flatten_layers(include_self=True, recursive=True))
    moe_layers = [layer for layer in layers if isinstance(layer, SparseMoE)]
    experts = [layer for layer in layers if isinstance(layer, ExpertFFN)]
    return moe_layers, experts


def expert_layout_map(model, mesh, layout_map=None, shard_hidden=False):
    """A `LayoutMap` that shards every expert weight of `model` on `"expert"`.

    Walks `model` (nested layers included) for its `SparseMoE` and
    `ExpertFFN` layers and writes one entry per variable, keyed by the
    variable's exact path. `LayoutMap` tries exact keys before regexes, so
    these entries win over, and never clash with, broad regexes already in
    `layout_map` (e.g. `".*kernel"`):
    - expert weights: the expert dimension (the first) on `"expert"`; with
      `shard_hidden=True` also the hidden dimension h on `"model"`
      (Megatron-style: `(E, d, h)` kernels split on h, `(E, h, d)` on h);
    - every router weight: replicated.

    Args:
        model: a built Keras model or layer containing MoE layers.
        mesh: `keras.distribution.DeviceMesh` with an `"expert"` axis (e.g.
            from `expert_mesh`).
        layout_map: optional `LayoutMap` on `mesh` to add the entries to,
            e.g. holding the layouts of the model's other weights.
        shard_hidden: bool, also split each expert's hidden dimension over
            the mesh's `"model"` axis.

    Returns:
        The `LayoutMap` (`layout_map` itself when given).

    Raises:
        ValueError: on a backend other than JAX; when the mesh lacks an
            axis; when `model` has no expert layer or is not built; when
            `num_experts` is not divisible by the `"expert"` axis size (or
            `intermediate_dim` by the `"model"` axis size).

    Example:

    ```python
    mesh = expert_mesh(expert_parallel=4)
    layout_map = expert_layout_map(model, mesh)
    distribution = ExpertParallel(layout_map)
    ```
    """
    _require_jax("expert_layout_map")
    sizes = _axis_sizes(mesh)
    if EXPERT_AXIS not in sizes:
        raise ValueError(
            f"The device mesh needs an {EXPERT_AXIS!r} axis to shard experts "
            f"on. Received: mesh.axis_names={tuple(mesh.axis_names)}"
        )
    if shard_hidden and MODEL_AXIS not in sizes:
        raise ValueError(
            f"`shard_hidden=True` needs a {MODEL_AXIS!r} mesh axis (e.g. "
            "`expert_mesh(..., model_parallel=2)`). Received: "
            f"mesh.axis_names={tuple(mesh.axis_names)}"
        )
    if layout_map is None:
        layout_map = keras.distribution.LayoutMap(mesh)
    elif layout_map.device_mesh is not mesh:
        raise ValueError(
            "`layout_map` must be defined on the same `mesh`. Received: "
            f"layout_map.device_mesh={layout_map.device_mesh}, mesh={mesh}"
        )
    moe_layers, experts = _moe_layers_and_experts(model)
    if not experts:
        raise ValueError(
            "No expert layer (`SparseMoE` or `ExpertFFN`) found in "
            f"`model`. Received: model={getattr(model, 'name', model)!r}"
        )
    for layer in moe_layers + experts:
        if not layer.built:
            raise ValueError(
                f"Layer {layer.name!r} is not built, so its variable paths "
                "are unknown. Build the model first (call it on data or use "
                "`keras.Input`)."
            )
    for moe in moe_layers:
        for weight in moe.router.weights:
            layout_map[weight.path] = (None,) * len(weight.shape)
    for layer in experts:
        if layer.num_experts % sizes[EXPERT_AXIS]:
            raise ValueError(
                f"Layer {layer.path!r} has num_experts={layer.num_experts}, "
                f"which cannot be split evenly over the {EXPERT_AXIS!r} mesh "
                f"axis of size {sizes[EXPERT_AXIS]}. Use a number of experts "
                "divisible by the expert axis size or another mesh. "
                f"Received: num_experts={layer.num_experts}, "
                f"mesh.shape={tuple(mesh.shape)}"
            )
        if shard_hidden and layer.intermediate_dim % sizes[MODEL_AXIS]:
            raise ValueError(
                f"Layer {layer.path!r} has intermediate_dim="
                f"{layer.intermediate_dim}, which cannot be split evenly over "
                f"the {MODEL_AXIS!r} mesh axis of size {sizes[MODEL_AXIS]}. "
                f"Received: intermediate_dim={layer.intermediate_dim}, "
                f"mesh.shape={tuple(mesh.shape)}"
            )
        for name, axes in _EXPERT_WEIGHT_AXES.items():
            weight = getattr(layer, name, None)
            if weight is None:
                continue
            if not shard_hidden:
                axes = tuple(None if a == MODEL_AXIS else a for a in axes)
            layout_map[weight.path] = axes
    return layout_map


class _MultiAxisTensorLayout(keras.distribution.TensorLayout):
    """A `TensorLayout` whose entries may be tuples of mesh axis names.

    Splitting one dimension over two mesh axes (tokens over `batch x expert`)
    is what expert parallelism needs. `TensorLayout` refuses tuple entries in
    its validation, although its JAX conversion (`PartitionSpec(*axes)`)
    handles them; this only relaxes the validation.
    """

    def _validate_axes(self):
        if not self._device_mesh:
            return
        used = set()
        for axis in self._axes:
            if isinstance(axis, (tuple, list)):
                used.update(axis)
            elif axis is not None:
                used.add(axis)
        unknown = used - set(self._device_mesh.axis_names)
        if unknown:
            raise ValueError(
                "Invalid axis names for Layout. Valid axis names: "
                f"{set(self._device_mesh.axis_names)}, Got {used}"
            )


def _spec_entry(axes):
    """One PartitionSpec entry: None, an axis name, or a tuple of names."""
    axes = tuple(axes)
    if not axes:
        return None
    return axes[0] if len(axes) == 1 else axes


def _data_axes(distribution):
    """Mesh axes a batch is split over: the batch axis and the expert axis."""
    names = distribution.device_mesh.axis_names
    expert_axis = getattr(distribution, "expert_axis", EXPERT_AXIS)
    return tuple(
        a for a in names if a in (distribution.batch_dim_name, expert_axis)
    )


class ExpertParallel(keras.distribution.ModelParallel):
    """`ModelParallel` that splits each batch over the batch and expert axes.

    Plain `ModelParallel` splits the batch over `batch_dim_name` only, so on
    a `("batch", "expert")` mesh every layer outside the MoE layers would run
    replicated along `"expert"`, and the backward pass of the layer feeding
    a MoE layer all-gathers its whole activation. Here the batch is split
    `batch x expert` ways: all layers are data parallel over all devices and
    only the MoE layers exchange tokens (by all-to-all).

    The global batch size must be divisible by `batch x expert`. In a
    multi-process run (`keras.distribution.initialize`) feeding NumPy arrays,
    set `auto_shard_dataset=False` and give each process the rows of each
    global batch that its devices hold.

    Args:
        layout_map: `keras.distribution.LayoutMap`, e.g. from
            `expert_layout_map`; its mesh is the distribution's mesh.
        batch_dim_name: str, mesh axis of pure data parallelism.
        expert_axis: str, mesh axis the experts are split over.
        auto_shard_dataset: bool, as in `ModelParallel`.

    Example:

    ```python
    mesh = expert_mesh(expert_parallel=4)
    distribution = ExpertParallel(expert_layout_map(model, mesh))
    ```
    """

    def __init__(
        self,
        layout_map,
        batch_dim_name=BATCH_AXIS,
        expert_axis=EXPERT_AXIS,
        auto_shard_dataset=True,
    ):
        _require_jax("ExpertParallel")
        if not isinstance(layout_map, keras.distribution.LayoutMap):
            raise ValueError(
                "Received an invalid value for `layout_map`, expected a "
                f"`keras.distribution.LayoutMap`. Received: "
                f"layout_map={layout_map!r}"
            )
        names = tuple(layout_map.device_mesh.axis_names)
        for argument, axis in (
            ("batch_dim_name", batch_dim_name),
            ("expert_axis", expert_axis),
        ):
            if axis not in names:
                raise ValueError(
                    f"Received an invalid value for `{argument}`, expected "
                    f"one of the mesh axis names {names}. Received: "
                    f"{argument}={axis!r}"
                )
        if batch_dim_name == expert_axis:
            raise ValueError(
                "`batch_dim_name` and `expert_axis` must be different mesh "
                f"axes. Received: batch_dim_name={batch_dim_name!r}, "
                f"expert_axis={expert_axis!r}"
            )
        # Read by `num_model_replicas`, which the parent's __init__ uses.
        self._expert_axis = expert_axis
        super().__init__(
            layout_map=layout_map,
            batch_dim_name=batch_dim_name,
            auto_shard_dataset=auto_shard_dataset,
        )

    @property
    def expert_axis(self):
        return self._expert_axis

    @property
    def num_model_replicas(self):
        # Number of distinct data shards (what datasets are split into).
        sizes = _axis_sizes(self.device_mesh)
        return math.prod(sizes[a] for a in _data_axes(self))

    def get_data_layout(self, data_shape):
        axes = [None] * len(data_shape)
        axes[0] = _spec_entry(_data_axes(self))
        return _MultiAxisTensorLayout(axes, self.device_mesh)


def distribute_model(model, mesh, layout_map=None, shard_hidden=False):
    """Re-creates `model` on `mesh` with its experts sharded; same weights.

    A variable takes its sharding when it is created, and only from a
    distribution active at that moment; an existing model cannot be moved.
    So this builds a new model from `model`'s config inside an
    `ExpertParallel` scope (variables created sharded) and copies the
    weights. The optimizer state is not copied: compile the returned model
    (in the distribution's scope) before training.

    Args:
        model: a built Keras model with `SparseMoE` layers (functional,
            Sequential, or subclassed with `get_config`).
        mesh: `DeviceMesh` with an `"expert"` axis (from `expert_mesh`).
        layout_map: optional `LayoutMap` on `mesh` with layouts of other
            weights; expert entries are added to it.
        shard_hidden: bool, also split the experts' hidden dimension over
            the `"model"` axis.

    Returns:
        `(sharded_model, distribution)`: compile, fit, evaluate and predict
        the model inside `with distribution.scope():` (or after
        `keras.distribution.set_distribution(distribution)`).

    Example:

    ```python
    mesh = expert_mesh(expert_parallel=4)
    model, distribution = distribute_model(model, mesh)
    with distribution.scope():
        model.compile(optimizer="adam", loss="mse")
        model.fit(x, y, batch_size=64)
    ```
    """
    _require_jax("distribute_model")
    layout_map = expert_layout_map(
        model, mesh, layout_map=layout_map, shard_hidden=shard_hidden
    )
    distribution = ExpertParallel(layout_map)
    # The config carries the layer names, so the new variables get the same
    # paths as the layout map's keys; the build config rebuilds it.
    config = keras.saving.serialize_keras_object(model)
    config.pop("compile_config", None)
    with distribution.scope():
        sharded = keras.saving.deserialize_keras_object(config)
    paths = {v.path for v in sharded.weights}
    missing = [key for key in layout_map if key not in paths]
    if missing or len(sharded.weights) != len(model.weights):
        raise ValueError(
            "Could not re-create the model with the same variables (its "
            "config does not restore the same layers). Build the model in "
            "the distribution's scope instead (see the module docstring). "
            f"Layout map entries without a variable: {missing[:5]}"
        )
    sharded.set_weights(model.get_weights())
    return sharded, distribution


def _constrain(x, role):
    """Sharding constraint on a `SparseMoE` intermediate; identity otherwise.

    Returns `x` itself, adding nothing, when no distribution is active, on a
    backend other than JAX, or outside a JAX trace (eager ops place their
    outputs themselves). Under a trace, on the active distribution's mesh:
    - `"groups"`: token groups `(N, ...)`, N split over the data axes
      (batch and expert);
    - `"expert_buffers"`: `(E, N * C, ...)`, E over `"expert"`, the rows
      over the remaining data axes.
    Going from one to the other moves the expert axis from N to E: XLA
    implements that as an all-to-all.

    Raises:
        ValueError: N (or E) does not divide over its mesh axes.
    """
    distribution = keras.distribution.distribution()
    if distribution is None or keras.backend.backend() != "jax":
        return x
    import jax

    if not isinstance(x, jax.core.Tracer):
        return x
    mesh = distribution.device_mesh
    sizes = _axis_sizes(mesh)
    data_axes = _data_axes(distribution)
    expert_axis = getattr(distribution, "expert_axis", EXPERT_AXIS)
    if role == "groups":
        spec = [data_axes]
    elif role == "expert_buffers":
        spec = [
            tuple(a for a in data_axes if a == expert_axis),
            tuple(a for a in data_axes if a != expert_axis),
        ]
    else:
        raise ValueError(f"Unknown sharding role: {role!r}")
    shards = math.prod(sizes[a] for a in spec[0])
    if x.shape[0] % shards:
        if role == "groups":
            raise ValueError(
                f"SparseMoE split the tokens of this call into N={x.shape[0]} "
                f"routing groups, which cannot be divided evenly over the "
                f"{shards} devices of the data mesh axes {data_axes}. Set "
                "`group_size` so that N = tokens / group_size is a multiple "
                f"of {shards}: e.g. group_size = the sequence length (one "
                f"group per sequence) with a global batch divisible by "
                f"{shards}. Received: token groups of shape (N, G, d)="
                f"{tuple(x.shape)}"
            )
        raise ValueError(
            f"num_experts={x.shape[0]} cannot be split evenly over the "
            f"{expert_axis!r} mesh axis of size {shards}. Received: expert "
            f"buffers of shape {tuple(x.shape)}"
        )
    spec = [_spec_entry(axes) for axes in spec]
    spec += [None] * (len(x.shape) - len(spec))
    return keras.distribution.distribute_tensor(
        x, _MultiAxisTensorLayout(spec, mesh)
    )


def _partitioned_top_k_needed():
    """True when top-k must be one that XLA splits along token dimensions.

    XLA's TopK is not partitioned along batch dimensions (by Shardy or
    GSPMD, JAX 0.10): under a distribution it would gather the whole router
    output onto every device. A sort is partitioned.
    """
    return _distribution_active()


def _distribution_active():
    """True when a `keras.distribution` is active and acted on (JAX)."""
    return (
        keras.backend.backend() == "jax"
        and keras.distribution.distribution() is not None
    )


def _check_built_layer(layer):
    """Warns when a distribution cannot shard `layer`'s experts.

    Called at the end of `SparseMoE.build`. Warns when a distribution is
    active on a backend that ignores it, or when on JAX the mesh has an
    expert axis but this layer's experts were created replicated (their
    paths are not in the layout map, e.g. a map made for another model
    instance whose auto-generated layer names differ).
    """
    distribution = keras.distribution.distribution()
    if distribution is None:
        return
    backend = keras.backend.backend()
    if backend != "jax":
        warnings.warn(
            f"A keras.distribution ({type(distribution).__name__}) is active "
            f"while SparseMoE {layer.name!r} is built, but Keras' '{backend}' "
            "backend ignores distributions: its experts are neither sharded "
            "nor replicated, and the model trains on one device. Expert "
            "parallelism needs KERAS_BACKEND=jax.",
            stacklevel=3,
        )
        return
    expert_axis = getattr(distribution, "expert_axis", EXPERT_AXIS)
    if _axis_sizes(distribution.device_mesh).get(expert_axis, 1) <= 1:
        return
    kernel = layer.experts.intermediate_kernel
    layout = getattr(kernel, "_layout", None)
    axes = getattr(layout, "axes", None) or (None,)
    if axes[0] != expert_axis:
        warnings.warn(
            f"SparseMoE {layer.name!r} was built under a distribution whose "
            f"mesh has an {expert_axis!r} axis, but its expert weights are "
            f"not split on it (no layout map entry for {kernel.path!r}): "
            "every device holds every expert. Make the layout map with "
            "`keras_moe.distribution.expert_layout_map(model, mesh)` from a "
            "model with the same layer names, or use `distribute_model`.",
            stacklevel=3,
        )
