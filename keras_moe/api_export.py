"""Export decorator: registers a class for `.keras` loading under `keras_moe>`."""

import functools

import keras

from keras_moe._checks import check_config


def keras_moe_export(cls):
    """Registers `cls` as serializable under the `keras_moe` package.

    Registered classes load from `.keras` files with `safe_mode=True` and
    without `custom_objects`. Their `from_config` also refuses malformed
    configs with a `ValueError` naming the argument: a missing required
    argument, or any ValueError the constructor raises, which Keras' base
    `from_config` would otherwise turn into a generic TypeError.
    """
    original = cls.from_config.__func__
    if not getattr(original, "_keras_moe_checked", False):

        @functools.wraps(original)
        def from_config(klass, config):
            check_config(klass, config)
            try:
                return original(klass, config)
            except TypeError as error:
                # Keras' `Operation.from_config` re-raises whatever the
                # constructor raised as a TypeError; give back the ValueError.
                cause = error.__cause__ or error.__context__
                if isinstance(cause, ValueError):
                    raise ValueError(
                        f"{klass.__name__}.from_config: {cause}"
                    ) from error
                raise

        from_config._keras_moe_checked = True
        cls.from_config = classmethod(from_config)
    return keras.saving.register_keras_serializable(package="keras_moe")(cls)
