"""Sparse upcycling: turn a dense feed-forward block into a SparseMoE.

Komatsuzaki et al. (2022) start a Mixture-of-Experts model from a trained
dense one: every expert of an MoE layer is a copy of the dense block it
replaces, and only the router is new. The upcycled layer computes exactly
what the dense block did as long as, for every token, the combine weights of
its kept assignments sum to 1 and no assignment is dropped: each expert then
returns the dense output and the weighted sum is that output again. That
holds for

- a `TopKRouter` with `normalize_weights=True` (or
  `softmax_after_top_k=True`), a `NoisyTopKRouter` with either at inference,
  or a `BiasBalancedRouter` with `normalize_weights=True` and
  `routed_scaling_factor=1`;
- no dropping: `capacity_factor=None` and `eval_capacity_factor=None` (or
  factors large enough that no expert overflows);
- no shared experts (they would be fresh weights added on top).

`upcycle_feed_forward` uses such a router and dropless capacity by default;
pass other `SparseMoE` arguments to change them (e.g. `capacity_factor=1.25`
to train with drops; the layer then matches the dense block exactly only at
inference). Expert choice is exact only with `capacity_factor=None` (every
expert takes every token, and the softmax weights sum to 1).

Model-level upcycling builds on the two layer-level pieces:
`copy_feed_forward_into_experts(feed_forward, moe)` fills the experts of an
existing, built `SparseMoE` (e.g. the one in the same place of an MoE model
built from the dense model's configuration), and `upcycle_feed_forward`
returns a new built `SparseMoE`. `upcycle_model` does the whole walk for
Sequential and Functional models whose `FeedForward` layers are top-level
layers.

Reference:
    Komatsuzaki et al., 2022, "Sparse Upcycling: Training Mixture-of-Experts
    from Dense Checkpoints".
"""

import keras
import numpy as np

from keras_moe._checks import check_positive_int
from keras_moe.layers.feed_forward import FeedForward
from keras_moe.layers.sparse_moe import SparseMoE
from keras_moe.layers.top_k_router import TopKRouter

# Weight names shared by FeedForward and one expert of ExpertFFN.
_FEED_FORWARD_WEIGHTS = (
    "intermediate_kernel",
    "intermediate_bias",
    "gate_kernel",
    "gate_bias",
    "output_kernel",
    "output_bias",
)


def _check_feed_forward(feed_forward):
    if not isinstance(feed_forward, FeedForward):
        raise ValueError(
            "Received an invalid value for `feed_forward`, expected a "
            "`keras_moe.FeedForward` layer. Received: "
            f"feed_forward={feed_forward!r}"
        )
    if not feed_forward.built:
        raise ValueError(
            "The FeedForward layer to upcycle must be built (called once, "
            "or loaded with its weights). Received: "
            f"feed_forward={feed_forward.name!r} with built=False"
        )


def copy_feed_forward_into_experts(feed_forward, moe):
    """Copies a dense block's weights into every expert of a built SparseMoE.

    Args:
        feed_forward: a built `keras_moe.FeedForward`.
        moe: a built `keras_moe.SparseMoE` (or any layer with an `experts`
            `ExpertFFN`) with the same `intermediate_dim`, `gated`,
            `use_bias` and `d_model`.

    Raises:
        ValueError: when the two blocks do not have the same shapes.
    """
    _check_feed_forward(feed_forward)
    experts = moe.experts
    for attribute in ("intermediate_dim", "gated", "use_bias"):
        if getattr(feed_forward, attribute) != getattr(experts, attribute):
            raise ValueError(
                f"The experts' `{attribute}` must match the FeedForward's. "
                f"Received: feed_forward.{attribute}="
                f"{getattr(feed_forward, attribute)!r} and experts."
                f"{attribute}={getattr(experts, attribute)!r}"
            )
    for name in _FEED_FORWARD_WEIGHTS:
        source = getattr(feed_forward, name)
        target = getattr(experts, name)
        if source is None:
            continue
        value = np.asarray(keras.ops.convert_to_numpy(source))
        expected = tuple(target.shape)
        if expected[1:] != value.shape:
            raise ValueError(
                f"`{name}` of the experts has shape {expected}, which does "
                f"not stack the FeedForward's {value.shape}: d_model must "
                "match."
            )
        target.assign(np.broadcast_to(value, expected).astype(target.dtype))


def upcycle_feed_forward(
    feed_forward,
    num_experts,
    top_k=2,
    router=None,
    capacity_factor=None,
    eval_capacity_factor=None,
    name=None,
    **moe_kwargs,
):
    """A new SparseMoE whose experts are all copies of `feed_forward`.

    The experts take the dense block's `intermediate_dim`, activation,
    gating, biases, initializers, regularizers and dropout (as
    `expert_dropout`); the router is freshly initialised. With the defaults
    (a `TopKRouter` with `normalize_weights=True`, no dropping) the result
    computes exactly what `feed_forward` does, up to float round-off, until
    training moves the experts apart (see the module docstring for which
    other settings keep that).

    Args:
        feed_forward: a built `keras_moe.FeedForward`.
        num_experts: int, number of experts E.
        top_k: int, experts per token.
        router: None (`TopKRouter(num_experts, top_k,
            normalize_weights=True)`), or any `router` argument of
            `SparseMoE`.
        capacity_factor: `SparseMoE`'s capacity factor in training (default
            None: drop nothing).
        eval_capacity_factor: at inference (default None: drop nothing).
        name: name of the new layer (default: the FeedForward's name).
        **moe_kwargs: further `SparseMoE` arguments (`group_size`,
            `load_balance_loss_weight`, `causal`, `seed`, ...).

    Returns:
        A built `SparseMoE` for the same `d_model`.

    Example:

    >>> dense = keras_moe.FeedForward(intermediate_dim=32)
    >>> x = np.random.normal(size=(2, 5, 8)).astype("float32")
    >>> y = dense(x)
    >>> moe = upcycle_feed_forward(dense, num_experts=4, top_k=2)
    >>> bool(np.allclose(moe(x), y, atol=1e-5))
    True
    """
    _check_feed_forward(feed_forward)
    check_positive_int("num_experts", num_experts)
    for key in ("intermediate_dim", "activation", "gated", "use_bias"):
        if key in moe_kwargs:
            raise ValueError(
                f"`{key}` comes from the FeedForward being upcycled and "
                f"cannot be overridden. Received: {key}={moe_kwargs[key]!r}"
            )
    if router is None:
        check_positive_int("top_k", top_k)
        if top_k > num_experts:
            raise ValueError(
                "Received an invalid value for `top_k`, expected "
                f"1 <= top_k <= num_experts={num_experts}. Received: "
                f"top_k={top_k}"
            )
        router = TopKRouter(
            num_experts, top_k, normalize_weights=True,
            seed=moe_kwargs.get("seed"), name="router",
        )
    moe_kwargs.setdefault("expert_dropout", feed_forward.dropout)
    for key in (
        "kernel_initializer",
        "bias_initializer",
        "kernel_regularizer",
        "bias_regularizer",
    ):
        moe_kwargs.setdefault(key, getattr(feed_forward, key))
    moe = SparseMoE(
        num_experts=num_experts,
        intermediate_dim=feed_forward.intermediate_dim,
        top_k=top_k,
        activation=feed_forward.activation,
        gated=feed_forward.gated,
        use_bias=feed_forward.use_bias,
        router=router,
        capacity_factor=capacity_factor,
        eval_capacity_factor=eval_capacity_factor,
        name=name or feed_forward.name,
        dtype=moe_kwargs.pop("dtype", feed_forward.dtype_policy),
        **moe_kwargs,
    )
    model_dim = feed_forward.intermediate_kernel.shape[0]
    moe.build((None, model_dim))
    copy_feed_forward_into_experts(feed_forward, moe)
    return moe


def upcycle_model(model, num_experts, top_k=2, select=None, **moe_kwargs):
    """A copy of `model` with its FeedForward layers upcycled to SparseMoE.

    Clones a Sequential or Functional model: every top-level
    `keras_moe.FeedForward` layer (for which `select(layer)` is true, if
    given) becomes `upcycle_feed_forward(layer, num_experts, top_k,
    **moe_kwargs)`, and every other layer is a copy with the original's
    weights. The original model is left unchanged. FeedForward layers
    nested inside other layers (e.g. transformer blocks) are not reached:
    build the MoE model from its configuration and call
    `copy_feed_forward_into_experts` on each pair instead.

    Args:
        model: a built Sequential or Functional `keras.Model`.
        num_experts: int, experts per upcycled layer.
        top_k: int, experts per token.
        select: optional callable `layer -> bool` choosing which FeedForward
            layers to upcycle (e.g. every other one, as in the paper).
        **moe_kwargs: further arguments of `upcycle_feed_forward`.

    Returns:
        A new model of the same type; before training it computes what
        `model` computes (with the default dropless, renormalised routing).
    """
    # clone_model rebuilds the layer graph, which subclassed models lack.
    if not (
        isinstance(model, keras.Sequential)
        or type(model).__name__ == "Functional"
    ):
        raise ValueError(
            "Received an invalid value for `model`, expected a built "
            "Sequential or Functional keras.Model. Received: "
            f"model={model!r}"
        )
    copies = []

    def clone(layer):
        if isinstance(layer, FeedForward) and (select is None or select(layer)):
            return upcycle_feed_forward(layer, num_experts, top_k, **moe_kwargs)
        copy = layer.__class__.from_config(layer.get_config())
        copies.append((layer, copy))
        return copy

    upcycled = keras.models.clone_model(model, clone_function=clone)
    # Operations such as `ops.add` in a Functional graph hold no weights.
    for original, copy in copies:
        if isinstance(original, keras.layers.Layer):
            copy.set_weights(original.get_weights())
    return upcycled
