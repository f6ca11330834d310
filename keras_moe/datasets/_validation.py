"""Argument checks shared by the dataset loaders."""

import numbers


def check_positive_int(name, value, minimum=1):
    """Returns `value` as an `int`, or raises `ValueError` naming `name`.

    Booleans are refused although Python treats them as integers, because
    `num_train=True` is always a mistake.
    """
    is_integer = isinstance(value, numbers.Integral) and not isinstance(
        value, bool
    )
    if not is_integer or value < minimum:
        if minimum == 1:
            expected = "a positive integer"
        else:
            expected = f"an integer >= {minimum}"
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
