"""`.keras` files move between backends and compute the same thing.

The run on backend B saves `helpers.zoo_model` (an MoE layer of every
reliability case, padding masks) and a small model of each builder of
`keras_moe.models` (`MODELS`: a text classifier, a causal language model, a
ViT-MoE, each with other routing options) with every weight, routing
statistic and seed-generator state set to random values, so nothing is at
its initial value. Then one
fresh process (`portability_worker`) under the backend P that follows B in
the cycle jax -> tensorflow -> torch -> jax loads the file and re-saves it,
and this process loads P's file back. Each run checks B -> P and P -> B; the
CI's three runs (one per backend) together check all six directions, at the
cost of one extra process per run. `KERAS_MOE_ALL_BACKEND_PAIRS=1` checks
both other backends in one run.

Compared: predictions (float32, atol = rtol = 1e-5), routing decisions of
every MoE layer (expert index and kept flags exactly, combine weights to
1e-6), routing statistics and every variable, seed states included
(bit-exact: loading copies bytes; seed states are cast to the loading
backend's integer dtype).
"""

import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile

import keras
import numpy as np
from absl.testing import parameterized
from keras.src import testing

from keras_moe import models
from keras_moe.layers._seed_state import SavesSeedStates
from tests.reliability import helpers
from tests.reliability.portability_worker import record

REPO_ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
NEXT_BACKEND = {"jax": "tensorflow", "tensorflow": "torch", "torch": "jax"}
# Tiny sizes shared by the builder models: one MoE transformer block.
_BUILDER_SIZES = dict(
    num_layers=1, model_dim=8, num_heads=2, intermediate_dim=8,
    num_experts=4, top_k=2, moe_layers="all", capacity_factor=1.0,
)


def _builder_models():
    """{name: (model, inputs)} of the `keras_moe.models` builders.

    Expert choice with a shared expert in an encoder with padding;
    bias-balanced SwiGLU experts in a causal decoder, at a capacity that
    drops; noisy top-k with batch-prioritised slots in a ViT.
    """
    rng = np.random.default_rng(2)
    tokens = rng.integers(1, helpers.VOCABULARY_SIZE, size=(4, 6)).astype("int32")
    tokens[:2, 4:] = 0  # padding
    images = rng.uniform(size=(4, 4, 4, 3)).astype("float32")
    return {
        "text_classifier": (
            models.text_classifier(
                num_classes=3, sequence_length=6,
                vocabulary_size=helpers.VOCABULARY_SIZE, dropout=0.1,
                moe_options={
                    "router": "expert_choice", "num_shared_experts": 1,
                    "eval_capacity_factor": 0.75,
                },
                seed=1, **_BUILDER_SIZES,
            ),
            tokens,
        ),
        "causal_lm": (
            models.causal_language_model(
                sequence_length=6, vocabulary_size=helpers.VOCABULARY_SIZE,
                activation="silu", gated=True,
                moe_options={
                    "router": "bias_balanced", "eval_capacity_factor": 1.0,
                    "min_capacity": 1,
                },
                seed=2, **_BUILDER_SIZES,
            ),
            tokens,
        ),
        "vit_moe": (
            models.vit_moe_classifier(
                num_classes=3, image_size=4, patch_size=2,
                moe_options={
                    "router": "noisy_top_k", "priority": "batch_prioritized",
                    "eval_capacity_factor": 1.0, "min_capacity": 1,
                },
                seed=3, **_BUILDER_SIZES,
            ),
            images,
        ),
    }


def _randomize(model, seed):
    """Gives every variable of `model` random values.

    Routing statistics get positive values, like the sums they hold; seed
    generator states (integers) small non-negative ones, for the layers
    that save them (keras_moe's routers and experts). Keras' own layers
    (`Dropout`, `MultiHeadAttention`) do not save their seed states: a
    loaded model has them at their seeded initial values, so those are left
    there.
    """
    saved_states = [
        generator.state
        for layer in model._flatten_layers(include_self=False)
        if isinstance(layer, SavesSeedStates)
        for generator in layer._saved_seed_generators()
    ]
    rng = np.random.default_rng(seed)
    for variable in model.variables:
        if "float" not in str(variable.dtype):
            if not any(variable is state for state in saved_states):
                continue
            values = rng.integers(0, 1000, size=variable.shape)
        else:
            values = rng.normal(scale=0.5, size=variable.shape)
            if not variable.trainable:
                values = np.abs(values) + 1.0
        variable.assign(values.astype(variable.dtype))


class BackendPortabilityTest(testing.TestCase):
    @classmethod
    def setUpClass(cls):
        super().setUpClass()
        cls.backend = keras.backend.backend()
        cls.directory = tempfile.mkdtemp(prefix="keras_moe_portability_")
        keras.utils.set_random_seed(0)
        tokens, _ = helpers.zoo_data(num_samples=8, seed=1)
        saved = {"zoo": (helpers.zoo_model(seed=3), tokens)}
        saved.update(_builder_models())
        # {name: (inputs, what the model computes here)}
        cls.expected = {}
        for index, (name, (model, x)) in enumerate(saved.items()):
            _randomize(model, seed=4 + index)
            model.save(os.path.join(cls.directory, f"{name}.keras"))
            np.savez(os.path.join(cls.directory, f"{name}.inputs.npz"), x=x)
            cls.expected[name] = (x, record(model, x))

    @classmethod
    def tearDownClass(cls):
        shutil.rmtree(cls.directory, ignore_errors=True)
        super().tearDownClass()

    def _run_worker(self, backend):
        env = dict(os.environ)
        env["KERAS_BACKEND"] = backend
        env["PYTHONPATH"] = os.pathsep.join(
            [REPO_ROOT] + [p for p in [env.get("PYTHONPATH")] if p]
        )
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        process = subprocess.run(
            [
                sys.executable, "-m", "tests.reliability.portability_worker",
                self.directory,
            ],
            cwd=REPO_ROOT, env=env, capture_output=True, text=True,
            timeout=600,
        )
        self.assertEqual(
            process.returncode, 0,
            f"loading under {backend} failed:\n{process.stderr[-4000:]}",
        )

    def assertSameComputation(self, actual, expected, where):
        self.assertEqual(sorted(actual), sorted(expected), where)
        for key, value in expected.items():
            message = f"{where}: {key}"
            if key == "predictions":
                self.assertAllClose(
                    actual[key], value, atol=1e-5, rtol=1e-5, msg=message
                )
            elif key.endswith(("/combine_weights", "/expert_weights")):
                self.assertAllClose(
                    actual[key], value, atol=1e-6, rtol=1e-6, msg=message
                )
            else:
                # Indices, kept flags, statistics and variables: bit-exact.
                np.testing.assert_array_equal(
                    actual[key], value, err_msg=message
                )

    @parameterized.named_parameters(
        ("jax", "jax"), ("tensorflow", "tensorflow"), ("torch", "torch")
    )
    def test_keras_file_moves_between_backends(self, other):
        if other == self.backend:
            self.skipTest("the file's own backend")
        if other != NEXT_BACKEND[self.backend] and not os.environ.get(
            "KERAS_MOE_ALL_BACKEND_PAIRS"
        ):
            self.skipTest(
                f"{self.backend} <-> {other} is checked by the "
                f"KERAS_BACKEND={other} run (KERAS_MOE_ALL_BACKEND_PAIRS=1 "
                "checks it here)"
            )
        if importlib.util.find_spec(other) is None:
            self.skipTest(f"{other} is not installed")
        self._run_worker(other)
        for name, (x, expected) in self.expected.items():
            # Saved here, loaded under `other`.
            path = os.path.join(self.directory, f"{name}.{other}")
            self.assertSameComputation(
                dict(np.load(f"{path}.npz")), expected,
                f"{name} saved by {self.backend}, loaded by {other}",
            )
            # Saved under `other` (from the file it loaded), loaded here.
            model = keras.saving.load_model(f"{path}.keras", safe_mode=True)
            self.assertSameComputation(
                record(model, x), expected,
                f"{name} saved by {other}, loaded by {self.backend}",
            )
