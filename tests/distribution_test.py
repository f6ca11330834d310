"""Tests of keras_moe.distribution (expert parallelism).

Most tests need 8 JAX devices and carry the `multidevice` marker:

    JAX_NUM_CPU_DEVICES=8 KERAS_BACKEND=jax python -m pytest -m multidevice

The others run in the normal suite on every backend: on JAX with one device
(layout maps on a 1x1 mesh, the constraint hook), on TensorFlow and PyTorch
the refusals and warnings.

The two-process test (`test_two_processes_match_one_process`) starts two
local processes that talk through JAX's CPU collectives; it takes 1-2
minutes on 2 cores, so it runs only with KERAS_MOE_MULTIPROCESS=1.
"""

import collections
import copy
import json
import os
import re
import subprocess
import sys
import warnings

import keras
import numpy as np
import pytest
from keras import ops

from keras_moe import SparseMoE
from keras_moe import distribution as moe_distribution
from keras_moe.distribution import _constrain

IS_JAX = keras.backend.backend() == "jax"
REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPOSITORY, "examples", "expert_parallel.py")
jax_only = pytest.mark.skipif(not IS_JAX, reason="keras.distribution is JAX only")
not_jax = pytest.mark.skipif(IS_JAX, reason="about backends that ignore distributions")

SEQUENCE_LENGTH = 8
MODEL_DIM = 16
NUM_CLASSES = 4


def build_model(num_experts=8, group_size=SEQUENCE_LENGTH, moe_name="moe"):
    """Dense -> residual SparseMoE (SwiGLU, drops tokens) -> pool -> head."""
    inputs = keras.Input((SEQUENCE_LENGTH, MODEL_DIM))
    x = keras.layers.Dense(MODEL_DIM, name="proj_in")(inputs)
    moe = SparseMoE(
        num_experts, 32, top_k=2, group_size=group_size, capacity_factor=1.0,
        min_capacity=1, gated=True, activation="silu", name=moe_name,
    )
    x = keras.layers.Add()([x, moe(x)])
    x = keras.layers.GlobalAveragePooling1D()(x)
    return keras.Model(inputs, keras.layers.Dense(NUM_CLASSES, name="head")(x))


def make_data(num_examples=64, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(num_examples, SEQUENCE_LENGTH, MODEL_DIM)).astype("float32")
    y = rng.integers(0, NUM_CLASSES, size=(num_examples,)).astype("int32")
    return x, y


def compile_model(model):
    model.compile(
        optimizer=keras.optimizers.Adam(1e-2),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )


def one_device_mesh(axis_names=("batch", "expert")):
    return keras.distribution.DeviceMesh(
        (1,) * len(axis_names), axis_names, devices=["cpu:0"]
    )


def spec(variable):
    return tuple(variable.value.sharding.spec)


# --- Normal suite: every backend -------------------------------------------


@not_jax
def test_helpers_refuse_backends_that_ignore_distributions():
    model = build_model()
    mesh = keras.distribution.DeviceMesh((1, 1), ("batch", "expert"), devices=["cpu:0"])
    calls = {
        "expert_mesh": lambda: moe_distribution.expert_mesh(),
        "expert_layout_map": lambda: moe_distribution.expert_layout_map(model, mesh),
        "ExpertParallel": lambda: moe_distribution.ExpertParallel(
            keras.distribution.LayoutMap(mesh)
        ),
        "distribute_model": lambda: moe_distribution.distribute_model(model, mesh),
    }
    for name, call in calls.items():
        with pytest.raises(ValueError, match=f"`{name}`.*KERAS_BACKEND=jax"):
            call()


@not_jax
def test_sparse_moe_warns_when_a_distribution_is_ignored():
    distribution = keras.distribution.DataParallel(devices=["cpu:0"])
    with distribution.scope():
        moe = SparseMoE(4, 8)
        with pytest.warns(UserWarning, match="ignores distributions"):
            moe.build((2, 3, 8))
    # Without a distribution, nothing to say.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SparseMoE(4, 8).build((2, 3, 8))


def test_constrain_is_the_identity_without_distribution():
    assert keras.distribution.distribution() is None
    x = ops.ones((4, 8, 16))
    assert _constrain(x, "groups") is x
    assert _constrain(x, "expert_buffers") is x


@jax_only
def test_no_sharding_constraint_in_the_jaxpr_without_distribution():
    import jax

    moe = SparseMoE(4, 8, group_size=4)
    moe.build((2, 4, 16))
    jaxpr = str(jax.make_jaxpr(lambda t: moe(t))(np.ones((2, 4, 16), "float32")))
    assert "sharding_constraint" not in jaxpr
    # top-2 is chosen by reductions over the expert axis, not XLA's TopK
    # (which XLA CPU lowers to a full sort).
    assert "top_k" not in jaxpr
    assert "reduce_max" in jaxpr


@jax_only
def test_constraints_and_sorted_top_k_under_a_distribution():
    # A 1x1 mesh is enough to see what the layer traces.
    import jax

    mesh = one_device_mesh()
    distribution = moe_distribution.ExpertParallel(keras.distribution.LayoutMap(mesh))
    with distribution.scope():
        moe = SparseMoE(4, 8, group_size=4)
        moe.build((2, 4, 16))
        jaxpr = str(
            jax.make_jaxpr(lambda t: moe(t))(np.ones((2, 4, 16), "float32"))
        )
    # Token groups, dispatched buffers (group- then expert-major), expert
    # outputs (expert- then group-major), combined outputs: 6 constraints.
    assert jaxpr.count("sharding_constraint[") == 6
    assert "top_k" not in jaxpr


@jax_only
def test_dropless_under_a_distribution_warns_of_its_cost_once():
    mesh = one_device_mesh()
    distribution = moe_distribution.ExpertParallel(keras.distribution.LayoutMap(mesh))
    tokens = np.ones((2, 4, 16), "float32")
    with distribution.scope():
        moe = SparseMoE(4, 8, group_size=4, capacity_factor=None)
        with pytest.warns(UserWarning, match=r"capacity_factor=None.*4 x 4 rows"):
            moe(tokens, training=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            moe(tokens, training=True)  # said once
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SparseMoE(4, 8, capacity_factor=None)(tokens, training=True)  # no distribution


@jax_only
def test_expert_layout_map_uses_exact_paths_from_nested_layers():
    class Block(keras.layers.Layer):
        def __init__(self, **kwargs):
            super().__init__(**kwargs)
            self.moe = SparseMoE(4, 8, gated=True, name="moe")

        def build(self, input_shape):
            self.moe.build(input_shape)

        def call(self, x):
            return x + self.moe(x)

    inputs = keras.Input((3, 8))
    outputs = keras.layers.Dense(8, name="head")(Block(name="block")(inputs))
    model = keras.Model(inputs, outputs)
    mesh = one_device_mesh(("batch", "expert", "model"))
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*kernel"] = (None, "model")  # a user's broad regex
    result = moe_distribution.expert_layout_map(
        model, mesh, layout_map=layout_map, shard_hidden=True
    )
    assert result is layout_map
    experts = model.get_layer("block").moe.experts
    router = model.get_layer("block").moe.router
    assert experts.intermediate_kernel.path == "block/moe/experts/intermediate_kernel"
    expected = [
        (experts.intermediate_kernel, ("expert", None, "model")),
        (experts.gate_kernel, ("expert", None, "model")),
        (experts.output_kernel, ("expert", "model", None)),
        (experts.intermediate_bias, ("expert", "model")),
        (experts.gate_bias, ("expert", "model")),
        (experts.output_bias, ("expert", None)),
        # The exact replicated router entry wins over the user's regex.
        (router.kernel, (None, None)),
    ]
    for variable, axes in expected:
        assert variable.path in layout_map  # an exact key
        assert layout_map[variable.path].axes == axes, variable.path
    assert layout_map["head/kernel"].axes == (None, "model")
    # Without shard_hidden the hidden dims stay whole.
    plain = moe_distribution.expert_layout_map(model, mesh)
    assert plain[experts.output_kernel.path].axes == ("expert", None, None)


@jax_only
def test_expert_layout_map_refusals():
    mesh = one_device_mesh()
    with pytest.raises(ValueError, match="No expert layer"):
        moe_distribution.expert_layout_map(
            keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)]), mesh
        )
    with pytest.raises(ValueError, match="is not built"):
        moe_distribution.expert_layout_map(SparseMoE(4, 8), mesh)
    with pytest.raises(ValueError, match="needs an 'expert' axis"):
        moe_distribution.expert_layout_map(build_model(), one_device_mesh(("batch",)))
    with pytest.raises(ValueError, match="needs a 'model' mesh axis"):
        moe_distribution.expert_layout_map(build_model(), mesh, shard_hidden=True)
    with pytest.raises(ValueError, match="expert_axis='experts'"):
        moe_distribution.ExpertParallel(
            keras.distribution.LayoutMap(mesh), expert_axis="experts"
        )


# --- 8 devices --------------------------------------------------------------


@pytest.mark.multidevice
def test_expert_mesh_shapes():
    assert moe_distribution.expert_mesh().shape == (1, 8)
    mesh = moe_distribution.expert_mesh(expert_parallel=4)
    assert (mesh.shape, mesh.axis_names) == ((2, 4), ("batch", "expert"))
    mesh = moe_distribution.expert_mesh(expert_parallel=2, model_parallel=2)
    assert (mesh.shape, mesh.axis_names) == ((2, 2, 2), ("batch", "expert", "model"))
    with pytest.raises(ValueError, match="expert_parallel=3"):
        moe_distribution.expert_mesh(expert_parallel=3)
    with pytest.raises(ValueError, match="expert_parallel=0"):
        moe_distribution.expert_mesh(expert_parallel=0)


@pytest.mark.multidevice
def test_num_experts_must_divide_over_the_expert_axis():
    mesh = moe_distribution.expert_mesh(expert_parallel=4)
    with pytest.raises(ValueError, match=r"num_experts=6.*size 4"):
        moe_distribution.expert_layout_map(build_model(num_experts=6), mesh)


@pytest.mark.multidevice
@pytest.mark.parametrize("mesh_shape", [(4, 2), (2, 2, 2)])
def test_expert_weights_and_optimizer_slots_are_sharded(mesh_shape):
    shard_hidden = len(mesh_shape) == 3
    mesh = moe_distribution.expert_mesh(
        expert_parallel=mesh_shape[1], model_parallel=2 if shard_hidden else 1
    )
    model, distribution = moe_distribution.distribute_model(
        build_model(), mesh, shard_hidden=shard_hidden
    )
    with distribution.scope():
        compile_model(model)
        model.optimizer.build(model.trainable_variables)
    hidden = "model" if shard_hidden else None
    expected = {
        "moe/experts/intermediate_kernel": ("expert", None, hidden),
        "moe/experts/gate_kernel": ("expert", None, hidden),
        "moe/experts/output_kernel": ("expert", hidden, None),
        "moe/experts/intermediate_bias": ("expert", hidden),
        "moe/experts/output_bias": ("expert", None),
        "moe/router/kernel": (None, None),
        "proj_in/kernel": (None, None),
    }
    variables = {v.path: v for v in model.variables}
    slots = {v.path: v for v in model.optimizer.variables}
    for path, axes in expected.items():
        assert spec(variables[path]) == axes, path
        for kind in ("momentum", "velocity"):
            slot = slots[f"adam/{path.replace('/', '_')}_{kind}"]
            assert spec(slot) == axes, slot.path
    # Each device holds E / expert-axis-size experts.
    kernel = variables["moe/experts/intermediate_kernel"].value
    shard_shape = kernel.addressable_shards[0].data.shape
    assert shard_shape[0] == 8 // mesh_shape[1]


@pytest.fixture(scope="module")
def one_device_run():
    """Initial weights, and losses / weights / predictions after `fit`."""
    keras.utils.clear_session()
    keras.utils.set_random_seed(0)
    model = build_model()
    initial = model.get_weights()
    config = keras.saving.serialize_keras_object(model)
    compile_model(model)
    x, y = make_data()
    history = model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    return {
        "config": config,
        "initial": initial,
        "loss": history.history["loss"],
        "weights": model.get_weights(),
        "predictions": np.asarray(model.predict(x, batch_size=32, verbose=0)),
    }


def restore(run):
    # Deserialization consumes the config dict: give it a copy.
    model = keras.saving.deserialize_keras_object(copy.deepcopy(run["config"]))
    model.set_weights(run["initial"])
    return model


@pytest.mark.multidevice
@pytest.mark.parametrize("mesh_shape", [(8, 1), (4, 2), (2, 4), (1, 8)])
def test_sharded_fit_matches_one_device(mesh_shape, one_device_run, tmp_path):
    mesh = moe_distribution.expert_mesh(expert_parallel=mesh_shape[1])
    model, distribution = moe_distribution.distribute_model(
        restore(one_device_run), mesh
    )
    x, y = make_data()
    with distribution.scope():
        compile_model(model)
        history = model.fit(x, y, batch_size=32, epochs=1, shuffle=False, verbose=0)
    # Largest differences seen (2 epochs, every mesh): losses 1.2e-7,
    # weights 1.9e-6, predictions 3e-7.
    np.testing.assert_allclose(
        history.history["loss"], one_device_run["loss"], rtol=1e-5
    )
    for sharded, reference in zip(model.get_weights(), one_device_run["weights"]):
        np.testing.assert_allclose(sharded, reference, atol=1e-5)
    assert spec(model.get_layer("moe").experts.output_kernel) == ("expert", None, None)
    if mesh_shape != (2, 4):
        return
    # Saved sharded, loaded with no distribution: one device, same weights
    # and outputs.
    path = str(tmp_path / "sharded.keras")
    model.save(path)
    keras.utils.clear_session()
    loaded = keras.saving.load_model(path)
    kernel = loaded.get_layer("moe").experts.output_kernel
    assert len(kernel.value.sharding.device_set) == 1
    for restored, sharded in zip(loaded.get_weights(), model.get_weights()):
        np.testing.assert_array_equal(restored, sharded)
    np.testing.assert_allclose(
        loaded.predict(x, batch_size=32, verbose=0),
        one_device_run["predictions"],
        atol=1e-5,
    )


COLLECTIVES = (
    "all-to-all", "all-gather", "all-reduce", "reduce-scatter",
    "collective-permute",
)
_COLLECTIVE = re.compile(
    r"=\s+(\(.*?\)|\S+)\s+(" + "|".join(COLLECTIVES) + r")(?:-start)?\("
)


def train_step_collectives(model, distribution, x, y):
    """{collective: count} in the compiled train step, as `fit` compiles it."""
    import jax
    from keras.src.backend.jax.trainer import _distribute_data

    with distribution.scope():
        compile_model(model)
        data = _distribute_data((x, y, None))
        model._symbolic_build(data_batch=data)
        state = model._get_jax_state(
            trainable_variables=True, non_trainable_variables=True,
            optimizer_variables=True, metrics_variables=True,
        )
        # The same jit arguments as JAXTrainer.make_train_function.
        train_step = jax.jit(
            model.train_step,
            donate_argnums=0,
            out_shardings=(None, model._get_state_sharding_spec()),
        )
        hlo = train_step.lower(state, data).compile().as_text()
    counts = collections.Counter(m.group(2) for m in _COLLECTIVE.finditer(hlo))
    return {op: counts.get(op, 0) for op in COLLECTIVES}


@pytest.mark.multidevice
@pytest.mark.parametrize(
    "mesh_shape, all_to_all",
    # Expert meshes: dispatch and return, forward and backward. 8x1 is plain
    # data parallelism: nothing but the gradient all-reduce.
    [((8, 1), 0), ((4, 2), 4), ((2, 4), 4), ((1, 8), 4)],
)
def test_train_step_moves_tokens_by_all_to_all(mesh_shape, all_to_all):
    keras.utils.set_random_seed(0)
    mesh = moe_distribution.expert_mesh(expert_parallel=mesh_shape[1])
    model, distribution = moe_distribution.distribute_model(build_model(), mesh)
    counts = train_step_collectives(model, distribution, *make_data(32))
    assert counts["all-to-all"] == all_to_all, counts
    assert counts["all-gather"] == 0, counts  # no device gathers every token


@pytest.mark.multidevice
def test_token_groups_that_do_not_divide_over_the_devices_are_refused():
    # group_size=None: all 256 tokens of a batch form one group, which cannot
    # be split over 8 devices.
    mesh = moe_distribution.expert_mesh(expert_parallel=4)
    model, distribution = moe_distribution.distribute_model(
        build_model(group_size=None), mesh
    )
    x, _ = make_data(32)
    with distribution.scope():
        with pytest.raises(ValueError, match=r"N=1 routing groups.*`group_size`"):
            model.predict(x, batch_size=32, verbose=0)


@pytest.mark.multidevice
def test_building_with_a_layout_map_of_other_paths_warns():
    mesh = moe_distribution.expert_mesh(expert_parallel=4)
    layout_map = moe_distribution.expert_layout_map(build_model(), mesh)
    distribution = moe_distribution.ExpertParallel(layout_map)
    with distribution.scope():
        with pytest.warns(UserWarning, match="every device holds every expert"):
            build_model(moe_name="other_moe")
        model = build_model()  # same paths: sharded, no warning
    assert spec(model.get_layer("moe").experts.intermediate_kernel) == (
        "expert", None, None,
    )


# --- The example, one and two processes -------------------------------------


def run_example(*arguments, env_update=None, timeout=600):
    env = dict(os.environ, KERAS_BACKEND="jax", JAX_PLATFORMS="cpu")
    env.pop("JAX_NUM_CPU_DEVICES", None)  # the example sets it itself
    env.update(env_update or {})
    result = subprocess.run(
        [sys.executable, EXAMPLE, "--smoke", *arguments],
        env=env, capture_output=True, text=True, timeout=timeout, cwd=REPOSITORY,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


@pytest.fixture(scope="module")
def example_report(tmp_path_factory):
    """The example's report, one process with 8 virtual devices, 1x8 mesh."""
    report = tmp_path_factory.mktemp("example") / "one_process.json"
    stdout = run_example("--mesh", "1x8", "--report", str(report))
    with open(report) as f:
        return stdout, json.load(f)


@pytest.mark.multidevice
@pytest.mark.smoke
def test_example_runs_and_prints_the_expert_placement(example_report):
    stdout, report = example_report
    assert report["mesh"] == [1, 8] and report["processes"] == 1
    # One expert per device, expert e on cpu:e.
    assert [(row[1], row[3]) for row in report["placement"]] == [
        (e, [f"cpu:{e}"]) for e in range(8)
    ]
    assert "block_0_moe" in stdout and "train loss per epoch" in stdout
    assert np.all(np.isfinite(report["loss"] + report["val_loss"]))


@pytest.mark.multidevice
@pytest.mark.smoke
@pytest.mark.skipif(
    not os.environ.get("KERAS_MOE_MULTIPROCESS"),
    reason="starts 2 processes (1-2 min); set KERAS_MOE_MULTIPROCESS=1",
)
def test_two_processes_match_one_process(example_report, tmp_path):
    # Two processes with 4 CPU devices each, experts 0-3 in process 0 and
    # 4-7 in process 1, talking through JAX's CPU collectives (gloo).
    _, one_process = example_report
    report = tmp_path / "two_processes.json"
    run_example(
        "--mesh", "1x8", "--local-processes", "2", "--report", str(report),
        "--save", str(tmp_path / "two_processes.keras"),
    )
    with open(report) as f:
        two_processes = json.load(f)
    assert two_processes["processes"] == 2
    devices = [row[3][0] for row in two_processes["placement"]]
    assert devices[:4] == ["cpu:0", "cpu:1", "cpu:2", "cpu:3"]
    assert all(d not in devices[:4] for d in devices[4:])  # the other process
    np.testing.assert_allclose(two_processes["loss"], one_process["loss"], rtol=1e-5)
    np.testing.assert_allclose(
        two_processes["val_loss"], one_process["val_loss"], rtol=1e-5
    )
    assert os.path.exists(tmp_path / "two_processes.keras")
