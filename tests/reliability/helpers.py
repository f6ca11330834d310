"""Models, gradients and checks shared by the reliability tests."""

import keras
import numpy as np
from keras import ops

from keras_moe import FeedForward
from tests.reliability.cases import MOE_CASES
from tests.reliability.cases import TOKEN_CHOICE
from tests.utils import to_numpy

SEQUENCE_LENGTH = 7
MODEL_DIM = 6
OUTPUT_DIM = 3
VOCABULARY_SIZE = 11


def zoo_model(cases=MOE_CASES, seed=0, **overrides):
    """One small model with an MoE layer of every case, in sequence.

    `(batch, SEQUENCE_LENGTH)` int32 tokens, 0 being padding, ->
    `(batch, SEQUENCE_LENGTH, OUTPUT_DIM)`: an `Embedding(mask_zero=True)`,
    so every MoE layer receives the padding mask, then per case a residual
    block `x + moe(x)` (layer name `"moe_<case name>"`) and a
    LayerNormalization, then a dense `FeedForward` and a Dense head.
    `overrides` go to every MoE layer (`dtype`, `z_loss_weight`, ...).

    One model for all cases keeps the tests fast (one compiled training
    step instead of one per case) while every message still names the layer.
    """
    inputs = keras.Input((SEQUENCE_LENGTH,), dtype="int32", name="tokens")
    hidden = keras.layers.Embedding(
        VOCABULARY_SIZE, MODEL_DIM, mask_zero=True, name="embed"
    )(inputs)
    for index, case in enumerate(cases):
        moe = case.make(seed=seed + index, name=f"moe_{case.name}", **overrides)
        hidden = keras.layers.Add(name=f"residual_{case.name}")(
            [hidden, moe(hidden)]
        )
        hidden = keras.layers.LayerNormalization(name=f"norm_{case.name}")(
            hidden
        )
    hidden = FeedForward(8, name="dense_block")(hidden)
    outputs = keras.layers.Dense(OUTPUT_DIM, name="head")(hidden)
    return keras.Model(inputs, outputs)


def zoo_data(num_samples=8, seed=0):
    """Tokens with padding (one row all padding but its first token) and a
    target that depends on the token, `(tokens, targets)`."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, VOCABULARY_SIZE, size=(num_samples, SEQUENCE_LENGTH))
    tokens[:, SEQUENCE_LENGTH - 2 :] = 0
    tokens[0, 1:] = 0
    table = rng.normal(size=(VOCABULARY_SIZE, OUTPUT_DIM))
    return tokens.astype("int32"), table[tokens].astype("float32")


def moe_layers_of(model):
    """The model's MoE layers (those with routing statistics), in order."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False)
        if hasattr(layer, "routing_statistics")
    ]


def variable_values(variables):
    """[(path, NumPy copy)] of `variables`, in order."""
    return [(v.path, np.array(ops.convert_to_numpy(v))) for v in variables]


def assert_all_finite(test, named_values):
    """Fails, naming the entry, if any value holds a NaN or an inf."""
    for name, value in named_values:
        value = np.asarray(value, dtype="float64")
        test.assertTrue(
            np.all(np.isfinite(value)),
            f"{name} is not finite: {value.ravel()[:8]}",
        )


def statistics_items(layer):
    """[(name, value)] of a layer's routing statistics."""
    return [
        (f"{layer.name}.{name}", value)
        for name, value in layer.routing_statistics().items()
    ]


def _to_numpy_tree(tree):
    return keras.tree.map_structure(
        lambda x: None if x is None else to_numpy(x), tree
    )


def run(layer, fn):
    """Runs `fn()` (a call or method of `layer`) as `fit` or `predict` would.

    Returns `(result, losses)` as NumPy, `losses` being the losses `fn`
    added (none for `route`); the layer's state updates (routing statistics,
    seed generators) are written back to its variables. On JAX, `fn` runs
    compiled by `jax.jit`: eager JAX compiles every operation on its own,
    seconds for each new shape. Elsewhere `fn` runs eagerly.
    """
    if not layer.built:
        # Variables created inside a JAX trace would leak tracers.
        raise ValueError(f"Build {layer.name} before running calls of it.")
    if keras.backend.backend() != "jax":
        before = list(layer.losses)
        result = fn()
        losses = [
            loss for loss in layer.losses if not any(loss is old for old in before)
        ]
        return _to_numpy_tree(result), [to_numpy(loss) for loss in losses]
    import jax

    variables = list(layer.variables)

    def pure(values):
        with keras.StatelessScope(
            state_mapping=list(zip(variables, values)), collect_losses=True
        ) as scope:
            result = fn()
        new_values = [scope.get_current_value(v) for v in variables]
        return result, list(scope.losses), new_values

    result, losses, new_values = jax.jit(pure)([v.value for v in variables])
    for variable, value in zip(variables, new_values):
        variable.assign(value)
    return _to_numpy_tree(result), [to_numpy(loss) for loss in losses]


def probe(layer, inputs, mask=None, routing=TOKEN_CHOICE, cotangent=None):
    """Everything the reliability checks read from one layer, in one go.

    Runs, in this order and as one compiled program on JAX (one compilation
    instead of four; eager elsewhere):
    1. an inference call, `"outputs"`;
    2. if `routing` (a case's `routing`) is not None: `route()` at
       inference, `"routing"`, and in training mode, `"training_routing"`
       (from the same state as step 4, so on JAX with the same noise
       draws);
    3. if the layer has `experts`: every expert applied to every token,
       `"every_expert"` `(E, T, d)` (see `outputs_from_route`); if it has
       `shared_experts`, their (gated) output at inference, `"shared"`
       `(..., d)`, padding not zeroed;
    4. a training call with gradients: `"training_outputs"`, `"losses"`
       (the terms it added) and `"gradients"` of
       `sum(outputs * cotangent) + sum(losses)` w.r.t.
       `layer.trainable_variables` (in that order, zeros where a variable
       gets none); `cotangent` defaults to a fixed random tensor so every
       output element counts. The call's state updates (routing
       statistics, seeds) are kept, as after any training step.

    Returns:
        A dict of NumPy values (lists for `"losses"` and `"gradients"`).
    """
    inputs = ops.convert_to_tensor(inputs)
    if not layer.built:
        layer.build(inputs.shape)
    if cotangent is None:
        cotangent = np.random.default_rng(0).normal(size=inputs.shape)
    cotangent = ops.convert_to_tensor(np.asarray(cotangent, "float32"))
    experts = getattr(layer, "experts", None)
    backend = keras.backend.backend()

    def objective(outputs, losses):
        value = ops.sum(ops.cast(outputs, "float32") * cotangent)
        for loss in losses:
            value = value + ops.cast(loss, "float32")
        return value

    def inference_part():
        result = {"outputs": layer(inputs, mask=mask)}
        if routing is not None:
            result["routing"] = layer.route(inputs, mask=mask)
            result["training_routing"] = layer.route(
                inputs, mask=mask, training=True
            )
        if experts is not None:
            flat = ops.reshape(inputs, (-1, inputs.shape[-1]))
            result["every_expert"] = experts(
                ops.broadcast_to(flat, (layer.num_experts,) + tuple(flat.shape))
            )
        shared_experts = getattr(layer, "shared_experts", None)
        if shared_experts is not None:
            cast = ops.cast(inputs, layer.compute_dtype)
            shared = shared_experts(cast)
            if layer.shared_gate is not None:
                shared = shared * ops.sigmoid(layer.shared_gate(cast))
            result["shared"] = shared
        return result

    if backend == "jax":
        import jax

        trainable = list(layer.trainable_variables)
        non_trainable = list(layer.non_trainable_variables)

        def pure(trainable_values, non_trainable_values):
            mapping = list(zip(trainable, trainable_values)) + list(
                zip(non_trainable, non_trainable_values)
            )
            # Read-only: whatever these calls would update is discarded.
            with keras.StatelessScope(state_mapping=mapping):
                result = inference_part()

            def scalar(values):
                outputs, updated, losses = layer.stateless_call(
                    values, non_trainable_values, inputs, mask=mask,
                    training=True, return_losses=True,
                )
                return objective(outputs, losses), (outputs, losses, updated)

            (_, (outputs, losses, updated)), grads = jax.value_and_grad(
                scalar, has_aux=True
            )(trainable_values)
            result.update(
                training_outputs=outputs, losses=losses, gradients=grads
            )
            return result, updated

        result, updated = jax.jit(pure)(
            [v.value for v in trainable], [v.value for v in non_trainable]
        )
        for variable, value in zip(non_trainable, updated):
            variable.assign(value)
    else:
        # Read-only part first: restore what it changes (seed states).
        before = [ops.convert_to_numpy(v) for v in layer.non_trainable_variables]
        result = inference_part()
        for variable, value in zip(layer.non_trainable_variables, before):
            variable.assign(value)
        if backend == "tensorflow":
            import tensorflow as tf

            with tf.GradientTape() as tape:
                outputs = layer(inputs, mask=mask, training=True)
                losses = list(layer.losses)
                value = objective(outputs, losses)
            grads = tape.gradient(value, layer.trainable_variables)
        elif backend == "torch":
            for variable in layer.trainable_variables:
                variable.value.grad = None
            outputs = layer(inputs, mask=mask, training=True)
            losses = list(layer.losses)
            objective(outputs, losses).backward()
            grads = [v.value.grad for v in layer.trainable_variables]
        else:
            raise NotImplementedError(backend)
        result.update(training_outputs=outputs, losses=losses, gradients=grads)
    result["gradients"] = [
        np.zeros(v.shape, "float32") if g is None else g
        for v, g in zip(layer.trainable_variables, result["gradients"])
    ]
    return _to_numpy_tree(result)


def outputs_from_route(tokens, routing, every_expert, shared=None, mask=None):
    """What an MoE layer should output, given its routing decisions.

    `expected[t] = sum_j kept[t, j] * weight[t, j] * expert_{index[t, j]}(x_t)`
    with every expert applied to every token by the layer's own `ExpertFFN`
    (`probe(...)["every_expert"]`, inference); with expert choice,
    `expected[t] = sum_e expert_weights[t, e] * expert_e(x_t)`. Plus the
    shared experts' output on valid tokens. Checks dispatch and combine for
    any router; the router's own maths is checked against
    `tests/reference.py`.

    Args:
        tokens: NumPy `(..., d)`.
        routing: NumPy dict from `route()`: `expert_index`,
            `combine_weights`, `kept`, each `(..., k)`, or (expert choice)
            `expert_weights` `(..., E)`.
        every_expert: NumPy `(E, T, d)`, expert e on token t.
        shared: optional NumPy `(..., d)`, `probe(...)["shared"]`.
        mask: optional bool `(...)`, false for padding.

    Returns:
        float64 NumPy `(..., d)`.
    """
    num_tokens = every_expert.shape[1]
    every_expert = np.asarray(every_expert, "float64")
    expected = np.zeros((num_tokens, every_expert.shape[-1]), "float64")
    if shared is not None:
        valid = np.ones(num_tokens, bool) if mask is None else mask.reshape(-1)
        expected += np.asarray(shared, "float64").reshape(num_tokens, -1) * valid[:, None]
    if "expert_weights" in routing:  # expert choice
        weights = routing["expert_weights"].reshape(num_tokens, -1)  # (T, E)
        expected += np.einsum("te,etd->td", weights, every_expert)
        return expected.reshape(tokens.shape)
    index = routing["expert_index"].reshape(num_tokens, -1)
    weights = routing["combine_weights"].reshape(num_tokens, -1)
    kept = routing["kept"].reshape(num_tokens, -1)
    for t in range(num_tokens):
        for j in range(index.shape[1]):
            if kept[t, j]:
                expected[t] += weights[t, j] * every_expert[index[t, j], t]
    return expected.reshape(tokens.shape)
