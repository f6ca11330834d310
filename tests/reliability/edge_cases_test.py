"""Inputs at the edges: one expert wanted by all, one token, ragged groups,
nothing but padding, one expert, k = E, unknown dimensions.

Every check runs for every reliability case. Two oracles:
- `helpers.outputs_from_route`: the output must equal the sum, over the
  assignments `route()` reports as kept, of combine weight x that expert's
  output (dispatch and combine are right for whatever the router decided);
- the routing statistics of a training call must agree with the routing
  plan of that call (dropped assignments and expert loads counted from
  `route(training=True)`, so nothing is dropped silently).
"""

import math

import keras
import numpy as np
from absl.testing import parameterized
from keras.src import testing

from keras_moe import SparseMoE
from keras_moe import TopKRouter
from tests.reference import expert_weights_of
from tests.reference import naive_capacity
from tests.reference import naive_expert_choice_moe
from tests.reference import softmax
from tests.reliability import helpers
from tests.reliability.cases import MOE_CASES
from tests.reliability.cases import EXPERT_CHOICE
from tests.reliability.cases import NUM_EXPERTS
from tests.reliability.cases import TOKEN_CHOICE
from tests.reliability.cases import moe_case_parameters
from tests.utils import to_numpy

MODEL_DIM = helpers.MODEL_DIM
# Router noise and expert dropout change no shape or count, so the stochastic
# cases are left out here (compiling their random-number generation is the
# dearest part of a JAX test); the determinism, resume, portability and
# low-precision tests run them.
EDGE_CASES = [case for case in MOE_CASES if not case.stochastic]
# The unknown-dimension paths differ with the group size (None or a number),
# the capacity (a factor or None), the slot order (causal, k-major or batch
# prioritised) and the routing (token or expert choice).
UNKNOWN_DIMENSION_CASES = [
    case
    for case in MOE_CASES
    if case.name
    in (
        "top2_capacity", "swiglu_causal_normalized",
        "dropless_softmax_after_top_k", "expert_choice_shared_gated",
        "noisy_top_k_batch_prioritized",
    )
]


class EdgeCaseChecks(testing.TestCase):
    def check(self, layer, x, mask=None, routing=TOKEN_CHOICE):
        """Probes `layer` on `x` and checks what holds for every input.

        - everything (outputs, losses, gradients, statistics) is finite;
        - padding is never routed and outputs exact zeros;
        - with routing (`routing`, a case's `routing`, not None): the
          inference output agrees with the routing (`outputs_from_route`)
          and the statistics of the training call match its routing plan
          (`check_token_choice_plan`, `check_expert_choice_plan`).

        Returns:
            The `helpers.probe` dict, plus `"statistics"` of that one
            training call (routing layers).
        """
        if not layer.built:
            layer.build(x.shape)
        if routing is not None:
            layer.reset_routing_statistics()
        result = helpers.probe(layer, x, mask, routing=routing)
        outputs = result["outputs"]
        self.assertEqual(outputs.shape, x.shape)
        helpers.assert_all_finite(
            self,
            [("outputs", outputs), ("training outputs", result["training_outputs"])]
            + [(f"loss {i}", loss) for i, loss in enumerate(result["losses"])]
            + [
                (f"gradient of {v.path}", g)
                for v, g in zip(layer.trainable_variables, result["gradients"])
            ],
        )
        if mask is not None:
            np.testing.assert_array_equal(outputs[~mask], 0.0)
            np.testing.assert_array_equal(result["training_outputs"][~mask], 0.0)
        if routing is None:
            # Nothing routed: no losses to add.
            self.assertEqual(result["losses"], [])
            return result
        result["statistics"] = statistics = layer.routing_statistics()
        helpers.assert_all_finite(self, helpers.statistics_items(layer))
        self.assertEqual(statistics["steps"], 1.0)
        self.assertAllClose(
            outputs,
            helpers.outputs_from_route(
                x, result["routing"], result["every_expert"],
                shared=result.get("shared"), mask=mask,
            ),
            atol=1e-5,
        )
        valid = np.ones(x.shape[:-1], bool) if mask is None else mask
        if routing == EXPERT_CHOICE:
            self.check_expert_choice_plan(layer, result, valid)
        else:
            self.check_token_choice_plan(layer, result, valid)
        return result

    def check_token_choice_plan(self, layer, result, valid):
        """Padding not kept; statistics count the training call's plan."""
        for plan in (result["routing"], result["training_routing"]):
            self.assertFalse(plan["kept"][~valid].any())
        # The training call's statistics count what its plan did (the plan
        # is computed from the same state, so with the same noise).
        statistics = result["statistics"]
        plan = result["training_routing"]
        index = plan["expert_index"][valid]  # (valid tokens, k)
        assignments = index.size
        dropped = assignments - plan["kept"][valid].sum()
        self.assertAllClose(statistics["dropped_assignments"], dropped)
        self.assertAllClose(
            statistics["dropped_fraction"], dropped / max(assignments, 1)
        )
        load = np.bincount(index.ravel(), minlength=layer.num_experts)
        self.assertAllClose(
            statistics["expert_load"], load / max(assignments, 1), atol=1e-6
        )

    def check_expert_choice_plan(self, layer, result, valid):
        """The expert-choice plan: C distinct valid tokens per expert and
        group, no padding, weights where taken; statistics count the
        tokens no expert took and the slots each expert kept."""
        num_tokens = valid.size
        group = min(layer.group_size or num_tokens, num_tokens)
        flat_valid = np.concatenate(
            [valid.reshape(-1), np.zeros(-num_tokens % group, bool)]
        ).reshape(-1, group)  # (N, G), the last group padded

        def taken_by(plan):
            """bool (T, E): expert e took token t; checks the plan."""
            token_index, kept = plan["token_index"], plan["kept"]  # (N, E, C)
            num_groups, num_experts, capacity = token_index.shape
            self.assertEqual(num_groups, flat_valid.shape[0])
            taken = np.zeros((num_groups, group, num_experts), bool)
            for n in range(num_groups):
                for e in range(num_experts):
                    chosen = token_index[n, e][kept[n, e]]
                    self.assertEqual(len(set(chosen)), len(chosen))
                    self.assertTrue(flat_valid[n, chosen].all())
                    # Short of valid tokens only: an expert fills its C slots.
                    self.assertEqual(
                        len(chosen), min(capacity, flat_valid[n].sum())
                    )
                    taken[n, chosen, e] = True
            taken = taken.reshape(-1, num_experts)[:num_tokens]
            weights = plan["expert_weights"].reshape(-1, num_experts)
            np.testing.assert_array_equal(weights[~taken], 0.0)
            return taken

        taken_by(result["routing"])
        taken = taken_by(result["training_routing"])
        # The training call's statistics count what its plan did.
        statistics = result["statistics"]
        unrouted = np.sum(valid.reshape(-1) & ~taken.any(axis=-1))
        self.assertAllClose(statistics["dropped_assignments"], unrouted)
        self.assertAllClose(
            statistics["dropped_fraction"], unrouted / max(valid.sum(), 1)
        )
        load = taken.sum(axis=0)
        self.assertAllClose(
            statistics["expert_load"], load / max(load.sum(), 1), atol=1e-6
        )


class EdgeCaseTest(EdgeCaseChecks):
    @parameterized.named_parameters(moe_case_parameters(EDGE_CASES))
    def test_every_token_prefers_one_expert(self, case):
        # Positive tokens and a router kernel whose columns rank the experts
        # 0 > 1 > 2 > 3 for every token, by margins far above the router
        # noise: each group sends its whole load to experts 0..k-1.
        x = np.abs(np.random.default_rng(0).normal(size=(2, 7, MODEL_DIM)))
        x = (x + 0.5).astype("float32")
        if not case.has_router_kernel:
            self.skipTest(f"{case.name} has no router kernel to set")
        if not case.has_statistics:
            self.skipTest(f"{case.name} routes nothing: every expert sees every token")
        layer = case.make(seed=1)
        layer.build(x.shape)
        kernel = np.tile([8.0, 4.0, 0.0, -4.0], (MODEL_DIM, 1)).astype("float32")
        case.router_kernel(layer).assign(kernel)
        result = self.check(layer, x, routing=case.routing)
        statistics = result["statistics"]
        if case.routing == EXPERT_CHOICE:
            # Every expert still takes C tokens of each group (14 tokens in
            # groups of 5, 5 and 4: C = 3 everywhere): balanced whatever the
            # tokens prefer. The tokens no expert took are counted as the
            # reference's choices say.
            self.assertAllClose(statistics["expert_load"], np.full(NUM_EXPERTS, 0.25))
            self.assertAllClose(statistics["load_imbalance"], 1.0)
            group = layer.group_size
            capacity = naive_capacity(
                group, NUM_EXPERTS, case.top_k, layer.capacity_factor,
                layer.min_capacity,
            )
            _, taken = naive_expert_choice_moe(
                x, kernel, expert_weights_of(layer), capacity, group
            )
            unrouted = np.sum(~taken.any(axis=-1))
            self.assertAllClose(statistics["dropped_assignments"], unrouted)
            return
        k = case.top_k
        expected_load = np.zeros(NUM_EXPERTS)
        expected_load[:k] = 1.0 / k
        self.assertAllClose(statistics["expert_load"], expected_load, atol=1e-6)
        self.assertAllClose(statistics["load_imbalance"], NUM_EXPERTS / k)
        # Dropped = per group and wanted expert, tokens beyond the capacity.
        num_tokens = 14
        group = min(layer.group_size or num_tokens, num_tokens)
        capacity = naive_capacity(
            group, NUM_EXPERTS, k, layer.capacity_factor, layer.min_capacity
        )
        sizes = [min(group, num_tokens - s) for s in range(0, num_tokens, group)]
        dropped = sum(k * max(0, size - capacity) for size in sizes)
        self.assertAllClose(statistics["dropped_assignments"], dropped)
        if case.drops_tokens:
            self.assertGreater(dropped, 0)

    @parameterized.named_parameters(moe_case_parameters(EDGE_CASES))
    def test_batch_of_one_not_divisible_by_group_size(self, case):
        # One sequence of 5 tokens, the last one padding, in groups of 4:
        # the second group holds one real token and three pads, which must
        # take no capacity and count nowhere.
        x = np.random.default_rng(2).normal(size=(1, 5, MODEL_DIM))
        x = x.astype("float32")
        mask = np.array([[True, True, True, True, False]])
        layer = case.make(seed=1, group_size=4)
        self.check(layer, x, mask, routing=case.routing)

    @parameterized.named_parameters(moe_case_parameters(EDGE_CASES))
    def test_all_padding_batch(self, case):
        x = np.random.default_rng(3).normal(size=(2, 4, MODEL_DIM))
        x = x.astype("float32")
        mask = np.zeros((2, 4), bool)
        layer = case.make(seed=1)
        result = self.check(layer, x, mask, routing=case.routing)
        np.testing.assert_array_equal(result["outputs"], 0.0)
        np.testing.assert_array_equal(result["training_outputs"], 0.0)
        if not case.has_statistics:
            return
        # No valid token: the balancing terms and every statistic are 0.
        for loss in result["losses"]:
            self.assertEqual(float(loss), 0.0)
        for name, value in result["statistics"].items():
            if name != "steps":
                np.testing.assert_array_equal(value, 0.0, err_msg=name)


class ExpertCountTest(EdgeCaseChecks):
    @parameterized.named_parameters(
        ("softmax_then_top_k", {}),
        (
            "biased_softmax_after_top_k",
            {
                "softmax_after_top_k": True, "use_bias": True,
                "bias_initializer": "ones",
            },
        ),
    )
    def test_single_expert(self, router_kwargs):
        rng = np.random.default_rng(4)
        x = rng.normal(size=(2, 5, MODEL_DIM)).astype("float32")
        mask = np.ones((2, 5), bool)
        mask[1, 3:] = False
        layer = SparseMoE(
            num_experts=1, intermediate_dim=8, top_k=1, capacity_factor=1.0,
            eval_capacity_factor=0.5, min_capacity=1,
            router=TopKRouter(1, 1, **router_kwargs),
            load_balance_loss_weight=1.0, z_loss_weight=1.0,
        )
        result = self.check(layer, x, mask)
        routing, losses = result["routing"], result["losses"]
        statistics = result["statistics"]
        # Weight 1 for the only expert. At inference, capacity
        # ceil(0.5 * 10) = 5 of the 8 valid tokens.
        self.assertAllClose(routing["combine_weights"][mask], np.ones((8, 1)))
        self.assertEqual(int(routing["kept"].sum()), 5)
        # Training capacity ceil(1.0 * 10) = 10: nothing dropped. One
        # expert is perfectly balanced; the z-loss is the mean squared logit.
        self.assertEqual(statistics["dropped_assignments"], 0.0)
        self.assertAllClose(statistics["expert_load"], [1.0])
        self.assertAllClose(statistics["load_imbalance"], 1.0)
        self.assertAllClose(losses[0], 1.0)
        logits = x[mask] @ to_numpy(layer.router.kernel)
        if layer.router.bias is not None:
            logits = logits + to_numpy(layer.router.bias)
        self.assertAllClose(losses[1], np.mean(logits**2), rtol=1e-5)

    @parameterized.named_parameters(
        ("dropless", None, {}),
        ("capacity_half_normalized", 0.5, {"normalize_weights": True}),
    )
    def test_top_k_equals_num_experts(self, capacity_factor, router_kwargs):
        # k = E: every token goes to every expert, a dense softmax mixture
        # when nothing is dropped.
        rng = np.random.default_rng(5)
        x = rng.normal(size=(2, 6, MODEL_DIM)).astype("float32")
        layer = SparseMoE(
            num_experts=NUM_EXPERTS, intermediate_dim=8, top_k=NUM_EXPERTS,
            capacity_factor=capacity_factor,
            eval_capacity_factor=capacity_factor, min_capacity=1,
            router=TopKRouter(NUM_EXPERTS, NUM_EXPERTS, **router_kwargs),
        )
        result = self.check(layer, x)
        routing, statistics = result["routing"], result["statistics"]
        np.testing.assert_array_equal(
            np.sort(routing["expert_index"], axis=-1),
            np.broadcast_to(np.arange(NUM_EXPERTS), (2, 6, NUM_EXPERTS)),
        )
        # capacity = min(G, ceil(cf * G * k / E)) = ceil(cf * 12).
        capacity = 12 if capacity_factor is None else math.ceil(capacity_factor * 12)
        self.assertEqual(int(routing["kept"].sum()), NUM_EXPERTS * capacity)
        if capacity == 12:
            # Independent of route(): softmax of the logits in NumPy.
            probs = softmax(x.reshape(-1, MODEL_DIM) @ to_numpy(layer.router.kernel))
            dense = np.einsum("te,etd->td", probs, result["every_expert"])
            self.assertAllClose(result["outputs"], dense.reshape(x.shape), atol=1e-5)
        self.assertAllClose(statistics["expert_load"], np.full(NUM_EXPERTS, 0.25))
        self.assertAllClose(
            statistics["dropped_assignments"], NUM_EXPERTS * (12 - capacity)
        )


class UnknownDimensionsTest(EdgeCaseChecks):
    def test_none_batch_and_token_dimensions_in_a_functional_model(self):
        # (batch, height, width, d) with all three leading dimensions
        # unknown, through MoE layers of five cases. Predicting a second shape makes
        # TensorFlow retrace with unknown dimensions (token counts and
        # capacities become tensors); the result must match a direct call.
        inputs = keras.Input((None, None, MODEL_DIM))
        hidden = inputs
        for index, case in enumerate(UNKNOWN_DIMENSION_CASES):
            hidden = hidden + case.make(seed=index, name=f"moe_{case.name}")(hidden)
        model = keras.Model(inputs, hidden)
        self.assertEqual(tuple(model.output.shape), (None, None, None, MODEL_DIM))
        rng = np.random.default_rng(6)
        for shape in ((2, 3, 4), (1, 5, 1)):
            x = rng.normal(size=shape + (MODEL_DIM,)).astype("float32")
            predicted = model.predict(x, verbose=0)
            self.assertEqual(predicted.shape, x.shape)
        # The second shape ran on TensorFlow's retraced function, whose
        # dimensions are all unknown; compare with a direct call.
        direct, _ = helpers.run(model, lambda: model(x))
        self.assertAllClose(predicted, direct, atol=1e-5)
        # Training: Keras feeds TensorFlow batches of unknown size too.
        x = rng.normal(size=(4, 2, 3, MODEL_DIM)).astype("float32")
        model.compile(optimizer="adam", loss="mse")
        history = model.fit(x, x, batch_size=2, epochs=1, verbose=0)
        helpers.assert_all_finite(self, [("loss", history.history["loss"])])
        for layer in helpers.moe_layers_of(model):
            self.assertEqual(layer.routing_statistics()["steps"], 2.0)
            helpers.assert_all_finite(self, helpers.statistics_items(layer))
