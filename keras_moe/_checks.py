"""Argument checks shared by the layers; each error names the argument and value."""

import keras


def check_positive_int(name, value):
    """Raises ValueError unless `value` is an int >= 1."""
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(
            f"Received an invalid value for `{name}`, expected a positive "
            f"integer. Received: {name}={value!r}"
        )


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
    """`keras.activations.get` with an error that names the argument."""
    try:
        return keras.activations.get(activation)
    except (ValueError, TypeError) as error:
        raise ValueError(
            "Received an invalid value for `activation`, expected the name of "
            "a Keras activation (e.g. 'gelu', 'relu', 'silu') or a callable. "
            f"Received: activation={activation!r}"
        ) from error
