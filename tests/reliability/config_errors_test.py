"""Malformed configs fail at once, with a ValueError naming the argument.

A config reaches `from_config` from a `.keras` file or from user code; a
missing argument, a value of the wrong type or out of range must not build a
layer that misbehaves later, nor surface as Keras' generic TypeError. Each
row below is one malformed config of one public layer. New layers: add a
base config to `BASE_CONFIGS` and their arguments to `MALFORMED`.
"""

import keras
import numpy as np
from absl.testing import parameterized
from keras.src import testing

from keras_moe import BiasBalancedRouter
from keras_moe import DenseMoE
from keras_moe import ExpertChoiceRouter
from keras_moe import ExpertFFN
from keras_moe import FeedForward
from keras_moe import NoisyTopKRouter
from keras_moe import SoftMoE
from keras_moe import SparseMoE
from keras_moe import TopKRouter
from keras_moe.models import PatchEmbedding
from keras_moe.models import TokenPooling
from keras_moe.models import TransformerBlock

_FEED_FORWARD = keras.saving.serialize_keras_object(FeedForward(8))

BASE_CONFIGS = {
    SparseMoE: {"num_experts": 4, "intermediate_dim": 8, "top_k": 2},
    TopKRouter: {"num_experts": 4, "top_k": 2},
    NoisyTopKRouter: {"num_experts": 4, "top_k": 2},
    BiasBalancedRouter: {"num_experts": 4, "top_k": 2},
    ExpertChoiceRouter: {"num_experts": 4, "top_k": 2},
    ExpertFFN: {"num_experts": 4, "intermediate_dim": 8},
    FeedForward: {"intermediate_dim": 8},
    DenseMoE: {"num_experts": 4, "intermediate_dim": 8},
    SoftMoE: {"num_experts": 4, "intermediate_dim": 8},
    TransformerBlock: {"num_heads": 2, "feed_forward": _FEED_FORWARD},
    PatchEmbedding: {"patch_size": 2, "model_dim": 8},
    TokenPooling: {},
}

# (layer, argument, malformed value, what the message must contain[, other
# arguments the row needs]).
MALFORMED = [
    # Wrong types.
    (SparseMoE, "num_experts", "4", "num_experts='4'"),
    (SparseMoE, "intermediate_dim", 8.5, "intermediate_dim=8.5"),
    (SparseMoE, "top_k", None, "top_k=None"),
    (SparseMoE, "capacity_factor", "1.25", "capacity_factor='1.25'"),
    (SparseMoE, "group_size", "all", "group_size='all'"),
    (SparseMoE, "causal", "yes", "causal='yes'"),
    (SparseMoE, "gated", "false", "gated='false'"),
    (SparseMoE, "use_bias", "no", "use_bias='no'"),
    (SparseMoE, "activation", 3, "activation=3"),
    (SparseMoE, "kernel_initializer", "nope", "kernel_initializer='nope'"),
    (SparseMoE, "bias_regularizer", "nope", "bias_regularizer='nope'"),
    (SparseMoE, "router", {"class_name": "NoSuchRouter", "config": {}}, "router=.*NoSuchRouter"),
    (SparseMoE, "router", keras.saving.serialize_keras_object(keras.layers.Dense(2)), "router.num_experts=None"),
    (SparseMoE, "seed", "abc", "seed='abc'"),
    (TopKRouter, "normalize_weights", "false", "normalize_weights='false'"),
    (TopKRouter, "softmax_after_top_k", 1, "softmax_after_top_k=1"),
    (TopKRouter, "use_bias", "true", "use_bias='true'"),
    (TopKRouter, "bias_initializer", "nope", "bias_initializer='nope'"),
    (TopKRouter, "kernel_regularizer", 5, "kernel_regularizer=5"),
    (TopKRouter, "seed", 1.5, "seed=1.5"),
    (ExpertFFN, "num_experts", [4], r"num_experts=\[4\]"),
    (ExpertFFN, "gated", "no", "gated='no'"),
    (FeedForward, "activation", "no_such_activation", "activation='no_such_activation'"),
    (FeedForward, "kernel_initializer", {"class_name": "Nope"}, "kernel_initializer="),
    (SparseMoE, "num_shared_experts", "1", "num_shared_experts='1'"),
    (SparseMoE, "priority", "fifo", "priority='fifo'"),
    (NoisyTopKRouter, "noise_std", "big", "noise_std='big'"),
    (NoisyTopKRouter, "normalize_weights", "false", "normalize_weights='false'"),
    (BiasBalancedRouter, "score_function", "relu", "score_function='relu'"),
    (ExpertChoiceRouter, "use_bias", "yes", "use_bias='yes'"),
    (DenseMoE, "gated", "no", "gated='no'"),
    (DenseMoE, "activation", 3, "activation=3"),
    (DenseMoE, "seed", "abc", "seed='abc'"),
    (SoftMoE, "num_experts", "4", "num_experts='4'"),
    (SoftMoE, "kernel_initializer", "nope", "kernel_initializer='nope'"),
    (TransformerBlock, "feed_forward", "dense", "feed_forward='dense'"),
    (TransformerBlock, "causal", "yes", "causal='yes'"),
    (TokenPooling, "index", "0", "index='0'"),
    # Out of range.
    (SparseMoE, "num_experts", 0, "num_experts=0"),
    (SparseMoE, "top_k", 5, "top_k=5"),
    (SparseMoE, "capacity_factor", -1.0, "capacity_factor=-1.0"),
    (SparseMoE, "eval_capacity_factor", 0.0, "eval_capacity_factor=0.0"),
    (SparseMoE, "min_capacity", 0, "min_capacity=0"),
    (SparseMoE, "group_size", 0, "group_size=0"),
    (SparseMoE, "expert_dropout", 1.0, "expert_dropout=1.0"),
    (SparseMoE, "z_loss_weight", float("nan"), "z_loss_weight=nan"),
    (SparseMoE, "load_balance_loss_weight", -0.1, "load_balance_loss_weight=-0.1"),
    (SparseMoE, "seed", -1, "seed=-1"),
    (TopKRouter, "top_k", 0, "top_k=0"),
    (TopKRouter, "jitter_noise", 1.5, "jitter_noise=1.5"),
    (TopKRouter, "logit_noise_std", -1.0, "logit_noise_std=-1.0"),
    (ExpertFFN, "dropout", -0.5, "dropout=-0.5"),
    (FeedForward, "intermediate_dim", -3, "intermediate_dim=-3"),
    (SparseMoE, "num_shared_experts", -1, "num_shared_experts=-1"),
    (SparseMoE, "shared_intermediate_dim", 0, "shared_intermediate_dim=0"),
    (SparseMoE, "shared_expert_gate", True, "num_shared_experts=0"),
    (SparseMoE, "priority", "batch_prioritized", "causal=True", {"causal": True}),
    (SparseMoE, "priority", "k_major", "priority='k_major'", {"router": "expert_choice"}),
    (SparseMoE, "causal", True, "causal=True", {"router": "expert_choice"}),
    (NoisyTopKRouter, "noise_std", 0, "noise_std=0"),
    (NoisyTopKRouter, "importance_loss_weight", -1.0, "importance_loss_weight=-1.0"),
    (NoisyTopKRouter, "load_loss_weight", float("nan"), "load_loss_weight=nan"),
    (BiasBalancedRouter, "bias_update_rate", -1.0, "bias_update_rate=-1.0"),
    (BiasBalancedRouter, "routed_scaling_factor", 0, "routed_scaling_factor=0"),
    (BiasBalancedRouter, "sequence_balance_loss_weight", -1.0, "sequence_balance_loss_weight=-1.0"),
    (ExpertChoiceRouter, "top_k", 5, "top_k=5"),
    (ExpertChoiceRouter, "jitter_noise", 1.0, "jitter_noise=1.0"),
    (DenseMoE, "router_jitter_noise", 1.5, "router_jitter_noise=1.5"),
    (DenseMoE, "expert_dropout", -0.1, "expert_dropout=-0.1"),
    (SoftMoE, "slots_per_expert", 0, "slots_per_expert=0"),
    (SoftMoE, "expert_dropout", 1.0, "expert_dropout=1.0"),
    (SoftMoE, "seed", -1, "seed=-1"),
    (TransformerBlock, "num_heads", 0, "num_heads=0"),
    (TransformerBlock, "key_dim", 0, "key_dim=0"),
    (TransformerBlock, "attention_dropout", -0.5, "attention_dropout=-0.5"),
    (TransformerBlock, "causal", True, "causal=False", {"feed_forward": keras.saving.serialize_keras_object(SparseMoE(4, 8))}),
    (PatchEmbedding, "patch_size", 0, "patch_size=0"),
    (PatchEmbedding, "model_dim", -1, "model_dim=-1"),
    (TokenPooling, "index", -1, "index=-1"),
]


def _name(index, layer, argument, value):
    return f"{index:02d}_{layer.__name__}_{argument}_{type(value).__name__}"


class FromConfigErrorTest(testing.TestCase):
    @parameterized.named_parameters(
        [(_name(i, *row[:3]), *row) for i, row in enumerate(MALFORMED)]
    )
    def test_malformed_argument(self, layer, argument, value, message, others=None):
        config = {**BASE_CONFIGS[layer], **(others or {}), argument: value}
        with self.assertRaisesRegex(ValueError, f"`?{argument}`?.*{message}|{message}"):
            layer.from_config(config)
        # The constructor refuses the same value with the same message.
        with self.assertRaisesRegex(ValueError, message):
            layer(**config)

    @parameterized.named_parameters(
        [(layer.__name__, layer) for layer in BASE_CONFIGS]
    )
    def test_missing_required_argument(self, layer):
        for argument in BASE_CONFIGS[layer]:
            if argument == "top_k":
                continue  # has a default
            config = dict(BASE_CONFIGS[layer])
            del config[argument]
            with self.assertRaisesRegex(
                ValueError, f"missing required argument `{argument}`"
            ):
                layer.from_config(config)

    @parameterized.named_parameters(
        [(layer.__name__, layer) for layer in BASE_CONFIGS]
    )
    def test_unknown_argument_and_non_dict_config(self, layer):
        with self.assertRaisesRegex(ValueError, "num_expert_typo"):
            layer.from_config({**BASE_CONFIGS[layer], "num_expert_typo": 3})
        with self.assertRaisesRegex(ValueError, "expected a dict"):
            layer.from_config([("num_experts", 4)])

    @parameterized.named_parameters(
        [(layer.__name__, layer) for layer in BASE_CONFIGS]
    )
    def test_valid_config_round_trips(self, layer):
        # The checks accept what get_config writes, and NumPy integers.
        config = layer(**BASE_CONFIGS[layer]).get_config()
        restored = layer.from_config(config)
        self.assertEqual(restored.get_config(), config)
        numpy_config = {
            key: (np.int64(value) if isinstance(value, int) and not isinstance(value, bool) else value)
            for key, value in BASE_CONFIGS[layer].items()
        }
        layer.from_config(numpy_config)

    def test_errors_surface_when_loading_a_keras_file(self):
        # A file whose SparseMoE config has top_k > num_experts: Keras wraps
        # the error while loading, the message still names the argument.
        import json
        import os
        import zipfile

        inputs = keras.Input((3, 4))
        model = keras.Model(inputs, SparseMoE(4, 8, name="moe")(inputs))
        path = os.path.join(self.get_temp_dir(), "model.keras")
        model.save(path)
        with zipfile.ZipFile(path) as archive:
            files = {name: archive.read(name) for name in archive.namelist()}
        config = json.loads(files["config.json"])
        for layer_config in config["config"]["layers"]:
            if layer_config["config"]["name"] == "moe":
                layer_config["config"]["top_k"] = 9
        files["config.json"] = json.dumps(config).encode()
        with zipfile.ZipFile(path, "w") as archive:
            for name, content in files.items():
                archive.writestr(name, content)
        with self.assertRaisesRegex(Exception, "top_k=9"):
            keras.saving.load_model(path, safe_mode=True)
