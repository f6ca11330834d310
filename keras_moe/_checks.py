"""Argument checks shared by the layers; each error names the argument and value."""

import numbers

import keras


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
