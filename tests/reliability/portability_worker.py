"""Loads `.keras` files saved under another backend; records what they compute.

`portability_test.py` saves one model per reliability case under the backend
of the test run, then runs this module once in a fresh process for each other
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
from tests.reliability import helpers

BACKENDS = ("jax", "tensorflow", "torch")


def record(model, x):
    """What a model computes on `x`, as a dict of NumPy arrays.

    - `"predictions"`: the model's output on `x` at inference (eval
      capacity), from `predict`;
    - `"<moe layer>/expert_index"`, `"/combine_weights"`, `"/kept"`: the
      layer's `route()` on the input it receives in the model;
    - `"<moe layer>/statistic/<name>"`: its accumulated routing statistics
      (state saved in the file);
    - `"variable/<i>/<name>"`: every variable of the model.
    """
    moe_layers = [
        layer
        for layer in model._flatten_layers(include_self=False)
        if hasattr(layer, "routing_statistics")
    ]
    # One compiled predict for the model's output and each MoE layer's call
    # tensors: its input, then the padding mask Keras passes along, if any.
    call_tensors = [keras.tree.flatten(layer.input) for layer in moe_layers]
    probe = keras.Model(
        model.inputs, [model.output] + keras.tree.flatten(call_tensors)
    )
    predictions, *values = probe.predict(x, verbose=0)
    result = {"predictions": np.asarray(predictions)}
    for layer, tensors in zip(moe_layers, call_tensors):
        layer_input, *mask = values[: len(tensors)]
        values = values[len(tensors) :]
        mask = mask[0] if mask else None
        routing, _ = helpers.run(
            layer, lambda: layer.route(layer_input, mask=mask)
        )
        for key in ("expert_index", "combine_weights", "kept"):
            result[f"{layer.name}/{key}"] = routing[key]
        for name, value in layer.routing_statistics().items():
            result[f"{layer.name}/statistic/{name}"] = np.asarray(value)
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
