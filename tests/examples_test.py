"""The examples, end to end in smoke mode (a subprocess each), and their
TFDS data paths on `tfds.testing.mock_data`."""

import importlib.util
import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest

from tests.plotting_test import assert_valid_png

REPOSITORY = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(REPOSITORY, "examples")


def load_example(name):
    spec = importlib.util.spec_from_file_location(
        f"example_{name}", os.path.join(EXAMPLES, f"{name}.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_example(name, tmp_path, *arguments):
    backend = keras.backend.backend()
    env = dict(os.environ, KERAS_BACKEND=backend)
    env.pop("JAX_NUM_CPU_DEVICES", None)
    result = subprocess.run(
        [sys.executable, os.path.join(EXAMPLES, f"{name}.py"), "--smoke",
         "--backend", backend, "--output-dir", str(tmp_path), *arguments],
        env=env, capture_output=True, text=True, timeout=600, cwd=str(tmp_path),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    with open(tmp_path / "results.json") as f:
        results = json.load(f)
    assert results["backend"] == backend
    for figure in ("expert_load.png", "routing_map.png"):
        assert_valid_png(tmp_path / figure)
    # RoutingMonitor statistics in the fit logs.
    assert "moe_balance_loss" in result.stdout
    assert "moe_load_imbalance" in result.stdout
    return result.stdout, results


@pytest.mark.smoke
def test_text_classification_compares_moe_and_dense(tmp_path):
    stdout, results = run_example("text_classification", tmp_path)
    assert set(results["models"]) == {"moe", "dense"}
    moe, dense = results["models"]["moe"], results["models"]["dense"]
    # Equal active size: the MoE model has more parameters, about the same
    # active ones (router and the extra expert output biases).
    assert moe["total_params"] > dense["total_params"]
    assert abs(moe["active_params"] - dense["active_params"]) < 0.05 * dense["active_params"]
    assert dense["total_params"] == dense["active_params"]
    for model in (moe, dense):
        assert 0.0 <= model["test_accuracy"] <= 1.0
        assert np.isfinite(model["test_loss"])
    for text in ("test accuracy", "active params/token", "moe ", "dense ",
                 "load imbalance", "saved"):
        assert text in stdout


@pytest.mark.smoke
def test_language_model(tmp_path):
    stdout, results = run_example("language_model", tmp_path)
    assert set(results["models"]) == {"moe"}
    moe = results["models"]["moe"]
    assert np.isfinite(moe["test_loss"]) and moe["bits_per_byte"] > 0
    assert len(results["sample"]) == 8
    for text in ("bits/byte", "active params/token", "sampled:"):
        assert text in stdout


@pytest.mark.smoke
def test_vit_moe(tmp_path):
    stdout, results = run_example("vit_moe", tmp_path)
    assert set(results["models"]) == {"moe"}
    assert 0.0 <= results["models"]["moe"]["test_accuracy"] <= 1.0
    assert "test accuracy" in stdout and "chance accuracy" in stdout


def test_flags():
    example = load_example("text_classification")
    args = example.parse_args(
        ["--epochs", "2", "--num-experts", "16", "--top-k", "1",
         "--capacity-factor", "none", "--no-dense-baseline", "--backend", "torch"]
    )
    assert (args.epochs, args.num_experts, args.top_k) == (2, 16, 1)
    assert args.capacity_factor is None and not args.dense_baseline
    assert args.backend == "torch" and args.dataset == "synthetic"
    assert example.parse_args([]).dense_baseline  # the main job compares
    assert not load_example("vit_moe").parse_args([]).dense_baseline
    with pytest.raises(SystemExit):
        example.parse_args(["--capacity-factor", "-1"])
    with pytest.raises(SystemExit):
        example.parse_args(["--dataset", "mnist"])
    with pytest.raises(SystemExit):
        example.parse_args(["--moe-layers", "none"])


@pytest.mark.parametrize(
    "name, dataset, shape",
    [
        ("text_classification", "imdb_reviews", (8, 48)),
        ("language_model", "tiny_shakespeare", None),
        ("vit_moe", "mnist", (8, 16, 16, 3)),
        ("vit_moe", "cifar10", (8, 16, 16, 3)),
    ],
)
def test_tfds_datasets_on_mock_data(name, dataset, shape):
    tfds = pytest.importorskip("tensorflow_datasets")
    example = load_example(name)
    args = example.parse_args(["--dataset", dataset, "--smoke"])
    with tfds.testing.mock_data(num_examples=8):
        train, test, info = example.load_data(args)
    if shape is not None:
        assert train.x.shape == shape
    else:
        # Mock Tiny Shakespeare is short random text: windows of 16 bytes.
        assert train.x.shape[1:] == (16,) and len(train.x) > 0
        assert (train.y[:, :-1] == train.x[:, 1:]).all()
    assert len(test.x) > 0
    # The builders accept what the loader returns.
    if name == "vit_moe":
        model = example.build_model(args, info, dense=False)
        assert model.output.shape == (None, info["num_classes"])
