"""How big an MoE model is: total vs active parameters, FLOPs per token, routing maps.

MoE models are described by two sizes: all their parameters, and the ones
a single token uses (Mixtral 8x7B: 47B total, 13B active). The functions
here count both for any Keras model containing `SparseMoE` layers by walking
its layers, with the same conventions as those reports:

- Expert weights (those of an `ExpertFFN` inside an MoE layer) count in
  full in the total, and `top_k / num_experts` of them per token (with
  expert choice routing, `capacity_factor * top_k / num_experts` on
  average, at the training capacity factor). Gated experts, biases and any
  number of projections follow from the weights themselves.
- Every other weight (embeddings, attention, routers, norms, dense blocks,
  shared experts, the head) is active for every token; so are the experts
  of layers that run every expert on every token (`DenseMoE`, `SoftMoE`).
- A variable reachable twice (a layer used in two places, tied weights)
  counts once.
- The routing statistics an MoE layer keeps (non-trainable state of the
  MoE layer itself) are not parameters and are left out.
"""

import collections

import keras
import numpy as np

from keras_moe.layers.expert_ffn import ExpertFFN

ParameterCount = collections.namedtuple(
    "ParameterCount", ["total", "active", "expert_total", "expert_active"]
)
ParameterCount.__doc__ = """Parameter counts of a model.

Fields:
    total: int, all parameters.
    active: int, parameters a single token uses (non-expert parameters plus
        `top_k / num_experts` of each MoE layer's expert parameters).
    expert_total: int, parameters inside MoE experts.
    expert_active: int, expert parameters a single token uses.
"""

_NORMALIZATION_TYPES = (
    keras.layers.LayerNormalization,
    keras.layers.BatchNormalization,
    keras.layers.GroupNormalization,
    keras.layers.UnitNormalization,
)
_NORMALIZATION_NAMES = ("RMSNormalization", "LayerNorm", "RMSNorm")
_LOOKUP_TYPES = (keras.layers.Embedding,)
_LOOKUP_NAMES = ("PositionEmbedding", "ReversibleEmbedding")


def _is_moe_layer(layer):
    return hasattr(layer, "routing_statistics") and hasattr(layer, "route")


def _experts_per_token(moe_layer):
    """Experts a token uses (on average) in an MoE layer."""
    router = getattr(moe_layer, "router", None)
    if type(router).__name__ == "ExpertChoiceRouter":
        # Every expert takes C = capacity_factor * G * top_k / E tokens of a
        # group of G, so a token gets capacity_factor * top_k experts on
        # average (all E when nothing limits the capacity).
        factor = moe_layer.capacity_factor
        if factor is None:
            return float(moe_layer.num_experts)
        return min(float(moe_layer.num_experts), factor * moe_layer.top_k)
    return float(moe_layer.top_k)


def _own_variables(layer):
    """Variables created by `layer` itself (not by its sublayers)."""
    return list(layer._trainable_variables) + list(
        layer._non_trainable_variables
    )


def _children(layer):
    return list(layer._flatten_layers(include_self=False, recursive=False))


def _walk(model):
    """Yields `(layer, variable, token_fraction)` once per distinct variable.

    `token_fraction` is the fraction of tokens a variable is applied to: 1,
    or `top_k / num_experts` for expert weights. MoE routing statistics are
    skipped.
    """
    seen_layers = set()
    seen_variables = set()

    def visit(layer, expert_fraction):
        if id(layer) in seen_layers:
            return
        seen_layers.add(id(layer))
        is_moe = _is_moe_layer(layer)
        fraction = expert_fraction
        if isinstance(layer, ExpertFFN) and expert_fraction is None:
            # Experts outside any MoE layer: every token uses all of them.
            fraction = 1.0
        for variable in _own_variables(layer):
            if id(variable) in seen_variables:
                continue
            seen_variables.add(id(variable))
            if is_moe and not variable.trainable:
                continue  # routing statistics, not parameters
            yield layer, variable, (
                fraction if isinstance(layer, ExpertFFN) else 1.0
            )
        for child in _children(layer):
            child_fraction = expert_fraction
            if is_moe and isinstance(child, ExpertFFN):
                child_fraction = _experts_per_token(layer) / child.num_experts
            yield from visit(child, child_fraction)

    yield from visit(model, None)


def _size(variable):
    return int(np.prod(variable.shape))


def count_parameters(model):
    """Total and active (per token) parameters of a model with MoE layers.

    Args:
        model: a built Keras layer or model.

    Returns:
        A `ParameterCount(total, active, expert_total, expert_active)` of
        ints (active counts are rounded to the nearest integer).

    Example:

    >>> moe = keras_moe.SparseMoE(num_experts=8, intermediate_dim=32, top_k=2)
    >>> moe.build((None, 16))
    >>> count_parameters(moe)
    ParameterCount(total=8704, active=2272, expert_total=8576, expert_active=2144)
    """
    if not model.built:
        raise ValueError(
            f"Layer {model.name!r} is not built: call it on data (or build "
            "it) before counting its parameters."
        )
    total = active = expert_total = expert_active = 0.0
    for layer, variable, fraction in _walk(model):
        size = _size(variable)
        total += size
        active += fraction * size
        if isinstance(layer, ExpertFFN):
            expert_total += size
            expert_active += fraction * size
    return ParameterCount(
        int(total), int(round(active)), int(expert_total), int(round(expert_active))
    )


def _is_lookup(layer):
    return isinstance(layer, _LOOKUP_TYPES) or type(layer).__name__ in (
        _LOOKUP_NAMES
    )


def _is_normalization(layer):
    return isinstance(layer, _NORMALIZATION_TYPES) or type(layer).__name__ in (
        _NORMALIZATION_NAMES
    )


def _applies_per_example(layer):
    """True for layers of a functional graph whose input has no token axis."""
    try:
        shape = layer.input.shape
    except (AttributeError, ValueError):
        return False  # nested in another layer, or called several times
    return isinstance(shape, tuple) and len(shape) == 2


def _sequence_length_of(model):
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.MultiHeadAttention):
            shapes = getattr(layer, "_build_shapes_dict", None) or {}
            for shape in shapes.values():
                if shape is not None and len(shape) == 3 and shape[1]:
                    return int(shape[1])
    return None


def flops_per_token(model, sequence_length=None):
    """Forward-pass FLOPs per token of a model with MoE layers.

    A multiply-add counts as 2 FLOPs. Per token:
    - each kernel applied to the token (Dense, EinsumDense, convolutions as
      patch embeddings, `FeedForward`, routers): `2 * kernel size`, plus
      `bias size` for its biases (weights named `bias` or `*_bias`);
    - MoE experts: `top_k` experts' kernels and biases (via the active
      fraction `top_k / num_experts` of the stacked expert weights);
    - attention: the projections as kernels above, plus `2 * T * H * key_dim`
      for the scores and `2 * T * H * value_dim` for the weighted values,
      with `T = sequence_length` the context each token attends to (the full
      length also for causal attention, as in Kaplan et al., 2020);
    - embedding lookups (and learned tokens such as a class token),
      normalisations, activations, softmaxes and residual sums count 0;
    - layers of a functional model that run once per example (a classifier
      head after pooling) count `1 / sequence_length` of their FLOPs.
    A layer object is counted once even if the model calls it several times.

    Args:
        model: a built Keras model.
        sequence_length: int, tokens per example. Needed when the model has
            attention or a per-example head and it cannot be read from the
            model's shapes (models with a variable-length input).

    Returns:
        float, forward FLOPs per token.

    Example:

    ```python
    model = keras_moe.models.text_classifier(num_classes=2, sequence_length=128)
    flops_per_token(model, sequence_length=128)
    ```
    """
    if not model.built:
        raise ValueError(
            f"Layer {model.name!r} is not built: call it on data (or build "
            "it) before counting its FLOPs."
        )
    if sequence_length is None:
        sequence_length = _sequence_length_of(model)
    per_layer = collections.defaultdict(float)
    layers = {}
    for layer, variable, fraction in _walk(model):
        layers[id(layer)] = layer
        if _is_lookup(layer) or _is_normalization(layer):
            continue
        name = variable.name
        if name == "bias" or name.endswith("_bias"):
            # One add per bias value; expert biases are (E, h), attention
            # biases (heads, head_dim).
            per_layer[id(layer)] += fraction * _size(variable)
        elif len(variable.shape) >= 2 and not name.endswith("token"):
            # A kernel: one multiply-add per weight per token.
            per_layer[id(layer)] += 2.0 * fraction * _size(variable)
        elif len(variable.shape) == 1:
            # An element-wise scale (e.g. of a layer not known here).
            per_layer[id(layer)] += fraction * _size(variable)
    for layer in model._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.MultiHeadAttention):
            if sequence_length is None:
                raise ValueError(
                    "The model has attention, whose FLOPs per token depend "
                    "on the sequence length, and its inputs have no fixed "
                    "length. Pass `sequence_length`."
                )
            layers[id(layer)] = layer
            per_layer[id(layer)] += (
                2.0 * sequence_length * layer.num_heads
                * (layer.key_dim + (layer.value_dim or layer.key_dim))
            )
    total = 0.0
    for key, flops in per_layer.items():
        if _applies_per_example(layers[key]):
            if sequence_length is None:
                raise ValueError(
                    f"Layer {layers[key].name!r} runs once per example; pass "
                    "`sequence_length` to spread its FLOPs over the tokens."
                )
            flops /= sequence_length
        total += flops
    return total


# === Routing maps ===


def routing_map(expert_index, groups, num_groups, num_experts, valid=None):
    """Fraction of each group's token-to-expert assignments per expert.

    Args:
        expert_index: int array `(..., k)`, chosen experts per token (e.g.
            from `keras_moe.models.routing_decisions` or `SparseMoE.route`).
        groups: int array of the token axes `(...)` (a class or domain per
            token, e.g. an example's label broadcast over its tokens), or
            `(num_examples,)` when `expert_index` is `(num_examples, tokens,
            k)` (one group per example).
        num_groups: int, number of groups G.
        num_experts: int, number of experts E.
        valid: optional bool array of the token axes, false for padding.

    Returns:
        float array `(G, E)`: row g is the share of group g's assignments
        (all k choices of its valid tokens) that went to each expert; rows
        of groups without tokens are zeros.

    Example:

    >>> routing_map(np.array([[[0], [1]], [[1], [1]]]), np.array([0, 1]), 2, 2)
    array([[0.5, 0.5],
           [0. , 1. ]])
    """
    expert_index = np.asarray(expert_index)
    token_shape = expert_index.shape[:-1]
    groups = np.asarray(groups)
    if groups.shape != token_shape:
        if groups.shape == token_shape[:1]:
            groups = np.broadcast_to(
                groups.reshape((-1,) + (1,) * (len(token_shape) - 1)),
                token_shape,
            )
        else:
            raise ValueError(
                "`groups` must have the token shape of `expert_index` "
                f"{token_shape} or one value per example "
                f"{token_shape[:1]}. Received: groups.shape={groups.shape}"
            )
    if valid is None:
        valid = np.ones(token_shape, bool)
    valid = np.broadcast_to(np.asarray(valid, bool), token_shape)
    counts = np.zeros((num_groups, num_experts))
    choices = expert_index[valid]  # (valid tokens, k)
    token_groups = groups[valid]  # (valid tokens,)
    for choice in range(expert_index.shape[-1]):
        np.add.at(counts, (token_groups, choices[:, choice]), 1.0)
    totals = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, totals, out=np.zeros_like(counts), where=totals > 0)


BYTE_KINDS = ("lowercase", "uppercase", "digit", "space", "punctuation", "newline")


def byte_kinds(token_ids):
    """The kind of each byte token, indexing `BYTE_KINDS`.

    Args:
        token_ids: int array of byte values, any shape.

    Returns:
        int array of the same shape: 0 lowercase letter, 1 uppercase letter,
        2 digit, 3 space, 4 punctuation and everything else, 5 newline.

    Example:

    >>> byte_kinds(np.frombuffer(b"aZ3 .\\n", np.uint8))
    array([0, 1, 2, 3, 4, 5])
    """
    token_ids = np.asarray(token_ids)
    kinds = np.full(token_ids.shape, 4)
    kinds[(token_ids >= ord("a")) & (token_ids <= ord("z"))] = 0
    kinds[(token_ids >= ord("A")) & (token_ids <= ord("Z"))] = 1
    kinds[(token_ids >= ord("0")) & (token_ids <= ord("9"))] = 2
    kinds[token_ids == ord(" ")] = 3
    kinds[token_ids == ord("\n")] = 5
    return kinds
