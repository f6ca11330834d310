"""Test configuration shared by the whole suite.

The suite runs once per backend (`KERAS_BACKEND=jax|tensorflow|torch`).
Tests marked `multidevice` need 8 JAX devices and run in their own session
(`JAX_NUM_CPU_DEVICES=8 KERAS_BACKEND=jax python -m pytest -m multidevice`).
"""

import os

import keras
import pytest


def _num_jax_devices():
    if keras.backend.backend() != "jax":
        return 0
    import jax

    return jax.device_count()


def pytest_collection_modifyitems(config, items):
    devices = None
    for item in items:
        if "multidevice" not in item.keywords:
            continue
        if devices is None:
            devices = _num_jax_devices()
        if devices < 8:
            item.add_marker(
                pytest.mark.skip(
                    reason=(
                        "needs KERAS_BACKEND=jax and 8 devices; run with "
                        "JAX_NUM_CPU_DEVICES=8 -m multidevice"
                    )
                )
            )


@pytest.fixture(autouse=True)
def _reset_keras_state():
    """Each test starts from a clean Keras global state and seed."""
    keras.utils.clear_session(free_memory=False)
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(1337)
    yield


def pytest_report_header(config):
    return f"keras {keras.__version__}, backend {keras.backend.backend()}, KERAS_BACKEND={os.environ.get('KERAS_BACKEND')}"
