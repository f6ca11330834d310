"""SparseMoE: a drop-in sparse replacement for a dense feed-forward block."""

import keras
import numpy as np
from keras import ops

from keras_moe import losses
from keras_moe import routing
from keras_moe.distribution import _check_built_layer
from keras_moe.distribution import _constrain
from keras_moe._checks import check_bool
from keras_moe._checks import check_capacity_factor
from keras_moe._checks import check_non_negative_float
from keras_moe._checks import check_optional_seed
from keras_moe._checks import check_positive_int
from keras_moe._checks import check_rate
from keras_moe.api_export import keras_moe_export
from keras_moe.layers.expert_ffn import ExpertFFN
from keras_moe.layers.top_k_router import TopKRouter

# Routing statistics the layer accumulates during training, in the order the
# state variables are created. `expert_load` is a vector of E fractions.
STATISTICS = (
    "balance_loss",
    "z_loss",
    "dropped_fraction",
    "dropped_assignments",
    "load_imbalance",
    "expert_load",
)

def _has_symbolic_dimension(shape):
    """True for JAX shape-polymorphic dimensions (neither int nor tensor).

    Keras infers the output shape of a layer without `compute_output_shape`
    by tracing its `call` under `jax.eval_shape` with a symbolic batch size.
    When such an outer layer contains a SparseMoE, the token count here is a
    symbolic expression on which capacities cannot be computed.
    """
    return any(
        not isinstance(dim, int) and not ops.is_tensor(dim) for dim in shape
    )


def _ceil_div(a, b):
    if routing.is_static(a, b):
        return -(-a // b)
    return (a + b - 1) // b

@keras_moe_export
class SparseMoE(keras.layers.Layer):
    """Sparse Mixture-of-Experts feed-forward block.

    Replaces a dense feed-forward block `(batch, ..., d_model) ->
    (batch, ..., d_model)` by `num_experts` expert networks of which each
    token uses only `top_k`. Compute per token is that of `top_k` experts
    (plus a small router); parameters grow with `num_experts`.

    How a call works:
    1. Tokens are flattened to `(T, d)` and split into routing groups of
       `group_size` tokens `(N, G, d)` (the last group padded with masked
       tokens). Capacity is per group, so its shape is static.
    2. The router (float32) picks `top_k` experts and combine weights for
       every token.
    3. Each assignment gets a slot in its expert's buffer: first choices of
       all tokens before second choices, then token order (`causal=True`:
       token order first). An expert takes at most
       `capacity = max(min_capacity, ceil(capacity_factor * G * top_k / E))`
       assignments per group (never more than G); the rest are dropped and
       contribute 0, so the residual connection around the block carries
       those tokens unchanged. `capacity_factor=None` drops nothing.
    4. Tokens are gathered into expert buffers `(E, N * C, d)` by index,
       the experts run as one batched matmul per projection, and outputs are
       gathered back and summed with the combine weights. No tensor of shape
       `(tokens, experts, capacity)` is built and no expert sees a token that
       was not routed to it.
    5. With a `keras.distribution` active (JAX), the groups are split over
       the data devices and the expert buffers over the `"expert"` mesh
       axis, so tokens reach their experts by all-to-all
       (`keras_moe.distribution`). Without one, nothing changes.

    Balancing, in training only, through `add_loss` (so it reaches
    `model.fit`'s loss in any model type, also when nested):
    - `load_balance_loss_weight * E * sum_i f_i P_i` (Switch), with `f_i` the
      fraction of all k assignments of valid tokens that chose expert i and
      `P_i` the mean router probability of expert i (1.0 when balanced);
    - `z_loss_weight * mean_t logsumexp(logits_t)^2` (ST-MoE router z-loss).

    Routing statistics: every training call adds this step's values to
    non-trainable state variables (updated correctly under JAX's jit as well
    as on TensorFlow and PyTorch): the unweighted balancing loss and z-loss,
    the fraction and the number of assignments dropped at capacity, the load
    imbalance (max expert load / mean expert load, 1.0 when balanced) and the
    fraction of assignments per expert. `routing_statistics()` returns their
    means since the last `reset_routing_statistics()`;
    `keras_moe.callbacks.RoutingMonitor` puts them in `model.fit`'s logs.

    Args:
        num_experts: int, number of experts E.
        intermediate_dim: int, hidden width of each expert.
        top_k: int, experts per token, `1 <= top_k <= num_experts`.
        capacity_factor: float > 0 or None, capacity factor in training.
            None drops no token.
        eval_capacity_factor: float > 0 or None, capacity factor at
            inference (default 2.0, as in Switch Transformer).
        min_capacity: int >= 1, lower bound on the per-group capacity.
        group_size: int >= 1 or None, tokens per routing group. None routes
            all tokens of a call as one group. Under a `keras.distribution`
            (expert parallelism, see `keras_moe.distribution`) the number of
            groups must divide over the devices: use the sequence length
            (one group per sequence) or a divisor of it.
        activation: expert activation name or callable (default `"gelu"`).
        gated: bool, gated experts: `activation="silu", gated=True` is
            SwiGLU (Mixtral, Qwen-MoE); `"gelu"` gives GeGLU.
        use_bias: bool, biases in the experts.
        expert_dropout: float in [0, 1), dropout inside the experts.
        router: None (a `TopKRouter(num_experts, top_k)`), or a router layer
            with matching `num_experts` and `top_k` (e.g. a `TopKRouter`
            with `normalize_weights=True` for Mixtral-style weights).
        load_balance_loss_weight: float >= 0, 0 turns the loss off.
        z_loss_weight: float >= 0, 0 turns the loss off.
        causal: bool, the layer sits in an autoregressive model: capacity
            slots are filled in token order so that no token's routing
            depends on later tokens, and routers that compare tokens across
            the group are refused.
        kernel_initializer: initializer of the expert kernels (with
            per-expert fans).
        bias_initializer: initializer of the expert biases.
        kernel_regularizer: optional regularizer of the expert kernels.
        bias_regularizer: optional regularizer of the expert biases.
        seed: optional int seed for dropout and router noise.
        **kwargs: base `Layer` arguments.

    Call arguments:
        inputs: `(batch, ..., d_model)` tokens.
        mask: optional bool `(batch, ...)`, false for padding: padded tokens
            are not routed, take no capacity, output zeros, and do not count
            in the losses or statistics. Keras masks (e.g. from
            `Embedding(mask_zero=True)`) are used automatically.
        training: bool.

    Returns:
        `(batch, ..., d_model)`, in the layer's compute dtype.

    Example:

    >>> moe = SparseMoE(num_experts=8, intermediate_dim=64, top_k=2)
    >>> moe(np.ones((2, 16, 32), "float32")).shape
    (2, 16, 32)

    References:
        - Shazeer et al., 2017, "Outrageously Large Neural Networks".
        - Lepikhin et al., 2020, "GShard".
        - Fedus et al., 2021, "Switch Transformers".
        - Zoph et al., 2022, "ST-MoE".
    """

    def __init__(
        self,
        num_experts,
        intermediate_dim,
        top_k=2,
        capacity_factor=1.25,
        eval_capacity_factor=2.0,
        min_capacity=4,
        group_size=None,
        activation="gelu",
        gated=False,
        use_bias=True,
        expert_dropout=0.0,
        router=None,
        load_balance_loss_weight=1e-2,
        z_loss_weight=1e-3,
        causal=False,
        kernel_initializer="glorot_uniform",
        bias_initializer="zeros",
        kernel_regularizer=None,
        bias_regularizer=None,
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_positive_int("num_experts", num_experts)
        check_positive_int("intermediate_dim", intermediate_dim)
        check_positive_int("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(
                "Received an invalid value for `top_k`, expected "
                f"1 <= top_k <= num_experts={num_experts}. Received: "
                f"top_k={top_k}"
            )
        check_capacity_factor("capacity_factor", capacity_factor)
        check_capacity_factor("eval_capacity_factor", eval_capacity_factor)
        check_positive_int("min_capacity", min_capacity)
        if group_size is not None:
            check_positive_int("group_size", group_size)
        check_rate("expert_dropout", expert_dropout)
        check_non_negative_float(
            "load_balance_loss_weight", load_balance_loss_weight
        )
        check_non_negative_float("z_loss_weight", z_loss_weight)
        causal = check_bool("causal", causal)
        seed = check_optional_seed(seed)
        self.num_experts = num_experts
        self.intermediate_dim = intermediate_dim
        self.top_k = top_k
        self.capacity_factor = capacity_factor
        self.eval_capacity_factor = eval_capacity_factor
        self.min_capacity = min_capacity
        self.group_size = group_size
        self.expert_dropout = float(expert_dropout)
        self.load_balance_loss_weight = float(load_balance_loss_weight)
        self.z_loss_weight = float(z_loss_weight)
        self.causal = causal
        self.seed = seed
        self.supports_masking = True

        # === Layers ===
        self.router = self._make_router(router)
        self._custom_router = router is not None
        self.experts = ExpertFFN(
            num_experts=num_experts,
            intermediate_dim=intermediate_dim,
            activation=activation,
            gated=gated,
            use_bias=use_bias,
            dropout=expert_dropout,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
            seed=seed,
            dtype=self.dtype_policy,
            name="experts",
        )

    def _make_router(self, router):
        if router is None:
            return TopKRouter(
                num_experts=self.num_experts,
                top_k=self.top_k,
                seed=self.seed,
                dtype=self.dtype_policy,
                name="router",
            )
        if isinstance(router, dict):
            try:
                router = keras.saving.deserialize_keras_object(router)
            except (TypeError, ValueError) as error:
                # E.g. an unknown class, or a lambda refused by safe_mode.
                raise ValueError(
                    "Received an invalid value for `router`: its config could "
                    f"not be deserialized. Received: router={router!r}. "
                    f"Reason: {error}"
                ) from error
        if not isinstance(router, keras.layers.Layer):
            raise ValueError(
                "Received an invalid value for `router`, expected None or a "
                f"router layer such as `keras_moe.TopKRouter`. Received: "
                f"router={router!r}"
            )
        for name in ("num_experts", "top_k"):
            if getattr(router, name, None) != getattr(self, name):
                raise ValueError(
                    f"The router's `{name}` must match the layer's. Received: "
                    f"{name}={getattr(self, name)} and router.{name}="
                    f"{getattr(router, name, None)}"
                )
        if self.causal and getattr(router, "compares_tokens", False):
            raise ValueError(
                f"The router {router.__class__.__name__} compares tokens "
                "across the routing group, which lets a token's routing "
                "depend on later tokens; it cannot be used with `causal=True`. "
                f"Received: router={router.name!r}, causal=True"
            )
        return router

    @property
    def activation(self):
        return self.experts.activation

    @property
    def gated(self):
        return self.experts.gated

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) < 2:
            raise ValueError(
                "SparseMoE expects inputs of rank >= 2, (batch, ..., "
                f"d_model). Received: input_shape={input_shape}"
            )
        model_dim = input_shape[-1]
        if model_dim is None:
            raise ValueError(
                "SparseMoE needs a known last dimension (d_model). Received: "
                f"input_shape={input_shape}"
            )
        self.model_dim = model_dim
        # A router passed in (or restored from a `.keras` file) may be built.
        if not self.router.built:
            self.router.build((None, None, model_dim))
        self.experts.build((self.num_experts, None, model_dim))
        # Warns when an active distribution cannot shard the experts.
        _check_built_layer(self)

        # Routing statistics, summed over training steps since the last
        # reset. float32 whatever the dtype policy; never autocast.
        def state(name, shape=()):
            return self.add_weight(
                name=name,
                shape=shape,
                initializer="zeros",
                trainable=False,
                dtype="float32",
                autocast=False,
            )

        self.routing_steps = state("routing_steps")
        self.statistic_sums = {
            name: state(
                f"{name}_sum",
                (self.num_experts,) if name == "expert_load" else (),
            )
            for name in STATISTICS
        }

    def _check_input_shape(self, input_shape):
        if len(input_shape) < 2:
            raise ValueError(
                "SparseMoE expects inputs of rank >= 2, (batch, ..., "
                f"d_model). Received: inputs.shape={tuple(input_shape)}"
            )
        if input_shape[-1] is not None and input_shape[-1] != self.model_dim:
            raise ValueError(
                "The last dimension of `inputs` (d_model) must match the one "
                f"the layer was built with, d_model={self.model_dim}. "
                f"Received: inputs.shape={tuple(input_shape)}"
            )

    def _capacity_factor(self, training):
        return self.capacity_factor if training else self.eval_capacity_factor

    def _group_tokens(self, inputs, mask):
        """Flattens and groups tokens.

        Returns:
            tokens `(N, G, d)`, valid `(N, G)` bool, the number of real tokens
            T, and the group size G (Python ints where shapes are static).
        """
        tokens = ops.reshape(inputs, (-1, self.model_dim))  # (T, d)
        num_tokens = ops.shape(tokens)[0]
        if mask is None:
            valid = ops.ones((num_tokens,), dtype="bool")
        else:
            valid = ops.reshape(ops.cast(mask, "bool"), (-1,))  # (T,)
        static = routing.is_static(num_tokens)
        if self.group_size is None:
            group_size = ops.maximum(num_tokens, 1) if not static else max(
                num_tokens, 1
            )
        elif static:
            group_size = max(1, min(self.group_size, num_tokens))
        else:
            group_size = ops.maximum(ops.minimum(self.group_size, num_tokens), 1)
        num_groups = _ceil_div(num_tokens, group_size)
        padding = num_groups * group_size - num_tokens
        if not (static and padding == 0):
            # Pad the last group with masked zero tokens.
            tokens = ops.concatenate(
                [tokens, ops.zeros((padding, self.model_dim), tokens.dtype)],
                axis=0,
            )
            valid = ops.concatenate(
                [valid, ops.zeros((padding,), dtype="bool")], axis=0
            )
        tokens = ops.reshape(tokens, (num_groups, group_size, self.model_dim))
        valid = ops.reshape(valid, (num_groups, group_size))
        return tokens, valid, num_tokens, group_size

    def _plan(self, tokens, valid, group_size, training):
        """Router decisions and slots for grouped tokens `(N, G, d)`."""
        decision = self.router(tokens, training=training)
        capacity = routing.compute_capacity(
            group_size,
            self.num_experts,
            self.top_k,
            self._capacity_factor(training),
            self.min_capacity,
        )
        plan = routing.compute_routing_plan(
            decision["expert_index"],
            valid,
            self.num_experts,
            capacity,
            priority="token_major" if self.causal else "k_major",
        )
        return decision, plan, capacity

    def call(self, inputs, mask=None, training=None):
        self._check_input_shape(inputs.shape)
        if _has_symbolic_dimension(ops.shape(inputs)):
            # Shape inference only: the output has the input's shape.
            return ops.zeros_like(inputs)
        training = bool(training)
        tokens, valid, num_tokens, group_size = self._group_tokens(inputs, mask)
        # Under a keras.distribution (JAX), the `_constrain` calls split the
        # groups over the data devices and the expert buffers over the
        # expert devices, so tokens travel by all-to-all. Identity otherwise.
        tokens = _constrain(tokens, "groups")  # (N, G, d)
        decision, plan, capacity = self._plan(
            tokens, valid, group_size, training
        )
        expert_index = decision["expert_index"]  # (N, G, k)
        rows = routing.buffer_rows(
            expert_index, plan, self.num_experts, capacity
        )  # (N, G, k)

        # Dispatch -> experts -> combine.
        buffers = routing.dispatch(
            tokens, rows, self.num_experts, capacity
        )  # (N, E, C, d)
        buffers = routing.to_expert_major(_constrain(buffers, "groups"))
        buffers = _constrain(buffers, "expert_buffers")  # (E, N * C, d)
        expert_outputs = self.experts(buffers, training=training)  # (E, N*C, d)
        expert_outputs = _constrain(expert_outputs, "expert_buffers")
        expert_outputs = routing.to_group_major(
            expert_outputs, ops.shape(tokens)[0]
        )  # (N, E, C, d)
        outputs = routing.combine(
            _constrain(expert_outputs, "groups"),
            rows,
            decision["combine_weights"],
        )  # (N, G, d)
        outputs = _constrain(outputs, "groups")
        outputs = ops.reshape(outputs, (-1, self.model_dim))[:num_tokens]

        if training:
            self._add_balancing_losses_and_statistics(decision, valid, plan)
        return ops.reshape(outputs, ops.shape(inputs))

    def _add_balancing_losses_and_statistics(self, decision, valid, plan):
        probs = decision["router_probs"]  # (N, G, E) float32
        logits = decision["router_logits"]  # (N, G, E) float32
        expert_index = decision["expert_index"]  # (N, G, k)
        balance_loss = losses.load_balancing_loss(probs, expert_index, valid)
        z_loss = losses.router_z_loss(logits, valid)
        if self.load_balance_loss_weight > 0:
            self.add_loss(self.load_balance_loss_weight * balance_loss)
        if self.z_loss_weight > 0:
            self.add_loss(self.z_loss_weight * z_loss)

        # Statistics carry no gradient.
        counts = ops.stop_gradient(
            losses.expert_assignment_counts(
                expert_index, self.num_experts, valid
            )
        )  # (E,)
        num_assignments = ops.sum(counts)
        num_kept = ops.sum(ops.cast(plan.kept, "float32"))
        expert_load = counts / ops.maximum(num_assignments, 1.0)  # (E,)
        step_values = {
            "balance_loss": balance_loss,
            "z_loss": z_loss,
            "dropped_fraction": (num_assignments - num_kept)
            / ops.maximum(num_assignments, 1.0),
            "dropped_assignments": num_assignments - num_kept,
            # max load / mean load; mean load is 1 / E of all assignments.
            "load_imbalance": ops.max(expert_load) * self.num_experts,
            "expert_load": expert_load,
        }
        for name, value in step_values.items():
            variable = self.statistic_sums[name]
            variable.assign(variable + ops.stop_gradient(value))
        self.routing_steps.assign(self.routing_steps + 1.0)

    def route(self, inputs, mask=None, training=False):
        """Routing decisions for `inputs`, without running the experts.

        Useful to see which tokens go where (routing maps, per-class expert
        usage). Uses the same grouping and capacity as a call with the same
        `training` flag.

        Args:
            inputs: `(batch, ..., d_model)`.
            mask: optional bool `(batch, ...)`.
            training: bool, picks the capacity factor (and router noise).

        Returns:
            A dict of tensors, token axes shaped like `inputs[..., 0]`:
            `"expert_index"` `(batch, ..., k)`, `"combine_weights"`
            `(batch, ..., k)`, `"kept"` bool `(batch, ..., k)` (false where
            the assignment was dropped at capacity or the token is masked),
            `"router_probs"` `(batch, ..., E)`.
        """
        inputs = ops.convert_to_tensor(inputs)
        if not self.built:
            self.build(inputs.shape)
        self._check_input_shape(inputs.shape)
        tokens, valid, num_tokens, group_size = self._group_tokens(
            ops.cast(inputs, self.compute_dtype), mask
        )
        decision, plan, _ = self._plan(tokens, valid, group_size, training)
        token_shape = tuple(ops.shape(inputs)[:-1])

        def ungroup(tensor):
            last = ops.shape(tensor)[-1]
            flat = ops.reshape(tensor, (-1, last))[:num_tokens]
            return ops.reshape(flat, token_shape + (last,))

        return {
            "expert_index": ungroup(decision["expert_index"]),
            "combine_weights": ungroup(decision["combine_weights"]),
            "kept": ungroup(plan.kept),
            "router_probs": ungroup(decision["router_probs"]),
        }

    def routing_statistics(self):
        """Means of the routing statistics since the last reset.

        Returns:
            A dict of NumPy values: `"balance_loss"`, `"z_loss"`,
            `"dropped_fraction"`, `"dropped_assignments"` (per step),
            `"load_imbalance"` (scalars) and `"expert_load"` `(E,)`, plus
            `"steps"`, the number of training steps they average over. All
            zeros before any training step.
        """
        steps = float(ops.convert_to_numpy(self.routing_steps))
        result = {
            name: ops.convert_to_numpy(variable) / max(steps, 1.0)
            for name, variable in self.statistic_sums.items()
        }
        result = {
            name: (float(value) if np.ndim(value) == 0 else value)
            for name, value in result.items()
        }
        result["steps"] = steps
        return result

    def reset_routing_statistics(self):
        """Sets the accumulated routing statistics back to zero."""
        for variable in (self.routing_steps, *self.statistic_sums.values()):
            variable.assign(ops.zeros(variable.shape, dtype=variable.dtype))

    def compute_output_shape(self, input_shape):
        if self.built:
            self._check_input_shape(input_shape)
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_experts": self.num_experts,
                "intermediate_dim": self.intermediate_dim,
                "top_k": self.top_k,
                "capacity_factor": self.capacity_factor,
                "eval_capacity_factor": self.eval_capacity_factor,
                "min_capacity": self.min_capacity,
                "group_size": self.group_size,
                "activation": keras.activations.serialize(self.activation),
                "gated": self.gated,
                "use_bias": self.experts.use_bias,
                "expert_dropout": self.expert_dropout,
                "router": (
                    keras.saving.serialize_keras_object(self.router)
                    if self._custom_router
                    else None
                ),
                "load_balance_loss_weight": self.load_balance_loss_weight,
                "z_loss_weight": self.z_loss_weight,
                "causal": self.causal,
                "kernel_initializer": keras.initializers.serialize(
                    self.experts.kernel_initializer
                ),
                "bias_initializer": keras.initializers.serialize(
                    self.experts.bias_initializer
                ),
                "kernel_regularizer": keras.regularizers.serialize(
                    self.experts.kernel_regularizer
                ),
                "bias_regularizer": keras.regularizers.serialize(
                    self.experts.bias_regularizer
                ),
                "seed": self.seed,
            }
        )
        return config
