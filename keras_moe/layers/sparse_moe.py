"""SparseMoE: a drop-in sparse replacement for a dense feed-forward block."""

import inspect
import warnings

import keras
import numpy as np
from keras import ops

from keras_moe import losses
from keras_moe import routing
from keras_moe.routing import expert_choice
from keras_moe.distribution import _check_built_layer
from keras_moe.distribution import _constrain
from keras_moe.distribution import _distribution_active
from keras_moe._checks import check_bool
from keras_moe._checks import check_capacity_factor
from keras_moe._checks import check_non_negative_float
from keras_moe._checks import check_optional_seed
from keras_moe._checks import check_positive_int
from keras_moe._checks import check_rate
from keras_moe.api_export import keras_moe_export
from keras_moe.layers.base_router import EXPERT_CHOICE
from keras_moe.layers.base_router import TOKEN_CHOICE
from keras_moe.layers.bias_balanced_router import BiasBalancedRouter
from keras_moe.layers.expert_choice_router import ExpertChoiceRouter
from keras_moe.layers.expert_ffn import ExpertFFN
from keras_moe.layers.expert_ffn import clone_initializer
from keras_moe.layers.feed_forward import FeedForward
from keras_moe.layers.noisy_top_k_router import NoisyTopKRouter
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

# Routers `SparseMoE(router=...)` builds from a name, with the layer's
# `num_experts`, `top_k` and `seed` and each router's defaults.
ROUTERS = {
    "top_k": TopKRouter,
    "noisy_top_k": NoisyTopKRouter,
    "bias_balanced": BiasBalancedRouter,
    "expert_choice": ExpertChoiceRouter,
}

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
       those tokens unchanged.
    4. Tokens are gathered into expert buffers `(E, N * C, d)` by index,
       the experts run as one batched matmul per projection, and outputs are
       gathered back and summed with the combine weights. No tensor of shape
       `(tokens, experts, capacity)` is built and no expert sees a token that
       was not routed to it.
       Dropless (`capacity_factor=None`, or `eval_capacity_factor=None` at
       inference): no capacity at all; every assignment gets one row of a
       buffer `(T * k, d)` sorted by expert and a grouped matmul multiplies
       each expert's rows only (`routing.grouped_matmul`: `ragged_dot` on
       GPU/TPU, tiles on JAX's CPU, slices on TensorFlow and PyTorch), so the
       work stays proportional to `T * k` for any routing. On TensorFlow
       that buffer's groups have data-dependent shapes, so a dropless layer
       opts its model out of XLA (`supports_jit = False`). Under expert
       parallelism (`keras_moe.distribution`) tokens must travel in
       fixed-size buffers, so dropless routing there falls back to buffers
       of a whole group per expert (exact, but E times the work): shard
       with a capacity factor (the layer warns once when it runs this way).
    5. With a `keras.distribution` active (JAX), the groups are split over
       the data devices and the expert buffers over the `"expert"` mesh
       axis, so tokens reach their experts by all-to-all
       (`keras_moe.distribution`). Without one, nothing changes.

    Balancing, in training only, through `add_loss` (so it reaches
    `model.fit`'s loss in any model type, also when nested):
    - `load_balance_loss_weight * E * sum_i f_i P_i` (Switch), with `f_i` the
      fraction of all k assignments of valid tokens that chose expert i and
      `P_i` the mean router probability of expert i (1.0 when balanced);
      by default (`load_balance_loss_weight=None`) weighted 1e-2 for
      `TopKRouter` and 0 for the routers that balance otherwise;
    - `z_loss_weight * mean_t logsumexp(logits_t)^2` (ST-MoE router z-loss);
    - `weight * loss` for each balancing loss the router declares (see
      `keras_moe.layers.base_router.BaseRouter`), e.g. the importance and
      load losses of `NoisyTopKRouter`.

    Routing options, each one argument:
    - `router="noisy_top_k"`: Shazeer et al.'s noisy top-k gating with
      learned noise and importance/load losses (`NoisyTopKRouter`);
    - `router="bias_balanced"`: DeepSeek-V3's auxiliary-loss-free balancing
      by a per-expert selection bias (`BiasBalancedRouter`);
    - `router="expert_choice"`: every expert takes its top-C tokens of each
      group (`ExpertChoiceRouter`, Zhou et al.): exactly C tokens per
      expert, a token may get several experts or none, no balancing loss;
      here `top_k` is the average number of experts per token and the
      capacity formula below gives C;
    - `priority="batch_prioritized"`: V-MoE's Batch Prioritized Routing,
      when an expert is over capacity the tokens with the lowest top
      combine weight are dropped first instead of the latest ones;
    - `num_shared_experts=S`: S always-on experts beside the routed ones
      (DeepSeekMoE, Qwen-MoE), stored as one `FeedForward` of width
      `S * shared_intermediate_dim` (a sum of S experts is one wider
      feed-forward block), optionally scaled by a per-token sigmoid gate
      (`shared_expert_gate=True`, Qwen-MoE);
    - `expert_dropout=r`: dropout on the hidden activations inside the
      (routed and shared) experts only, separate from the rest of the
      model's dropout (Switch uses 0.4 inside experts when fine-tuning).
    A dense mixture (Jacobs et al., 1991: every expert on every token,
    weighted by the gate's softmax) is `top_k=num_experts,
    capacity_factor=None, eval_capacity_factor=None`, or the cheaper
    `keras_moe.DenseMoE`; Soft MoE is `keras_moe.SoftMoE`.

    Routing statistics: every training call adds this step's values to
    non-trainable state variables (updated correctly under JAX's jit as well
    as on TensorFlow and PyTorch): the unweighted balancing loss and z-loss,
    the fraction and the number of assignments dropped at capacity, the load
    imbalance (max expert load / mean expert load, 1.0 when balanced) and the
    fraction of assignments per expert, plus each balancing loss the router
    declares (e.g. `importance_loss`, `load_loss`); with expert choice,
    `dropped_fraction` is the fraction of tokens no expert took.
    `routing_statistics()` returns their
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
        num_shared_experts: int >= 0, always-on experts beside the routed
            ones (DeepSeekMoE, Qwen-MoE); 0 (default) for none.
        shared_intermediate_dim: int or None, hidden width of each shared
            expert; None uses `intermediate_dim`.
        shared_expert_gate: bool, multiply the shared experts' output by
            `sigmoid(x w)` with a learned `(d_model, 1)` kernel (Qwen-MoE).
        router: None (a `TopKRouter(num_experts, top_k)`), one of the names
            `"top_k"`, `"noisy_top_k"`, `"bias_balanced"`,
            `"expert_choice"` (that router with its defaults), or a router
            layer with matching `num_experts` and `top_k` (e.g. a
            `TopKRouter` with `normalize_weights=True` for Mixtral-style
            weights). Any layer with the interface described in
            `keras_moe.layers.base_router.BaseRouter` works.
        load_balance_loss_weight: float >= 0 or None, weight of the Switch
            load-balancing loss; 0 turns it off. None (default) uses the
            router's `default_load_balance_loss_weight`: 1e-2 for
            `TopKRouter`, 0 for routers that balance by themselves or with
            their own losses (noisy top-k, bias-balanced, expert choice).
        z_loss_weight: float >= 0, 0 turns the loss off.
        causal: bool, the layer sits in an autoregressive model: capacity
            slots are filled in token order so that no token's routing
            depends on later tokens, and routers that compare tokens across
            the group are refused.
        priority: None or one of `routing.PRIORITIES`: the order in which
            capacity slots are handed out (token choice only). None gives
            `"token_major"` with `causal=True` and `"k_major"` otherwise;
            `"batch_prioritized"` is V-MoE's Batch Prioritized Routing (not
            with `causal=True`).
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
        - Riquelme et al., 2021, "Scaling Vision with Sparse Mixture of
          Experts" (batch prioritized routing).
        - Zhou et al., 2022, "Mixture-of-Experts with Expert Choice
          Routing".
        - Dai et al., 2024, "DeepSeekMoE"; Qwen Team, 2024, "Qwen1.5-MoE"
          (shared experts).
        - DeepSeek-AI, 2024, "DeepSeek-V3 Technical Report".
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
        num_shared_experts=0,
        shared_intermediate_dim=None,
        shared_expert_gate=False,
        router=None,
        load_balance_loss_weight=None,
        z_loss_weight=1e-3,
        causal=False,
        priority=None,
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
        if load_balance_loss_weight is not None:
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
        self.z_loss_weight = float(z_loss_weight)
        self.causal = causal
        self.seed = seed
        self.supports_masking = True
        if keras.backend.backend() == "tensorflow" and None in (
            capacity_factor,
            eval_capacity_factor,
        ):
            # The dropless path's TensorFlow grouped matmul has shapes that
            # depend on the routing, which XLA cannot compile; Keras then
            # trains this model without XLA.
            self.supports_jit = False

        # === Layers ===
        self.router = self._make_router(router)
        self._router_argument = router
        # The Switch loss weight: explicit, or the router's default.
        if load_balance_loss_weight is None:
            load_balance_loss_weight = getattr(
                self.router, "default_load_balance_loss_weight", 1e-2
            )
        self.load_balance_loss_weight = float(load_balance_loss_weight)
        self.routing_type = getattr(self.router, "routing_type", TOKEN_CHOICE)
        self.priority = priority
        self._priority = self._resolve_priority(priority)
        self._router_takes_mask = (
            "mask" in inspect.signature(self.router.call).parameters
        )
        self._check_shared_experts(
            num_shared_experts, shared_intermediate_dim, shared_expert_gate
        )
        self.num_shared_experts = int(num_shared_experts)
        self.shared_intermediate_dim = shared_intermediate_dim
        self.shared_expert_gate = bool(shared_expert_gate)
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
        self.shared_experts, self.shared_gate = self._make_shared_experts(
            activation=activation,
            gated=gated,
            use_bias=use_bias,
            kernel_initializer=kernel_initializer,
            bias_initializer=bias_initializer,
            kernel_regularizer=kernel_regularizer,
            bias_regularizer=bias_regularizer,
        )

    def _resolve_priority(self, priority):
        """The slot priority `compute_routing_plan` gets, checked."""
        if priority is None:
            return "token_major" if self.causal else "k_major"
        if priority not in routing.PRIORITIES:
            raise ValueError(
                "Received an invalid value for `priority`, expected None or "
                f"one of {routing.PRIORITIES}. Received: priority={priority!r}"
            )
        if self.causal and priority != "token_major":
            raise ValueError(
                f"`priority={priority!r}` lets a token's capacity slot "
                "depend on later tokens, which a causal model must not; use "
                "priority=None or 'token_major' with causal=True. Received: "
                f"priority={priority!r}, causal=True"
            )
        if self.routing_type == EXPERT_CHOICE:
            raise ValueError(
                "`priority` orders the capacity slots of token-choice "
                "routing; with expert choice every expert picks its own "
                f"tokens. Received: priority={priority!r} with router "
                f"{type(self.router).__name__}"
            )
        return priority

    def _check_shared_experts(self, number, intermediate_dim, gate):
        check_positive_int("num_shared_experts", number, minimum=0)
        if intermediate_dim is not None:
            check_positive_int("shared_intermediate_dim", intermediate_dim)
        if number == 0 and (intermediate_dim is not None or gate):
            raise ValueError(
                "`shared_intermediate_dim` and `shared_expert_gate` need "
                "num_shared_experts >= 1. Received: num_shared_experts=0, "
                f"shared_intermediate_dim={intermediate_dim!r}, "
                f"shared_expert_gate={gate!r}"
            )

    def _make_shared_experts(self, kernel_initializer, **expert_kwargs):
        """The shared experts as one FeedForward, and their optional gate.

        S experts of hidden width h applied to every token and summed are
        one feed-forward block of width S * h (hidden units side by side,
        output biases added into one), which runs as one matmul each way.
        """
        if self.num_shared_experts == 0:
            return None, None
        width = self.shared_intermediate_dim or self.intermediate_dim
        shared = FeedForward(
            intermediate_dim=self.num_shared_experts * width,
            dropout=self.expert_dropout,
            kernel_initializer=clone_initializer(
                keras.initializers.get(kernel_initializer)
            ),
            seed=self.seed,
            dtype=self.dtype_policy,
            name="shared_experts",
            **expert_kwargs,
        )
        gate = None
        if self.shared_expert_gate:
            gate = keras.layers.Dense(
                1,
                use_bias=False,
                kernel_initializer=clone_initializer(
                    keras.initializers.get(kernel_initializer)
                ),
                dtype=self.dtype_policy,
                name="shared_expert_gate",
            )
        return shared, gate

    def _make_router(self, router):
        if router is None or isinstance(router, str):
            name = "top_k" if router is None else router
            if name not in ROUTERS:
                raise ValueError(
                    "Received an invalid value for `router`, expected None, "
                    f"one of {tuple(ROUTERS)} or a router layer such as "
                    f"`keras_moe.TopKRouter`. Received: router={router!r}"
                )
            router = ROUTERS[name](
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
                "Received an invalid value for `router`, expected None, one "
                f"of {tuple(ROUTERS)} or a router layer such as "
                f"`keras_moe.TopKRouter`. Received: router={router!r}"
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
        routing_type = getattr(router, "routing_type", TOKEN_CHOICE)
        if routing_type not in (TOKEN_CHOICE, EXPERT_CHOICE):
            raise ValueError(
                "Received a router with an invalid `routing_type`, expected "
                f"{TOKEN_CHOICE!r} or {EXPERT_CHOICE!r}. Received: "
                f"routing_type={routing_type!r}"
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
        if self.shared_experts is not None:
            self.shared_experts.build((None, model_dim))
        if self.shared_gate is not None:
            self.shared_gate.build((None, model_dim))
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
            for name in STATISTICS + self.router_loss_names
        }

    @property
    def router_loss_names(self):
        """Names of the balancing losses the router declares, a tuple."""
        return tuple(getattr(self.router, "balancing_loss_weights", {}))

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

    def _route(self, tokens, valid, training):
        """The token-choice router's decision for grouped tokens `(N, G, d)`.

        The padding mask `valid` `(N, G)` is passed to routers whose `call`
        takes a `mask` (those that compare tokens need it).
        """
        if self._router_takes_mask:
            return self.router(tokens, mask=valid, training=training)
        return self.router(tokens, training=training)

    def _plan(self, tokens, valid, group_size, training):
        """Router decisions and slots for grouped tokens `(N, G, d)`."""
        decision = self._route(tokens, valid, training)
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
            priority=self._priority,
            priority_scores=(
                # V-MoE: a token's priority is its largest routing weight.
                ops.max(decision["combine_weights"], axis=-1)
                if self._priority == "batch_prioritized"
                else None
            ),
        )
        return decision, plan, capacity

    def call(self, inputs, mask=None, training=None):
        self._check_input_shape(inputs.shape)
        if _has_symbolic_dimension(ops.shape(inputs)):
            # Shape inference only: the output has the input's shape.
            return ops.zeros_like(inputs)
        training = bool(training)
        if self.routing_type == EXPERT_CHOICE:
            return self._expert_choice_call(inputs, mask, training)
        tokens, valid, num_tokens, group_size = self._group_tokens(inputs, mask)
        capacity_factor = self._capacity_factor(training)
        # Under expert parallelism tokens travel in fixed-size buffers (an
        # all-to-all needs static sizes), so dropless routing there uses
        # capacity buffers of a whole group per expert: nothing dropped, but
        # compute of E * G rows per group. Use a capacity factor to shard.
        dropless = capacity_factor is None
        if dropless and _distribution_active():
            self._warn_dropless_under_distribution(training, group_size)
            dropless = False  # capacity_factor=None: a whole group per expert
        if dropless:
            decision = self._route(tokens, valid, training)
            outputs = self._dropless_experts(tokens, valid, decision, training)
            kept = ops.logical_and(
                ops.expand_dims(valid, -1),
                ops.ones_like(decision["expert_index"], dtype="bool"),
            )  # (N, G, k): nothing is dropped
        else:
            decision, outputs, kept = self._capacity_experts(
                tokens, valid, group_size, training
            )
        outputs = ops.reshape(outputs, (-1, self.model_dim))[:num_tokens]
        if training:
            self._add_balancing_losses_and_statistics(decision, valid, kept)
        outputs = ops.reshape(outputs, ops.shape(inputs))
        return self._add_shared_experts(inputs, outputs, mask, training)

    def _warn_dropless_under_distribution(self, training, group_size):
        """Says once per layer and mode that dropless costs E x G rows here."""
        warned = self.__dict__.setdefault("_dropless_distribution_warned", set())
        if training in warned:
            return
        warned.add(training)
        argument = "capacity_factor" if training else "eval_capacity_factor"
        warnings.warn(
            f"SparseMoE {self.name!r} runs dropless ({argument}=None) under a "
            "keras.distribution: expert parallelism moves tokens in fixed-size "
            "buffers, so every expert gets a buffer of a whole routing group "
            f"({group_size} rows). Nothing is dropped, but the experts compute "
            f"{self.num_experts} x {group_size} rows per group, the cost of "
            "running every expert on every token. Set "
            f"{argument} (e.g. 1.25, or 2.0 to drop little) to shard at the "
            "sparse cost; the dropped fraction is in the routing statistics.",
            stacklevel=3,
        )

    def _capacity_experts(self, tokens, valid, group_size, training):
        """Capacity-limited dispatch -> experts -> combine.

        Args:
            tokens: `(N, G, d)`; valid: bool `(N, G)`.

        Returns:
            The router's decision, outputs `(N, G, d)` and `kept` bool
            `(N, G, k)`.
        """
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
        return decision, _constrain(outputs, "groups"), plan.kept

    def _dropless_experts(self, tokens, valid, decision, training):
        """Dropless dispatch -> experts -> combine, work proportional to T * k.

        Every assignment gets a row of a buffer sorted by expert
        (`routing.dropless_layout`); the experts multiply only their own
        rows (`routing.grouped_matmul`). Grouping plays no part here (there
        is no capacity), so all `N * G` tokens are laid out together.

        Args:
            tokens: `(N, G, d)`; valid: bool `(N, G)`; decision: the
                router's outputs for `tokens`.

        Returns:
            Outputs `(N, G, d)`.
        """
        num_groups, group_size = ops.shape(tokens)[0], ops.shape(tokens)[1]
        flat_tokens = ops.reshape(tokens, (-1, self.model_dim))  # (T', d)
        layout = routing.dropless_layout(
            ops.reshape(decision["expert_index"], (-1, self.top_k)),
            ops.reshape(valid, (-1,)),
            self.num_experts,
        )
        buffer = routing.dropless_dispatch(flat_tokens, layout)  # (A, d)
        expert_outputs = self.experts(
            buffer, training=training, group_sizes=layout.group_sizes
        )  # (A, d)
        outputs = routing.dropless_combine(
            expert_outputs,
            layout,
            ops.reshape(decision["combine_weights"], (-1, self.top_k)),
        )  # (T', d)
        return ops.reshape(outputs, (num_groups, group_size, self.model_dim))

    def _add_balancing_losses_and_statistics(self, decision, valid, kept):
        probs = decision["router_probs"]  # (N, G, E) float32
        logits = decision["router_logits"]  # (N, G, E) float32
        expert_index = decision["expert_index"]  # (N, G, k)
        balance_loss = losses.load_balancing_loss(probs, expert_index, valid)
        z_loss = losses.router_z_loss(logits, valid)
        if self.load_balance_loss_weight > 0:
            self.add_loss(self.load_balance_loss_weight * balance_loss)
        if self.z_loss_weight > 0:
            self.add_loss(self.z_loss_weight * z_loss)
        router_losses = self._add_router_losses(decision, valid)

        # Statistics carry no gradient.
        counts = ops.stop_gradient(
            losses.expert_assignment_counts(
                expert_index, self.num_experts, valid
            )
        )  # (E,)
        num_assignments = ops.sum(counts)
        num_kept = ops.sum(ops.cast(kept, "float32"))
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
            **router_losses,
        }
        self._record_statistics(step_values)

    # === Router interface, shared experts, expert choice ===

    def _add_router_losses(self, decision, valid):
        """Adds the router's declared balancing losses; updates its state.

        Returns:
            `{name: unweighted loss}` for the routing statistics.
        """
        weights = getattr(self.router, "balancing_loss_weights", {})
        router_losses = {}
        if weights:
            router_losses = self.router.balancing_losses(decision, valid)
            for name, weight in weights.items():
                if weight > 0:
                    self.add_loss(weight * router_losses[name])
        update = getattr(self.router, "update_balancing_state", None)
        if update is not None:
            update(decision, valid)
        return {name: router_losses[name] for name in weights}

    def _record_statistics(self, step_values):
        """Adds one training step's values to the running sums."""
        for name, value in step_values.items():
            variable = self.statistic_sums[name]
            variable.assign(variable + ops.stop_gradient(value))
        self.routing_steps.assign(self.routing_steps + 1.0)

    def _add_shared_experts(self, inputs, outputs, mask, training):
        """`outputs` plus the always-on shared experts' output on `inputs`."""
        if self.shared_experts is None:
            return outputs
        shared = self.shared_experts(inputs, training=training)  # (..., d)
        if self.shared_gate is not None:
            # Qwen-MoE: a per-token sigmoid gate, (..., 1).
            shared = shared * ops.sigmoid(self.shared_gate(inputs))
        if mask is not None:
            # Padding outputs zeros, as for the routed experts.
            shared = shared * ops.expand_dims(
                ops.cast(mask, shared.dtype), -1
            )
        return outputs + ops.cast(shared, outputs.dtype)

    def _expert_choice_plan(self, tokens, valid, group_size, training):
        """Expert-choice decisions for grouped tokens `(N, G, d)`."""
        capacity = routing.compute_capacity(
            group_size,
            self.num_experts,
            self.top_k,
            self._capacity_factor(training),
            self.min_capacity,
        )
        decision = self.router(
            tokens, mask=valid, training=training, capacity=capacity
        )
        plan = expert_choice.ExpertChoicePlan(
            token_index=decision["token_index"],  # (N, E, C)
            combine_weights=decision["combine_weights"],  # (N, E, C)
            kept=decision["kept"],  # (N, E, C)
        )
        return decision, plan

    def _expert_choice_call(self, inputs, mask, training):
        """`call` for expert-choice routers: experts pick their tokens.

        Gathers each expert's C tokens into `(E, N * C, d)` buffers, runs
        the experts, and adds each output back to its token weighted by the
        router probability, expert by expert in index order (a fixed
        summation order, see `routing.expert_choice.combine_outputs`).
        """
        tokens, valid, num_tokens, group_size = self._group_tokens(inputs, mask)
        tokens = _constrain(tokens, "groups")  # (N, G, d)
        decision, plan = self._expert_choice_plan(
            tokens, valid, group_size, training
        )
        buffers = expert_choice.gather_tokens(
            tokens, plan.token_index
        )  # (N, E, C, d)
        buffers = routing.to_expert_major(_constrain(buffers, "groups"))
        buffers = _constrain(buffers, "expert_buffers")  # (E, N * C, d)
        expert_outputs = self.experts(buffers, training=training)
        expert_outputs = _constrain(expert_outputs, "expert_buffers")
        expert_outputs = routing.to_group_major(
            expert_outputs, ops.shape(tokens)[0]
        )  # (N, E, C, d)
        outputs = expert_choice.combine_outputs(
            _constrain(expert_outputs, "groups"), plan, group_size
        )  # (N, G, d)
        outputs = _constrain(outputs, "groups")
        outputs = ops.reshape(outputs, (-1, self.model_dim))[:num_tokens]
        if training:
            self._expert_choice_losses_and_statistics(
                decision, valid, plan, group_size
            )
        outputs = ops.reshape(outputs, ops.shape(inputs))
        return self._add_shared_experts(inputs, outputs, mask, training)

    def _expert_choice_losses_and_statistics(
        self, decision, valid, plan, group_size
    ):
        probs = decision["router_probs"]  # (N, G, E)
        z_loss = losses.router_z_loss(decision["router_logits"], valid)
        # Switch's E * sum_i f_i P_i with f_i the fraction of the kept slots
        # held by expert i (1 / E each unless a group is short of tokens).
        counts = ops.sum(ops.cast(plan.kept, "float32"), axis=(0, 2))  # (E,)
        expert_load = counts / ops.maximum(ops.sum(counts), 1.0)
        valid_float = ops.cast(valid, "float32")  # (N, G)
        num_valid = ops.maximum(ops.sum(valid_float), 1.0)
        mean_probs = ops.sum(
            probs * ops.expand_dims(valid_float, -1), axis=(0, 1)
        ) / num_valid  # (E,)
        balance_loss = self.num_experts * ops.sum(expert_load * mean_probs)
        if self.load_balance_loss_weight > 0:
            self.add_loss(self.load_balance_loss_weight * balance_loss)
        if self.z_loss_weight > 0:
            self.add_loss(self.z_loss_weight * z_loss)
        router_losses = self._add_router_losses(decision, valid)
        # Tokens no expert took pass through the residual only.
        experts_per_token = expert_choice.experts_per_token(plan, group_size)
        unrouted = ops.sum(
            valid_float * ops.cast(experts_per_token == 0, "float32")
        )
        self._record_statistics(
            {
                "balance_loss": balance_loss,
                "z_loss": z_loss,
                "dropped_fraction": unrouted / num_valid,
                "dropped_assignments": unrouted,
                "load_imbalance": ops.max(expert_load) * self.num_experts,
                "expert_load": ops.stop_gradient(expert_load),
                **router_losses,
            }
        )

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
            With an expert-choice router instead: `"token_index"`,
            `"combine_weights"` and `"kept"` `(N, E, C)` per routing group
            (see `routing.expert_choice.ExpertChoicePlan`),
            `"expert_weights"` `(batch, ..., E)` (each token's weight for
            every expert, 0 where the expert did not take it) and
            `"router_probs"`.
        """
        inputs = ops.convert_to_tensor(inputs)
        if not self.built:
            self.build(inputs.shape)
        self._check_input_shape(inputs.shape)
        tokens, valid, num_tokens, group_size = self._group_tokens(
            ops.cast(inputs, self.compute_dtype), mask
        )
        token_shape = tuple(ops.shape(inputs)[:-1])

        def ungroup(tensor):
            last = ops.shape(tensor)[-1]
            flat = ops.reshape(tensor, (-1, last))[:num_tokens]
            return ops.reshape(flat, token_shape + (last,))

        if self.routing_type == EXPERT_CHOICE:
            decision, plan = self._expert_choice_plan(
                tokens, valid, group_size, training
            )
            return {
                "token_index": plan.token_index,
                "combine_weights": plan.combine_weights,
                "kept": plan.kept,
                "expert_weights": ungroup(
                    expert_choice.token_weights(plan, group_size)
                ),
                "router_probs": ungroup(decision["router_probs"]),
            }
        decision, plan, _ = self._plan(tokens, valid, group_size, training)
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
            `"load_imbalance"` (scalars) and `"expert_load"` `(E,)`, the
            router's declared balancing losses (`router_loss_names`), plus
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
                **self.experts.options_config(),
                "expert_dropout": self.expert_dropout,
                "num_shared_experts": self.num_shared_experts,
                "shared_intermediate_dim": self.shared_intermediate_dim,
                "shared_expert_gate": self.shared_expert_gate,
                # A router name stays a name; a layer is serialised.
                "router": (
                    self._router_argument
                    if self._router_argument is None
                    or isinstance(self._router_argument, str)
                    else keras.saving.serialize_keras_object(self.router)
                ),
                "load_balance_loss_weight": self.load_balance_loss_weight,
                "z_loss_weight": self.z_loss_weight,
                "causal": self.causal,
                "priority": self.priority,
                "seed": self.seed,
            }
        )
        return config
