"""`.keras` files move between backends and compute the same thing.

The run on backend B saves `helpers.zoo_model` (an MoE layer of every
reliability case, padding masks) with every weight, routing statistic and
seed-generator state set to random values, so nothing is at its initial
value. Then one
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

from tests.reliability import helpers
from tests.reliability.portability_worker import record

REPO_ROOT = os.path.dirname(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
)
NEXT_BACKEND = {"jax": "tensorflow", "tensorflow": "torch", "torch": "jax"}


def _randomize(model, seed):
    """Gives every variable of `model` random values.

    Routing statistics get positive values, like the sums they hold; seed
    generator states (integers) small non-negative ones.
    """
    rng = np.random.default_rng(seed)
    for variable in model.variables:
        if "float" not in str(variable.dtype):
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
        cls.tokens, _ = helpers.zoo_data(num_samples=8, seed=1)
        model = helpers.zoo_model(seed=3)
        _randomize(model, seed=4)
        model.save(os.path.join(cls.directory, "zoo.keras"))
        np.savez(os.path.join(cls.directory, "zoo.inputs.npz"), x=cls.tokens)
        cls.expected = record(model, cls.tokens)

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
            elif key.endswith("/combine_weights"):
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
        # Saved here, loaded under `other`.
        loaded = dict(np.load(os.path.join(self.directory, f"zoo.{other}.npz")))
        self.assertSameComputation(
            loaded, self.expected, f"saved by {self.backend}, loaded by {other}"
        )
        # Saved under `other` (from the file it loaded), loaded here.
        model = keras.saving.load_model(
            os.path.join(self.directory, f"zoo.{other}.keras"), safe_mode=True
        )
        self.assertSameComputation(
            record(model, self.tokens), self.expected,
            f"saved by {other}, loaded by {self.backend}",
        )
