"""Argument checks shared by the layers; each error names the argument and value."""

import inspect
import numbers

import keras
import numpy as np


def check_positive_int(name, value, minimum=1):
    """Returns `value` as an `int`, or raises `ValueError` naming `name`.

    NumPy integers are accepted; booleans are refused although Python treats
    them as integers, because `num_experts=True` is always a mistake.
    """
    is_integer = isinstance(value, numbers.Integral) and not isinstance(
        value, bool
    )
    if not is_integer or value < minimum:
        expected = (
            "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        )
        raise ValueError(
            f"Received an invalid value for `{name}`, expected {expected}. "
            f"Received: {name}={value!r}"
        )
    return int(value)


def check_optional_positive_int(name, value):
    """Like `check_positive_int`, but `None` is allowed and returned."""
    if value is None:
        return None
    return check_positive_int(name, value)


def check_seed(seed):
    """Returns `seed` as a non-negative `int`, or raises `ValueError`."""
    return check_positive_int("seed", seed, minimum=0)


def check_optional_seed(seed):
    """Like `check_seed`, but `None` (unseeded) is allowed and returned."""
    return None if seed is None else check_seed(seed)


def check_bool(name, value):
    """Returns `value` as a `bool`, or raises ValueError naming `name`.

    Only Python and NumPy booleans are accepted: `bool("false")` is True,
    so a string (e.g. from a hand-edited config) would silently flip the
    option on.
    """
    if not isinstance(value, (bool, np.bool_)):
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a bool. "
            f"Received: {name}={value!r}"
        )
    return bool(value)


def check_non_negative_float(name, value):
    """Raises ValueError unless `value` is a real number >= 0."""
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not value >= 0
    ):
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a float >= 0. "
            f"Received: {name}={value!r}"
        )


def check_rate(name, value):
    """Raises ValueError unless `0 <= value < 1` (a dropout-style rate)."""
    check_non_negative_float(name, value)
    if value >= 1:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected "
            f"0 <= {name} < 1. Received: {name}={value!r}"
        )


def check_capacity_factor(name, value):
    """Raises ValueError unless `value` is None or a float > 0."""
    if value is None:
        return
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not value > 0
    ):
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a float > 0 "
            f"or None (no token dropped). Received: {name}={value!r}"
        )


def get_activation(activation):
    """`keras.activations.get` with an error that names the argument.

    The error keeps Keras' own reason, e.g. that `safe_mode` refused to
    deserialize a lambda.
    """
    try:
        return keras.activations.get(activation)
    except (ValueError, TypeError) as error:
        raise ValueError(
            "Received an invalid value for `activation`, expected the name of "
            "a Keras activation (e.g. 'gelu', 'relu', 'silu') or a callable. "
            f"Received: activation={activation!r}. Reason: {error}"
        ) from error


def get_initializer(name, value):
    """`keras.initializers.get` with an error that names the argument."""
    try:
        return keras.initializers.get(value)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected the name, "
            "config or instance of a Keras initializer (e.g. "
            f"'glorot_uniform'). Received: {name}={value!r}. Reason: {error}"
        ) from error


def get_regularizer(name, value):
    """`keras.regularizers.get` (None allowed), naming the argument on error."""
    try:
        return keras.regularizers.get(value)
    except (ValueError, TypeError) as error:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected None or the "
            "name, config or instance of a Keras regularizer (e.g. 'l2'). "
            f"Received: {name}={value!r}. Reason: {error}"
        ) from error


def check_config(cls, config):
    """Raises ValueError unless `config` is a dict with `cls`'s required args.

    Used by `from_config` (see `keras_moe.api_export`): without it a missing
    argument surfaces as a TypeError about `__init__`'s signature.
    """
    if not isinstance(config, dict):
        raise ValueError(
            f"{cls.__name__}.from_config expected a dict (the output of "
            f"get_config). Received: config={config!r}"
        )
    for parameter in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        required = parameter.default is inspect.Parameter.empty and (
            parameter.kind
            in (parameter.POSITIONAL_OR_KEYWORD, parameter.KEYWORD_ONLY)
        )
        if required and parameter.name not in config:
            raise ValueError(
                f"{cls.__name__}.from_config: missing required argument "
                f"`{parameter.name}`. Received: config with keys "
                f"{sorted(config)}"
            )
