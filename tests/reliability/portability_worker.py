"""Loads `.keras` files saved under another backend; records what they compute.

`portability_test.py` saves its models (the zoo of every reliability case,
and small models of the `keras_moe.models` builders) under the backend of the
test run, then runs this module once in a fresh process for each other
backend:

    KERAS_BACKEND=torch python -m tests.reliability.portability_worker DIR

For every `DIR/<model>.keras` saved by another backend (inputs in
`DIR/<model>.inputs.npz`), the worker writes `DIR/<model>.<backend>.npz`
(see `record`) and re-saves the model it loaded as
`DIR/<model>.<backend>.keras`, so that the test process also loads a file this
backend wrote. One process per backend keeps the cost to one import of each
framework.
"""

import glob
import os
import sys

import keras
import numpy as np

import keras_moe  # noqa: F401  (registers the layers for loading)

BACKENDS = ("jax", "tensorflow", "torch")


def routed_layers(model):
    """`(node, moe)` for every layer of `model` that routes tokens.

    `node` is a layer of the functional graph whose `route(inputs, mask=)`
    gives routing decisions for its call's input: an MoE layer itself
    (`helpers.zoo_model`), or a `TransformerBlock` around one (the
    `keras_moe.models` builders); `moe` is the layer that holds the routing
    statistics.
    """
    result = []
    for layer in model.layers:
        if hasattr(layer, "routing_statistics"):
            result.append((layer, layer))
        elif getattr(layer, "is_moe", False):
            result.append((layer, layer.feed_forward))
    return result


# What `route()` returns, token choice or expert choice, that is compared.
TOKEN_CHOICE_KEYS = ("expert_index", "combine_weights", "kept")
EXPERT_CHOICE_KEYS = ("token_index", "combine_weights", "kept", "expert_weights")


class _Routing(keras.layers.Layer):
    """Outputs a routed node's `route()` decisions, so that one `predict`
    computes them (with the padding mask Keras passes along) together with
    the model's output."""

    def __init__(self, node, moe, **kwargs):
        super().__init__(**kwargs)
        self.node = node
        self.expert_choice = getattr(moe, "routing_type", None) == "expert_choice"
        self.keys = EXPERT_CHOICE_KEYS if self.expert_choice else TOKEN_CHOICE_KEYS
        self.top_k = moe.top_k
        self.num_experts = moe.num_experts
        self.supports_masking = True

    def call(self, inputs, mask=None):
        routing = self.node.route(inputs, mask=mask)
        return [
            keras.ops.cast(routing[key], "int32" if key != "combine_weights" and key != "expert_weights" else "float32")
            for key in self.keys
        ]

    def compute_output_spec(self, inputs, mask=None):
        token_shape = tuple(inputs.shape[:-1])
        if self.expert_choice:
            # Plans (N, E, C): N groups and C slots depend on the batch.
            plan = (None, self.num_experts, None)
            shapes = [plan, plan, plan, token_shape + (self.num_experts,)]
        else:
            shapes = [token_shape + (self.top_k,)] * 3
        return [
            keras.KerasTensor(shape, dtype="int32" if key not in ("combine_weights", "expert_weights") else "float32")
            for shape, key in zip(shapes, self.keys)
        ]

    def compute_mask(self, inputs, mask=None):
        return None


def record(model, x):
    """What a model computes on `x`, as a dict of NumPy arrays.

    - `"predictions"`: the model's output on `x` at inference (eval
      capacity);
    - `"<moe layer>/<key>"`: its `route()` decisions (`TOKEN_CHOICE_KEYS`
      or `EXPERT_CHOICE_KEYS`) on the input the layer (or its
      `TransformerBlock`) receives in the model, with its padding mask;
    - `"<moe layer>/statistic/<name>"`: its accumulated routing statistics
      (state saved in the file);
    - `"variable/<i>/<name>"`: every variable of the model.

    Predictions and decisions come from one compiled `predict` over the
    whole batch (expert-choice plans are per routing group, not per
    example).
    """
    routed = routed_layers(model)
    outputs = [model.output]
    for node, moe in routed:
        node_inputs = keras.tree.flatten(node.input)
        mask = node_inputs[1] if len(node_inputs) > 1 else None
        outputs += _Routing(node, moe)(node_inputs[0], mask=mask)
    probe = keras.Model(model.inputs, outputs)
    predictions, *values = probe.predict(x, batch_size=len(x), verbose=0)
    result = {"predictions": np.asarray(predictions)}
    for node, moe in routed:
        keys = EXPERT_CHOICE_KEYS if getattr(moe, "routing_type", None) == "expert_choice" else TOKEN_CHOICE_KEYS
        for key in keys:
            value = values.pop(0)
            result[f"{moe.name}/{key}"] = value.astype(bool) if key == "kept" else value
        for name, value in moe.routing_statistics().items():
            result[f"{moe.name}/statistic/{name}"] = np.asarray(value)
    for index, variable in enumerate(model.variables):
        # By position and name: paths hold layer names that Keras numbers
        # per process (seed generators), and a router passed to a SparseMoE
        # is created outside the layer's name scope but restored inside it.
        result[f"variable/{index}/{variable.name}"] = np.asarray(
            keras.ops.convert_to_numpy(variable)
        )
    return result


def main(directory):
    backend = keras.backend.backend()
    for path in sorted(glob.glob(os.path.join(directory, "*.keras"))):
        stem = os.path.basename(path)[: -len(".keras")]
        if "." in stem:  # a re-saved file, `<model>.<backend>.keras`
            continue
        x = np.load(os.path.join(directory, f"{stem}.inputs.npz"))["x"]
        model = keras.saving.load_model(path, safe_mode=True)
        np.savez(os.path.join(directory, f"{stem}.{backend}.npz"), **record(model, x))
        model.save(os.path.join(directory, f"{stem}.{backend}.keras"))


if __name__ == "__main__":
    main(sys.argv[1])
