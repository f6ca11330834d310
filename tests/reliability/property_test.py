"""Property-based tests: random shapes and configurations against the naive
reference (`tests/reference.py`), on the backend of the run.

Hypothesis draws the batch and sequence sizes, d_model, the number of
experts, k, the capacity factor (or None), min_capacity, the group size (or
None), the expert activation and gating, causal slot order, a padding mask
and the compute dtype. `derandomize=True` makes every run try the same
examples (reproducible CI); `max_examples` keeps each backend's run short.

The reference routes in float64. Examples whose router probabilities have a
near-tie among the top k + 1 are skipped (`assume`): there float32 and
float64 may rightly pick different experts.
"""

import keras
import numpy as np
from hypothesis import HealthCheck
from hypothesis import assume
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from keras import ops
from keras.src import testing

from keras_moe import SparseMoE
from keras_moe import TopKRouter
from tests.reference import expert_weights_of
from tests.reference import naive_moe
from tests.reference import naive_route
from tests.reliability import helpers
from tests.utils import to_numpy

# Output tolerance (absolute and relative to the largest reference output)
# per compute dtype: bfloat16 keeps 8 bits of mantissa in the experts.
TOLERANCE = {"float32": 2e-5, "bfloat16": 4e-2}
PROPERTY_SETTINGS = settings(
    max_examples=8,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@st.composite
def moe_problems(draw, dtype):
    num_experts = draw(st.integers(1, 5))
    batch = draw(st.integers(1, 3))
    sequence = draw(st.integers(1, 6))
    num_tokens = batch * sequence
    config = dict(
        num_experts=num_experts,
        intermediate_dim=draw(st.sampled_from([3, 8])),
        top_k=draw(st.integers(1, num_experts)),
        eval_capacity_factor=draw(
            st.one_of(st.none(), st.sampled_from([0.25, 0.5, 1.0, 1.5, 3.0]))
        ),
        min_capacity=draw(st.integers(1, 3)),
        group_size=draw(st.one_of(st.none(), st.integers(1, num_tokens + 2))),
        activation=draw(st.sampled_from(["gelu", "relu", "silu"])),
        gated=draw(st.booleans()),
        causal=draw(st.booleans()),
        dtype="float32" if dtype == "float32" else "mixed_bfloat16",
    )
    model_dim = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**16))
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(batch, sequence, model_dim)).astype("float32")
    mask = None
    if draw(st.booleans()):
        mask = rng.random((batch, sequence)) < 0.7
    return config, x, mask, seed


class PropertyTest(testing.TestCase):
    def check_against_reference(self, config, x, mask, seed):
        keras.utils.set_random_seed(seed)
        # Zero initializers, then random weights from NumPy: on JAX a random
        # initializer compiles anew for every new shape (a second per layer).
        layer = SparseMoE(
            **config,
            kernel_initializer="zeros",
            router=TopKRouter(
                config["num_experts"], config["top_k"], kernel_initializer="zeros"
            ),
        )
        layer.build(x.shape)
        rng = np.random.default_rng(seed)
        for variable in layer.trainable_weights:
            fan_in = variable.shape[-2] if len(variable.shape) > 1 else 4
            variable.assign(
                (rng.normal(size=variable.shape) / np.sqrt(fan_in)).astype("float32")
            )
        compute_dtype = layer.compute_dtype
        # The layer computes on inputs rounded to its compute dtype; so does
        # the reference.
        rounded = to_numpy(ops.cast(ops.cast(x, compute_dtype), "float32"))
        kernel = to_numpy(layer.router.kernel)
        _, probs, _, _ = naive_route(rounded.reshape(-1, x.shape[-1]), kernel, 1)
        top = -np.sort(-probs, axis=-1)[:, : config["top_k"] + 1]
        if top.shape[-1] > 1:
            assume(np.min(top[:, :-1] - top[:, 1:]) > 1e-4)

        (outputs, routing), _ = helpers.run(
            layer, lambda: (layer(x, mask=mask), layer.route(x, mask=mask))
        )
        expected, kept, index = naive_moe(
            rounded, kernel, expert_weights_of(layer),
            top_k=config["top_k"], capacity_factor=config["eval_capacity_factor"],
            min_capacity=config["min_capacity"], group_size=config["group_size"],
            mask=mask, activation=config["activation"], gated=config["gated"],
            priority="token_major" if config["causal"] else "k_major",
        )
        k = config["top_k"]
        np.testing.assert_array_equal(routing["expert_index"].reshape(-1, k), index)
        np.testing.assert_array_equal(routing["kept"].reshape(-1, k), kept)
        tolerance = TOLERANCE[compute_dtype]
        scale = max(1.0, float(np.abs(expected).max()))
        self.assertAllClose(
            np.asarray(outputs, "float64"), expected, atol=tolerance * scale, rtol=tolerance
        )
        if mask is not None:
            np.testing.assert_array_equal(np.asarray(outputs, "float64")[~mask], 0.0)

    @PROPERTY_SETTINGS
    @given(problem=moe_problems("float32"))
    def test_float32_matches_reference(self, problem):
        self.check_against_reference(*problem)

    @settings(PROPERTY_SETTINGS, max_examples=4)
    @given(problem=moe_problems("bfloat16"))
    def test_bfloat16_matches_reference(self, problem):
        self.check_against_reference(*problem)
