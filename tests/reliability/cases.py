"""The layer configurations every reliability test runs over.

Each `MoECase` makes a fresh MoE layer; the tests in this folder are
parametrised over `MOE_CASES` (and `dense_cases()` for the dense blocks), so a
new router or MoE layer is covered by the whole reliability suite once it has
an entry here. A case's factory must accept the keyword overrides the tests
pass: `seed`, `dtype`, `name`, `z_loss_weight`, `load_balance_loss_weight`,
`group_size` (a layer that routes nothing ignores the last three).

What the tests need from a case's layer, beyond being a Keras layer
`(batch, ..., d) -> (batch, ..., d)` with an `experts` `ExpertFFN`:
- when `case.routing` is not None (a `SparseMoE`): `routing_statistics()`
  (dict of finite values, `"steps"` included), `reset_routing_statistics()`
  and `route(inputs, mask=None, training=False)` returning, for
  `"token_choice"`, at least `"expert_index"`, `"combine_weights"` and
  `"kept"` per token, and for `"expert_choice"` the plan `"token_index"`,
  `"combine_weights"`, `"kept"` `(N, E, C)` and `"expert_weights"` per
  token; the always-on `shared_experts` (and `shared_gate`), if any, are
  added to the routed output;
- when `case.routing` is None (`DenseMoE`, `SoftMoE`: every expert sees
  every token, nothing is routed, counted or dropped): no statistics, no
  route, no losses;
- `case.router_kernel(layer)`: the float32 variable that maps tokens to router
  (or slot) logits, when `case.has_router_kernel` (the low-precision tests
  set it by hand to produce logits of magnitude 1e4).
"""

import dataclasses
from typing import Callable

import keras

from keras_moe import BiasBalancedRouter
from keras_moe import DenseMoE
from keras_moe import ExpertChoiceRouter
from keras_moe import ExpertFFN
from keras_moe import FeedForward
from keras_moe import NoisyTopKRouter
from keras_moe import SoftMoE
from keras_moe import SparseMoE
from keras_moe import TopKRouter

# Experts in every case; small so that every expert is exercised.
NUM_EXPERTS = 4
TOKEN_CHOICE = "token_choice"
EXPERT_CHOICE = "expert_choice"


@dataclasses.dataclass(frozen=True)
class MoECase:
    """One MoE layer configuration.

    Attributes:
        name: test-name suffix.
        make: `make(**overrides) -> layer`, a new unbuilt layer.
        drops_tokens: the configuration can drop assignments at capacity
            (in training or at inference).
        stochastic: the layer draws random numbers in training (router
            noise, expert dropout), so determinism depends on its seed.
        routing: `"token_choice"`, `"expert_choice"` or None (no routing;
            see the module docstring).
        has_router_kernel: `router_kernel(layer)` gives the router's
            `(d, E)` kernel (or Soft MoE's `(d, slots)` one).
        top_k: experts per token (token choice), or on average (expert
            choice).
        router_kernel: `router_kernel(layer)`, see `has_router_kernel`.
        saturates: at router logits of magnitude 1e4 the top choice takes
            all of a token's combine weight (softmax scores; not sigmoid
            scores, which saturate at 1 for several experts at once).
    """

    name: str
    make: Callable[..., keras.layers.Layer]
    drops_tokens: bool = True
    stochastic: bool = False
    routing: str = TOKEN_CHOICE
    has_router_kernel: bool = True
    top_k: int = 2
    saturates: bool = True
    router_kernel: Callable[[keras.layers.Layer], keras.Variable] = (
        lambda layer: layer.router.kernel
    )

    @property
    def has_route(self):
        """Token-choice `route()` output (expert index per token)."""
        return self.routing == TOKEN_CHOICE

    @property
    def has_statistics(self):
        """`routing_statistics()`, `route()` and balancing losses."""
        return self.routing is not None


def _sparse_moe(router=None, **config):
    """A factory of `SparseMoE(**config, **overrides)`.

    `router`, if given, is `router(seed) -> router layer`, so each layer gets
    a fresh router that shares the layer's seed.
    """

    def make(**overrides):
        kwargs = {"num_experts": NUM_EXPERTS, "intermediate_dim": 8}
        kwargs.update(config)
        kwargs.update(overrides)
        if router is not None:
            kwargs["router"] = router(kwargs.get("seed"))
        return SparseMoE(**kwargs)

    return make


MOE_CASES = (
    # GShard / Switch defaults with tight capacity: drops in training and at
    # inference, k-major priority, one routing group per call.
    MoECase(
        "top2_capacity",
        _sparse_moe(
            top_k=2, capacity_factor=1.0, eval_capacity_factor=0.75,
            min_capacity=1,
        ),
    ),
    # Switch top-1 with small routing groups that do not divide the tokens.
    MoECase(
        "top1_groups",
        _sparse_moe(
            top_k=1, group_size=5, capacity_factor=1.0,
            eval_capacity_factor=1.0, min_capacity=1, activation="relu",
        ),
        top_k=1,
    ),
    # Mixtral-style: SwiGLU experts, renormalised top-2 weights, a router
    # bias, causal (token-major) slot order.
    MoECase(
        "swiglu_causal_normalized",
        _sparse_moe(
            top_k=2, gated=True, activation="silu", causal=True, group_size=4,
            capacity_factor=1.0, eval_capacity_factor=1.0, min_capacity=1,
            router=lambda seed: TopKRouter(
                NUM_EXPERTS, 2, normalize_weights=True, use_bias=True,
                bias_initializer="random_normal", seed=seed,
            ),
        ),
    ),
    # gpt-oss-style softmax over the selected logits, dropless, k=3.
    MoECase(
        "dropless_softmax_after_top_k",
        _sparse_moe(
            top_k=3, capacity_factor=None, eval_capacity_factor=None,
            use_bias=False,
            router=lambda seed: TopKRouter(
                NUM_EXPERTS, 3, softmax_after_top_k=True, seed=seed
            ),
        ),
        drops_tokens=False,
        top_k=3,
    ),
    # Everything random in training: input jitter, logit noise, expert
    # dropout.
    MoECase(
        "noisy_router_expert_dropout",
        _sparse_moe(
            top_k=2, expert_dropout=0.2, capacity_factor=1.25,
            min_capacity=1,
            router=lambda seed: TopKRouter(
                NUM_EXPERTS, 2, jitter_noise=0.1, logit_noise_std=0.5,
                seed=seed,
            ),
        ),
        stochastic=True,
    ),
)


# Overrides that only mean something to a routing layer.
_ROUTING_OVERRIDES = ("z_loss_weight", "load_balance_loss_weight", "group_size")


def _unrouted(factory):
    """A factory that ignores `_ROUTING_OVERRIDES` (no routing, no loss)."""

    def make(**overrides):
        for name in _ROUTING_OVERRIDES:
            overrides.pop(name, None)
        return factory(**overrides)

    return make


MOE_CASES += (
    # Expert choice (every expert takes its top-C tokens of a group) in
    # groups that do not divide the tokens, beside a gated shared expert.
    MoECase(
        "expert_choice_shared_gated",
        _sparse_moe(
            top_k=2, capacity_factor=1.0, eval_capacity_factor=0.75,
            min_capacity=1, group_size=5, num_shared_experts=1,
            shared_intermediate_dim=4, shared_expert_gate=True,
            router=lambda seed: ExpertChoiceRouter(NUM_EXPERTS, 2, seed=seed),
        ),
        routing=EXPERT_CHOICE,
    ),
    # DeepSeek-V3: sigmoid scores, a selection bias moved after every
    # training call (fast here, so it moves in a few steps), scaled weights,
    # the sequence-wise loss; dropless (sorted rows, grouped matmul) and two
    # shared experts.
    MoECase(
        "bias_balanced_dropless_shared",
        _sparse_moe(
            top_k=2, capacity_factor=None, eval_capacity_factor=None,
            num_shared_experts=2,
            router=lambda seed: BiasBalancedRouter(
                NUM_EXPERTS, 2, bias_update_rate=0.05,
                routed_scaling_factor=2.5, sequence_balance_loss_weight=1e-3,
                seed=seed,
            ),
        ),
        drops_tokens=False,
        saturates=False,
    ),
    # Shazeer et al.'s noisy top-k (learned noise, importance and load
    # losses) with V-MoE's batch prioritized slots at tight capacity.
    MoECase(
        "noisy_top_k_batch_prioritized",
        _sparse_moe(
            top_k=2, capacity_factor=1.0, eval_capacity_factor=1.0,
            min_capacity=1, priority="batch_prioritized",
            router=lambda seed: NoisyTopKRouter(NUM_EXPERTS, 2, seed=seed),
        ),
        stochastic=True,
    ),
    # The dense mixture: SwiGLU experts on every token, a jittered gate,
    # expert dropout.
    MoECase(
        "dense_moe",
        _unrouted(
            lambda **overrides: DenseMoE(
                NUM_EXPERTS, 8, gated=True, activation="silu",
                router_jitter_noise=0.1, expert_dropout=0.2, **overrides,
            )
        ),
        drops_tokens=False,
        stochastic=True,
        routing=None,
    ),
    # Soft MoE: two slots per expert, soft combinations of all tokens.
    MoECase(
        "soft_moe",
        _unrouted(
            lambda **overrides: SoftMoE(
                NUM_EXPERTS, 8, slots_per_expert=2, activation="relu",
                **overrides,
            )
        ),
        drops_tokens=False,
        routing=None,
        router_kernel=lambda layer: layer.slot_kernel,
    ),
)


def moe_case_parameters(cases=MOE_CASES):
    """`parameterized.named_parameters` arguments, one per case."""
    return [(case.name, case) for case in cases]


def dense_cases():
    """(name, factory) of the non-routing blocks: `FeedForward`, `ExpertFFN`.

    `ExpertFFN` takes `(E, C, d)` buffers; the factory wraps nothing, so
    callers give it `(NUM_EXPERTS, C, d)` inputs.
    """
    return (
        (
            "feed_forward_geglu",
            lambda **overrides: FeedForward(
                intermediate_dim=8, gated=True, activation="gelu", **overrides
            ),
        ),
        (
            "expert_ffn",
            lambda **overrides: ExpertFFN(
                NUM_EXPERTS, intermediate_dim=8, activation="relu", **overrides
            ),
        ),
    )
