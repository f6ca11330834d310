"""Export decorator: registers a class for `.keras` loading under `keras_moe>`."""

import keras


def keras_moe_export(cls):
    """Registers `cls` as serializable under the `keras_moe` package.

    Registered classes load from `.keras` files with `safe_mode=True` and
    without `custom_objects`.
    """
    return keras.saving.register_keras_serializable(package="keras_moe")(cls)
