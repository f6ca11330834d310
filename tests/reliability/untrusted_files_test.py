"""`.keras` files from untrusted sources: `safe_mode=True` refuses code.

A `.keras` file is a zip whose `config.json` names the classes and functions
to rebuild. These tests save a model with MoE layers, then edit its config the
way an attacker (or a careless hand) would: a Python lambda, an unknown
class, a Python builtin where a function is expected. Loading must fail with
an error that says what was refused and why; nothing in the file may run.
"""

import json
import os
import zipfile

import keras
import numpy as np
from absl.testing import parameterized
from keras.src import testing

from keras_moe import SparseMoE
from keras_moe import TopKRouter
from keras_moe.models import text_classifier
from tests.utils import to_numpy

# Must not be called when a file is loaded or used; see `_EVIL_CALLS`.
_EVIL_CALLS = []


def _evil(x):
    _EVIL_CALLS.append(x)
    return x


def _serialized_lambda():
    """A lambda as Keras writes it into a config (`"__lambda__"`)."""
    return keras.saving.serialize_keras_object(lambda x: x * 2.0)


def _edit_config(path, edit):
    """Rewrites the file's `config.json` as `edit(config)` leaves it."""
    with zipfile.ZipFile(path) as archive:
        files = {name: archive.read(name) for name in archive.namelist()}
    config = json.loads(files["config.json"])
    edit(config)
    files["config.json"] = json.dumps(config).encode()
    with zipfile.ZipFile(path, "w") as archive:
        for name, content in files.items():
            archive.writestr(name, content)


def _rewrite(path, layer_name, key, value):
    """Sets `config[key] = value` of layer `layer_name` inside the file."""

    def edit(config):
        found = False
        for layer in config["config"]["layers"]:
            if layer["config"]["name"] == layer_name:
                if key == "class_name":
                    layer["class_name"] = value
                    layer["registered_name"] = value
                    layer["module"] = "evil_module"
                else:
                    layer["config"][key] = value
                found = True
        assert found, layer_name

    _edit_config(path, edit)


class UntrustedFileTest(testing.TestCase):
    def setUp(self):
        super().setUp()
        inputs = keras.Input((5, 4))
        hidden = SparseMoE(
            4, 8, top_k=2, name="moe",
            router=TopKRouter(4, 2, normalize_weights=True),
        )(inputs)
        self.model = keras.Model(inputs, keras.layers.Dense(3)(hidden))
        self.x = np.random.default_rng(0).normal(size=(2, 5, 4)).astype("float32")
        self.path = os.path.join(self.get_temp_dir(), "model.keras")
        self.model.save(self.path)

    def assertLoadFails(self, pattern, safe_mode=True):
        with self.assertRaisesRegex(Exception, pattern):
            keras.saving.load_model(self.path, safe_mode=safe_mode)

    def test_the_unedited_file_loads_in_safe_mode(self):
        restored = keras.saving.load_model(self.path, safe_mode=True)
        self.assertAllClose(
            restored.predict(self.x, verbose=0),
            to_numpy(self.model.predict(self.x, verbose=0)),
        )

    def test_lambda_layer_is_refused(self):
        inputs = keras.Input((5, 4))
        hidden = SparseMoE(4, 8, name="moe")(inputs)
        hidden = keras.layers.Lambda(lambda t: t * 2.0, name="code")(hidden)
        model = keras.Model(inputs, hidden)
        model.save(self.path)
        self.assertLoadFails(r"(?s)lambda.*safe_mode=False")
        # The file itself is fine: trusted, it loads and computes the same.
        restored = keras.saving.load_model(self.path, safe_mode=False)
        self.assertAllClose(
            restored.predict(self.x, verbose=0),
            to_numpy(model.predict(self.x, verbose=0)),
        )

    def test_lambda_as_activation_is_refused_with_the_reason(self):
        _rewrite(self.path, "moe", "activation", _serialized_lambda())
        self.assertLoadFails(r"(?s)`activation`.*lambda.*safe_mode=False")
        # Trusted (safe_mode=False), the lambda is really what the file holds.
        restored = keras.saving.load_model(self.path, safe_mode=False)
        self.assertEqual(restored.get_layer("moe").activation(3.0), 6.0)

    def test_lambda_as_router_is_refused_with_the_reason(self):
        _rewrite(self.path, "moe", "router", _serialized_lambda())
        self.assertLoadFails(r"(?s)`router`.*lambda.*safe_mode=False")
        # Even trusted, a function is not a router.
        self.assertLoadFails(r"`router`, expected None, .* or a router layer", safe_mode=False)

    @parameterized.named_parameters(
        (
            "router",
            "router",
            {"module": "evil_module", "class_name": "EvilRouter", "config": {}, "registered_name": "evil>EvilRouter"},
            r"(?s)`router`.*EvilRouter",
        ),
        (
            "initializer",
            "kernel_initializer",
            {"module": "evil_module", "class_name": "EvilInit", "config": {}, "registered_name": None},
            r"(?s)`kernel_initializer`.*EvilInit",
        ),
        ("layer", "class_name", "EvilMoE", "EvilMoE"),
    )
    def test_unknown_class_is_refused(self, key, value, pattern):
        _rewrite(self.path, "moe", key, value)
        self.assertLoadFails(pattern, safe_mode=True)
        self.assertLoadFails(pattern, safe_mode=False)

    @parameterized.named_parameters(
        ("builtin_eval", "builtins", "eval"),
        ("os_system", "os", "system"),
        ("module_function", "tests.reliability.untrusted_files_test", "_evil"),
    )
    def test_function_from_outside_keras_is_refused(self, module, name):
        # A function named by module, where an activation is expected.
        _rewrite(
            self.path, "moe", "activation",
            {"module": module, "class_name": "function", "config": name, "registered_name": name},
        )
        self.assertLoadFails(rf"(?s)`activation`.*{name}")
        self.assertEqual(_EVIL_CALLS, [])


class UntrustedBuilderFileTest(testing.TestCase):
    """The same refusals one level down: the MoE layer inside a
    `TransformerBlock` of a `keras_moe.models` builder (loading the
    unedited builder files in safe mode, under every backend, is
    `portability_test`'s)."""

    def setUp(self):
        super().setUp()
        model = text_classifier(
            num_classes=2, sequence_length=6, vocabulary_size=11,
            num_layers=1, model_dim=8, num_heads=2, intermediate_dim=8,
            num_experts=4, moe_layers="all",
        )
        self.path = os.path.join(self.get_temp_dir(), "classifier.keras")
        model.save(self.path)

    def _set_in_block(self, key, value):
        """Sets `key` of block_0's feed-forward config (or the class of
        the feed-forward, `key="class_name"`)."""

        def edit(config):
            (block,) = [
                layer for layer in config["config"]["layers"]
                if layer["config"]["name"] == "block_0"
            ]
            feed_forward = block["config"]["feed_forward"]
            self.assertEqual(feed_forward["class_name"], "SparseMoE")
            if key == "class_name":
                feed_forward.update(
                    class_name=value, registered_name=value, module="evil_module"
                )
            else:
                feed_forward["config"][key] = value

        _edit_config(self.path, edit)

    def test_lambda_inside_a_block_is_refused_with_the_reason(self):
        self._set_in_block("activation", _serialized_lambda())
        with self.assertRaisesRegex(
            Exception, r"(?s)`activation`.*lambda.*safe_mode=False"
        ):
            keras.saving.load_model(self.path, safe_mode=True)

    def test_builtin_function_inside_a_block_is_refused(self):
        self._set_in_block(
            "activation",
            {"module": "builtins", "class_name": "function", "config": "eval", "registered_name": "eval"},
        )
        with self.assertRaisesRegex(Exception, r"(?s)`activation`.*eval"):
            keras.saving.load_model(self.path, safe_mode=True)
