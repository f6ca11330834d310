"""The layer configurations every reliability test runs over.

Each `MoECase` makes a fresh MoE layer; the tests in this folder are
parametrised over `MOE_CASES` (and `dense_cases()` for the dense blocks), so a
new router or MoE layer is covered by the whole reliability suite once it has
an entry here. A case's factory must accept the keyword overrides the tests
pass: `seed`, `dtype`, `name`, `z_loss_weight`, `load_balance_loss_weight`
(a layer without a loss can ignore the last two).

What the tests need from a case's layer, beyond being a Keras layer
`(batch, ..., d) -> (batch, ..., d)`:
- `routing_statistics()` (dict of finite values, `"steps"` included) and
  `reset_routing_statistics()`;
- `route(inputs, mask=None, training=False)` returning at least
  `"expert_index"`, `"combine_weights"` and `"kept"`, when
  `case.has_route` (token-choice routing);
- `case.router_kernel(layer)`: the float32 variable that maps tokens to router
  logits, when `case.has_router_kernel` (the low-precision tests set it by
  hand to produce logits of magnitude 1e4).
"""

import dataclasses
from typing import Callable

import keras

from keras_moe import ExpertFFN
from keras_moe import FeedForward
from keras_moe import SparseMoE
from keras_moe import TopKRouter

# Experts in every case; small so that every expert is exercised.
NUM_EXPERTS = 4


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
        has_route: the layer has `route()` (see the module docstring).
        has_router_kernel: `router_kernel(layer)` gives the router's
            `(d, E)` kernel.
        top_k: experts per token.
    """

    name: str
    make: Callable[..., keras.layers.Layer]
    drops_tokens: bool = True
    stochastic: bool = False
    has_route: bool = True
    has_router_kernel: bool = True
    top_k: int = 2

    def router_kernel(self, layer):
        return layer.router.kernel


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
