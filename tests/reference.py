"""A naive NumPy Mixture-of-Experts, one token at a time, to test against.

Written to be obviously right rather than fast: explicit loops over groups,
choices and tokens, float64 throughout.
"""

import math

import numpy as np

_ERF = np.vectorize(math.erf)

ACTIVATIONS = {
    "relu": lambda x: np.maximum(x, 0.0),
    "gelu": lambda x: 0.5 * x * (1.0 + _ERF(x / math.sqrt(2.0))),
    "silu": lambda x: x / (1.0 + np.exp(-x)),
    "linear": lambda x: x,
}


def softmax(x):
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def naive_route(tokens, router_kernel, top_k, router_bias=None):
    """Top-k over the softmax, ties to the lower index. tokens (T, d)."""
    logits = tokens.astype(np.float64) @ router_kernel.astype(np.float64)
    if router_bias is not None:
        logits = logits + router_bias
    probs = softmax(logits)
    index = np.argsort(-probs, axis=-1, kind="stable")[:, :top_k]
    weights = np.take_along_axis(probs, index, axis=-1)
    return logits, probs, index, weights


def naive_expert(token, e, weights, activation, gated):
    """One expert on one token (d,) -> (d,)."""
    act = ACTIVATIONS[activation]
    hidden = token @ weights["intermediate_kernel"][e]
    if "intermediate_bias" in weights:
        hidden = hidden + weights["intermediate_bias"][e]
    if gated:
        gate = token @ weights["gate_kernel"][e]
        if "gate_bias" in weights:
            gate = gate + weights["gate_bias"][e]
        hidden = act(gate) * hidden
    else:
        hidden = act(hidden)
    out = hidden @ weights["output_kernel"][e]
    if "output_bias" in weights:
        out = out + weights["output_bias"][e]
    return out


def naive_capacity(group_size, num_experts, top_k, capacity_factor, min_capacity):
    if capacity_factor is None:
        return group_size
    capacity = math.ceil(capacity_factor * group_size * top_k / num_experts)
    return min(group_size, max(min_capacity, capacity))


def naive_moe(
    inputs,
    router_kernel,
    expert_weights,
    top_k,
    capacity_factor,
    min_capacity=4,
    group_size=None,
    mask=None,
    activation="gelu",
    gated=False,
    priority="k_major",
):
    """Reference forward pass of SparseMoE (token choice, `TopKRouter`).

    `priority` orders the capacity slots of each group: `"k_major"` (every
    token's first choice, then every token's second choice, ...),
    `"token_major"` (token by token), or `"batch_prioritized"` (V-MoE:
    k-major, the tokens of each choice by decreasing top routing weight,
    ties to the lower index).

    Returns:
        (outputs shaped like inputs, kept bool (T, k), index (T, k)).
    """
    inputs = np.asarray(inputs, np.float64)
    model_dim = inputs.shape[-1]
    tokens = inputs.reshape(-1, model_dim)
    num_tokens = tokens.shape[0]
    valid = (
        np.ones(num_tokens, bool)
        if mask is None
        else np.asarray(mask, bool).reshape(-1)
    )
    num_experts = router_kernel.shape[-1]
    _, _, index, weights = naive_route(tokens, router_kernel, top_k)
    weights_f64 = {k: np.asarray(v, np.float64) for k, v in expert_weights.items()}
    group = num_tokens if group_size is None else min(group_size, num_tokens)
    capacity = naive_capacity(
        group, num_experts, top_k, capacity_factor, min_capacity
    )
    kept = np.zeros((num_tokens, top_k), bool)
    outputs = np.zeros_like(tokens)
    for start in range(0, num_tokens, group):
        members = range(start, min(start + group, num_tokens))
        if priority == "k_major":
            order = [(t, j) for j in range(top_k) for t in members]
        elif priority == "batch_prioritized":
            # sorted() is stable: equal weights keep token order.
            ranked = sorted(members, key=lambda t: -weights[t].max())
            order = [(t, j) for j in range(top_k) for t in ranked]
        elif priority == "token_major":
            order = [(t, j) for t in members for j in range(top_k)]
        else:
            raise ValueError(f"unknown priority {priority!r}")
        taken = np.zeros(num_experts, int)
        for t, j in order:
            if not valid[t]:
                continue
            e = index[t, j]
            if taken[e] < capacity:
                kept[t, j] = True
            taken[e] += 1
    for t in range(num_tokens):
        for j in range(top_k):
            if kept[t, j]:
                outputs[t] += weights[t, j] * naive_expert(
                    tokens[t], index[t, j], weights_f64, activation, gated
                )
    return outputs.reshape(inputs.shape), kept, index


def naive_expert_choice_moe(
    inputs,
    router_kernel,
    expert_weights,
    capacity,
    group_size,
    mask=None,
    activation="gelu",
    gated=False,
):
    """Reference forward pass of SparseMoE with an `ExpertChoiceRouter`.

    Per routing group of `group_size` tokens (the last one shorter), every
    expert takes the `capacity` valid tokens with the highest router
    probability for it (ties to the lower index; fewer if the group has
    fewer valid tokens) and weights its output by that probability.

    Returns:
        (outputs shaped like inputs, taken bool (T, E): expert e took
        token t).
    """
    inputs = np.asarray(inputs, np.float64)
    tokens = inputs.reshape(-1, inputs.shape[-1])
    num_tokens = tokens.shape[0]
    valid = (
        np.ones(num_tokens, bool)
        if mask is None
        else np.asarray(mask, bool).reshape(-1)
    )
    probs = softmax(tokens @ np.asarray(router_kernel, np.float64))
    weights_f64 = {k: np.asarray(v, np.float64) for k, v in expert_weights.items()}
    outputs = np.zeros_like(tokens)
    taken = np.zeros(probs.shape, bool)
    group = min(group_size or num_tokens, num_tokens)
    for start in range(0, num_tokens, group):
        members = [
            t for t in range(start, min(start + group, num_tokens)) if valid[t]
        ]
        for e in range(probs.shape[1]):
            ranked = sorted(members, key=lambda t: -probs[t, e])[:capacity]
            for t in ranked:
                taken[t, e] = True
                outputs[t] += probs[t, e] * naive_expert(
                    tokens[t], e, weights_f64, activation, gated
                )
    return outputs.reshape(inputs.shape), taken


def expert_weights_of(moe_layer):
    """The SparseMoE's expert weights as a dict of NumPy arrays."""
    return {
        variable.name: np.asarray(variable.numpy())
        for variable in moe_layer.experts.weights
    }
