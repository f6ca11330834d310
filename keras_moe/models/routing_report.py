"""Where a trained model sends each token: routing decisions of its MoE blocks."""

import keras
import numpy as np
from keras import ops

from keras_moe.models.transformer_block import TransformerBlock


def moe_blocks(model):
    """The `TransformerBlock`s of `model` whose feed-forward is an MoE layer."""
    return [
        layer
        for layer in model._flatten_layers(include_self=False, recursive=True)
        if isinstance(layer, TransformerBlock) and layer.is_moe
    ]


class _BlockRouting(keras.layers.Layer):
    """Outputs a block's routing decisions, so `predict` can compute them."""

    def __init__(self, block, **kwargs):
        super().__init__(**kwargs)
        self.block = block
        self.supports_masking = True

    def call(self, inputs, mask=None):
        decisions = self.block.route(inputs, mask=mask)
        if mask is None:
            valid = ops.ones(ops.shape(inputs)[:2], dtype="int32")
        else:
            valid = ops.cast(mask, "int32")
        return [
            ops.cast(decisions["expert_index"], "int32"),
            ops.cast(decisions["combine_weights"], "float32"),
            ops.cast(decisions["kept"], "int32"),
            valid,
        ]

    def compute_output_spec(self, inputs, mask=None):
        batch, tokens = inputs.shape[:2]
        top_k = self.block.feed_forward.top_k
        return [
            keras.KerasTensor((batch, tokens, top_k), dtype="int32"),
            keras.KerasTensor((batch, tokens, top_k), dtype="float32"),
            keras.KerasTensor((batch, tokens, top_k), dtype="int32"),
            keras.KerasTensor((batch, tokens), dtype="int32"),
        ]

    def compute_mask(self, inputs, mask=None):
        return None


def routing_decisions(model, inputs, batch_size=256):
    """Routing decisions of every MoE block of `model` for `inputs`.

    Runs `model` in inference mode up to each MoE `TransformerBlock` and asks
    the block where its MoE layer sends each token (`TransformerBlock.route`,
    with the capacity of inference), all in one compiled `predict`. Padding
    is what the model's Keras mask says (e.g. `Embedding(mask_zero=True)`,
    as in `keras_moe.models.text_classifier`). Works for the functional
    models of `keras_moe.models` and any functional model that calls its MoE
    `TransformerBlock`s once each.

    Args:
        model: a functional `keras.Model`.
        inputs: the model's input, a NumPy array `(num_examples, ...)`.
        batch_size: int, examples per forward pass.

    Returns:
        `{block name: decisions}`, in model order; `decisions` is a dict of
        NumPy arrays: `"expert_index"` int `(num_examples, tokens, k)`,
        `"combine_weights"` `(num_examples, tokens, k)`, `"kept"` bool
        `(num_examples, tokens, k)` (false where dropped at capacity or
        padding), and `"valid"` bool `(num_examples, tokens)` (false for
        padding).

    Example:

    ```python
    decisions = routing_decisions(model, x_test[:256])
    first = decisions["block_1"]["expert_index"][..., 0]  # (256, tokens)
    ```
    """
    blocks = moe_blocks(model)
    if not blocks:
        raise ValueError(
            f"Model {model.name!r} has no TransformerBlock with an MoE "
            "feed-forward, so there are no routing decisions to report."
        )
    outputs = []
    for block in blocks:
        outputs.extend(_BlockRouting(block)(block.input))
    routing_model = keras.Model(model.input, outputs)
    arrays = routing_model.predict(
        np.asarray(inputs), batch_size=batch_size, verbose=0
    )
    results = {}
    for index, block in enumerate(blocks):
        expert_index, weights, kept, valid = arrays[4 * index : 4 * index + 4]
        results[block.name] = {
            "expert_index": expert_index,
            "combine_weights": weights,
            "kept": kept.astype(bool),
            "valid": valid.astype(bool),
        }
    return results
