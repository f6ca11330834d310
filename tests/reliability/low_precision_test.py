"""Mixed precision, huge router logits and the z-loss: nothing overflows.

The routers compute in float32 whatever the policy; the experts and the
combine run in the policy's compute dtype (bfloat16 or float16, whose largest
value is 65504). These tests train under both mixed policies, drive router
logits to magnitude 1e4 by hand, and check that the router z-loss holds the
logits down where plain training lets them grow.
"""

import keras
import numpy as np
from absl.testing import parameterized
from keras import ops
from keras.src import testing

from keras_moe import SparseMoE
from keras_moe import TopKRouter
from tests.reference import softmax
from tests.reliability import helpers
from tests.reliability.cases import EXPERT_CHOICE
from tests.reliability.cases import MOE_CASES
from tests.reliability.cases import moe_case_parameters
from tests.utils import to_numpy

# The cases trained under both policies: gated SiLU experts (products of
# two projections, the first to overflow float16) with a biased,
# renormalising router; softmax over the k selected logits, dropless. Two
# MoE layers keep the compiled training step small; the huge-logit test
# below runs every case.
MIXED_PRECISION_CASES = [
    case
    for case in MOE_CASES
    if case.name in ("swiglu_causal_normalized", "dropless_softmax_after_top_k")
]
POLICIES = [("mixed_bfloat16", "mixed_bfloat16"), ("mixed_float16", "mixed_float16")]


def router_inputs(model, tokens):
    """{MoE layer: (its input as float32 NumPy, its mask or None)}."""
    layers = helpers.moe_layers_of(model)
    call_tensors = [keras.tree.flatten(layer.input) for layer in layers]
    probe = keras.Model(model.inputs, keras.tree.flatten(call_tensors))
    values = list(probe.predict(tokens, verbose=0))
    result = {}
    for layer, tensors in zip(layers, call_tensors):
        layer_input, *mask = values[: len(tensors)]
        values = values[len(tensors) :]
        result[layer] = (np.asarray(layer_input, "float32"), mask[0] if mask else None)
    return result


class MixedPrecisionTrainingTest(testing.TestCase):
    @parameterized.named_parameters(POLICIES)
    def test_training_stays_finite_and_learns(self, policy):
        keras.config.set_dtype_policy(policy)
        tokens, targets = helpers.zoo_data(num_samples=16, seed=3)
        model = helpers.zoo_model(cases=MIXED_PRECISION_CASES, seed=1)
        model.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        history = model.fit(
            tokens, targets, batch_size=4, epochs=3, verbose=0, shuffle=False
        )
        losses = history.history["loss"]
        helpers.assert_all_finite(self, [("loss history", losses)])
        self.assertLess(losses[-1], losses[0])
        # Every weight, optimizer slot (and the float16 loss scale) and
        # routing statistic.
        helpers.assert_all_finite(
            self, helpers.variable_values(model.variables + model.optimizer.variables)
        )
        for layer, (layer_input, _) in router_inputs(model, tokens).items():
            self.assertEqual(layer.compute_dtype, policy.split("_")[1])
            logits = to_numpy(layer.router.compute_logits(layer_input))
            self.assertEqual(logits.dtype, np.float32)
            helpers.assert_all_finite(self, [(f"{layer.name} router logits", logits)])
            helpers.assert_all_finite(self, helpers.statistics_items(layer))
            self.assertEqual(layer.routing_statistics()["steps"], 12.0)


class RouterPrecisionTest(testing.TestCase):
    @parameterized.named_parameters(POLICIES)
    def test_router_reads_float32_weights_outside_the_layer_call(self, policy):
        # A TopKRouter called on its own, or through SparseMoE.route (which
        # is not a layer call), must compute with its float32 kernel and
        # bias, exactly as inside SparseMoE's call, not with copies rounded
        # to the policy's compute dtype.
        keras.config.set_dtype_policy(policy)
        rng = np.random.default_rng(5)
        x = rng.normal(size=(5, 6)).astype("float32")
        kernel = (rng.normal(size=(6, 4)) * 3.14159).astype("float32")
        bias = rng.normal(size=(4,)).astype("float32")

        def router():
            layer = TopKRouter(4, 2, use_bias=True)
            layer.build((None, 6))
            layer.kernel.assign(kernel)
            layer.bias.assign(bias)
            return layer

        logits = to_numpy(router()(x)["router_logits"])
        self.assertAllClose(logits, x.astype("float64") @ kernel + bias, atol=1e-5)

        moe = SparseMoE(4, 8, router=router())
        moe.build((1, 5, 6))
        probs = to_numpy(moe.route(x[None])["router_probs"])[0]
        # The layer sees its inputs in its compute dtype.
        rounded = to_numpy(ops.cast(ops.cast(x, moe.compute_dtype), "float32"))
        expected = softmax(rounded.astype("float64") @ kernel + bias)
        self.assertAllClose(probs, expected, atol=1e-6)


class HugeRouterLogitsTest(testing.TestCase):
    @parameterized.named_parameters(moe_case_parameters())
    def test_logits_of_magnitude_1e4_give_no_nan_or_inf(self, case):
        # Under mixed_float16, the narrowest policy: the router is float32,
        # the experts and the combine float16.
        if not case.has_router_kernel:
            self.skipTest(f"{case.name} has no router kernel to set")
        keras.config.set_dtype_policy("mixed_float16")
        rng = np.random.default_rng(4)
        x = rng.normal(size=(2, 7, 6)).astype("float32")
        mask = np.ones((2, 7), bool)
        mask[1, 5:] = False
        layer = case.make(
            seed=2, z_loss_weight=1e-3, load_balance_loss_weight=1e-2
        )
        layer.build(x.shape)
        kernel = case.router_kernel(layer)
        kernel.assign(rng.normal(size=kernel.shape).astype("float32") * 1e4)
        # The premise: logits `x @ kernel` of magnitude 1e4 and more.
        self.assertGreater(np.abs(x @ to_numpy(kernel)).max(), 1e4)

        result = helpers.probe(layer, x, mask, routing=case.routing)
        outputs, training_outputs = result["outputs"], result["training_outputs"]
        losses, grads = result["losses"], result["gradients"]
        helpers.assert_all_finite(
            self,
            [("outputs", outputs), ("training outputs", training_outputs)]
            + [(f"loss {i}", loss) for i, loss in enumerate(losses)]
            + [
                (f"gradient of {v.path}", g)
                for v, g in zip(layer.trainable_variables, grads)
            ]
            + (helpers.statistics_items(layer) if case.has_statistics else []),
        )
        if not case.has_statistics:
            return
        # The Switch loss, the z-loss, then the router's own losses.
        router_losses = layer.router.balancing_loss_weights.values()
        self.assertLen(losses, 2 + sum(weight > 0 for weight in router_losses))
        # The z-loss term sees the huge logits: logsumexp^2 ~ 1e8 or more,
        # times its weight 1e-3.
        self.assertGreater(float(losses[1]), 1e4)
        routing = result["routing"]
        helpers.assert_all_finite(
            self,
            [(f"routing {key}", value) for key, value in routing.items()],
        )
        if case.has_route and case.saturates:
            # Saturated softmax: the first choice takes all the weight.
            weights = routing["combine_weights"][mask]
            first = weights[:, 0] / weights.sum(axis=-1)
            self.assertAllClose(first, np.ones_like(first), atol=1e-3)
        elif case.routing == EXPERT_CHOICE:
            # Saturated softmax: each token's probability is 1 for its top
            # expert, 0 elsewhere (up to float32), whatever the expert took.
            weights = routing["expert_weights"][mask]
            self.assertTrue(np.all((weights >= 0) & (weights <= 1)))
            self.assertAllClose(
                np.max(routing["router_probs"][mask], axis=-1),
                np.ones(int(mask.sum())), atol=1e-3,
            )


class ZLossTest(testing.TestCase):
    def test_z_loss_keeps_router_logits_bounded(self):
        # A target that rewards confident top-1 routing on the sign of the
        # first feature: without the z-loss the router's logits grow during
        # training; with it they stay below where they started.
        rng = np.random.default_rng(0)
        x = rng.normal(size=(32, 7, 6)).astype("float32")
        y = np.where(x[..., :1] > 0, 3.0 * x, -2.0 * x).astype("float32")

        def max_logit_after_training(z_loss_weight):
            keras.utils.set_random_seed(0)
            moe = SparseMoE(
                4, 8, top_k=1, capacity_factor=None, z_loss_weight=z_loss_weight,
                load_balance_loss_weight=0.0,
            )
            inputs = keras.Input((7, 6))
            model = keras.Model(inputs, moe(inputs))
            start = np.abs(to_numpy(moe.router.compute_logits(x))).max()
            model.compile(optimizer=keras.optimizers.Adam(0.05), loss="mse")
            model.fit(x, y, batch_size=8, epochs=10, verbose=0, shuffle=False)
            end = np.abs(to_numpy(moe.router.compute_logits(x))).max()
            return start, end

        start, without_z_loss = max_logit_after_training(0.0)
        same_start, with_z_loss = max_logit_after_training(0.1)
        self.assertAllClose(start, same_start)
        self.assertGreater(without_z_loss, 1.5 * start)
        self.assertLess(with_z_loss, start)
        self.assertLess(with_z_loss, 0.6 * without_z_loss)
