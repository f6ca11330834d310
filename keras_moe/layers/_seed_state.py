"""Seed-generator states saved with a layer's variables.

Keras saves a layer's trainable and non-trainable variables, but not the
state of its `SeedGenerator`s. A model restored from a checkpoint
(`BackupAndRestore`, `load_weights`, a `.keras` file) therefore restarts its
random streams: a resumed training run draws again the router noise and the
expert-dropout masks of its first steps, and drifts from the run it
continues. Layers with this mixin save those states after their variables,
under keys of their own; files saved without them still load (the seeds then
keep their initial state).
"""

import numpy as np
from keras import ops

_KEY_PREFIX = "seed_generator_state_"


class SavesSeedStates:
    """Mixin for a Keras layer: also saves `_saved_seed_generators()`' states.

    Put it before `keras.layers.Layer` in the bases and return, from
    `_saved_seed_generators`, the generators whose state the layer's own
    variables do not hold (its own and those of variable-free sublayers
    such as `keras.layers.Dropout`), in a fixed order.
    """

    def _saved_seed_generators(self):
        return []

    def save_own_variables(self, store):
        super().save_own_variables(store)
        for index, generator in enumerate(self._saved_seed_generators()):
            store[f"{_KEY_PREFIX}{index}"] = generator.state

    def load_own_variables(self, store):
        keys = list(store.keys())
        super().load_own_variables(
            {key: store[key] for key in keys if not key.startswith(_KEY_PREFIX)}
        )
        for index, generator in enumerate(self._saved_seed_generators()):
            key = f"{_KEY_PREFIX}{index}"
            if key in keys:
                # The state's integer dtype differs between backends.
                generator.state.assign(
                    ops.cast(np.asarray(store[key]), generator.state.dtype)
                )
