"""Helpers for tests: weights as NumPy, small models."""

import numpy as np


def to_numpy(x):
    from keras import ops

    return np.asarray(ops.convert_to_numpy(x))


def snapshot(layer):
    """{variable path: NumPy copy} of a layer's trainable weights."""
    return {v.path: np.array(v.numpy()) for v in layer.trainable_weights}
