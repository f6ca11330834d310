"""TransformerBlock: a pre-norm transformer block with a pluggable feed-forward."""

import inspect

import keras
from keras import ops

from keras_moe._checks import check_positive_int
from keras_moe._checks import check_rate
from keras_moe.api_export import keras_moe_export
from keras_moe.layers.expert_ffn import clone_initializer
from keras_moe.layers.feed_forward import FeedForward
from keras_moe.layers.sparse_moe import SparseMoE


def is_routed(layer):
    """True for feed-forward layers that route tokens (`SparseMoE` and alike)."""
    return hasattr(layer, "route") and hasattr(layer, "routing_statistics")


def _takes_mask(layer):
    return "mask" in inspect.signature(layer.call).parameters


def feed_forward_layer(
    use_moe,
    intermediate_dim,
    num_experts=8,
    top_k=2,
    capacity_factor=1.25,
    dense_intermediate_dim=None,
    activation="gelu",
    gated=False,
    causal=False,
    moe_options=None,
    seed=None,
    name="feed_forward",
):
    """A `SparseMoE`, or the `FeedForward` with the same active size.

    The dense block gets `dense_intermediate_dim = top_k * intermediate_dim`
    hidden units by default, so that a token passes through as many expert
    hidden units in the MoE block as in the dense one: the MoE model and its
    dense baseline then cost the same per token (plus the small router).

    Args:
        use_moe: bool, a `SparseMoE` (True) or a `FeedForward` (False).
        intermediate_dim: int, hidden width of each expert.
        num_experts: int, experts of the `SparseMoE`.
        top_k: int, experts per token.
        capacity_factor: float > 0 or None, training capacity factor.
        dense_intermediate_dim: int or None (`top_k * intermediate_dim`),
            hidden width of the dense block.
        activation: activation of the experts and the dense block.
        gated: bool, gated (GLU) experts and dense block.
        causal: bool, the `SparseMoE` is in an autoregressive model
            (`SparseMoE(causal=True)`, which refuses routers that compare
            tokens).
        moe_options: optional dict of further `SparseMoE` arguments, e.g.
            `{"router": TopKRouter(8, 2, normalize_weights=True),
            "load_balance_loss_weight": 1e-2, "group_size": 128}`.
        seed: optional int seed.
        name: str, the layer name.

    Returns:
        A `SparseMoE` or a `FeedForward` layer.

    Example:

    >>> moe = feed_forward_layer(True, intermediate_dim=64, top_k=2)
    >>> dense = feed_forward_layer(False, intermediate_dim=64, top_k=2)
    >>> moe.intermediate_dim, dense.intermediate_dim
    (64, 128)
    """
    if use_moe:
        options = dict(moe_options or {})
        for key in ("num_experts", "intermediate_dim", "top_k"):
            if key in options:
                raise ValueError(
                    f"`moe_options` must not set `{key}`, which is an "
                    f"argument of its own. Received: moe_options={options!r}"
                )
        if options.get("causal", causal) != causal:
            raise ValueError(
                "`moe_options` sets `causal` against the model: a causal "
                "model needs `SparseMoE(causal=True)` and an encoder "
                f"`causal=False`. Received: moe_options={options!r}, "
                f"causal={causal}"
            )
        options.update(causal=causal)
        options.setdefault("capacity_factor", capacity_factor)
        options.setdefault("activation", activation)
        options.setdefault("gated", gated)
        options.setdefault("seed", seed)
        return SparseMoE(
            num_experts=num_experts,
            intermediate_dim=intermediate_dim,
            top_k=top_k,
            name=name,
            **options,
        )
    check_positive_int("intermediate_dim", intermediate_dim)
    check_positive_int("top_k", top_k)
    if dense_intermediate_dim is None:
        dense_intermediate_dim = top_k * intermediate_dim
    check_positive_int("dense_intermediate_dim", dense_intermediate_dim)
    return FeedForward(
        intermediate_dim=dense_intermediate_dim,
        activation=activation,
        gated=gated,
        seed=seed,
        name=name,
    )


@keras_moe_export
class TransformerBlock(keras.layers.Layer):
    """Pre-norm transformer block: self-attention, then a feed-forward block.

    ```
    x = x + dropout(attention(layer_norm(x)))
    x = x + dropout(feed_forward(layer_norm(x)))
    ```

    The feed-forward block is any layer mapping `(batch, tokens, d_model)`
    to the same shape, kept as the `feed_forward` attribute: a `SparseMoE`
    makes this an MoE block (Switch Transformer, Mixtral, V-MoE), a
    `FeedForward` the dense block it replaces. `feed_forward_layer(...)`
    makes either with the same active size, and sparse upcycling can swap a
    `FeedForward` for a `SparseMoE` initialised from it
    (`replace_feed_forward`); `get_config` serialises whatever layer
    `feed_forward` holds.

    Padding (a Keras mask, e.g. from `Embedding(mask_zero=True)`, or the
    `mask` argument): padded tokens are not attended to, are not routed by a
    `SparseMoE` (they take no capacity and do not count in the balancing
    losses), and their outputs are meaningless; the mask is passed on.

    Causal blocks (`causal=True`, decoder-only language models) use a causal
    attention mask and need a causal feed-forward (`SparseMoE(causal=True)`,
    which fills expert capacity in token order and refuses routers that
    compare tokens). When that layer routes the whole batch as one group
    (`group_size=None`), the block hands it the tokens position by
    position, `(tokens, batch, d_model)`, so that capacity is given out in
    position order across the batch: no output at position t depends on any
    token after t, in any sequence of the batch. With a `group_size` that
    divides the sequence length (one or more groups per sequence, as expert
    parallelism needs) each sequence depends only on its own earlier tokens.

    Args:
        num_heads: int, attention heads.
        feed_forward: the feed-forward layer (`SparseMoE`, `FeedForward`, or
            any layer `(batch, tokens, d) -> (batch, tokens, d)`), or its
            serialised config.
        key_dim: int or None (`d_model // num_heads`), size of each head.
        dropout: float in [0, 1), dropout on the outputs of the attention
            and feed-forward blocks before each residual sum.
        attention_dropout: float in [0, 1), dropout on attention weights.
        causal: bool, causal self-attention (and causal routing).
        layer_norm_epsilon: float, epsilon of the layer normalisations.
        kernel_initializer: initializer of the attention kernels.
        seed: optional int seed for the dropout layers.
        **kwargs: base `Layer` arguments.

    Call arguments:
        inputs: `(batch, tokens, d_model)`.
        mask: optional bool `(batch, tokens)`, false for padding; Keras
            passes the Keras mask of `inputs` here by itself.
        training: bool, enables dropout (and routing statistics and losses
            of a `SparseMoE`).

    Returns:
        `(batch, tokens, d_model)`, with the input mask.

    Example:

    >>> from keras_moe import SparseMoE
    >>> block = TransformerBlock(
    ...     num_heads=4,
    ...     feed_forward=SparseMoE(num_experts=8, intermediate_dim=64),
    ... )
    >>> block(np.ones((2, 10, 32), "float32")).shape
    (2, 10, 32)

    References:
        - Vaswani et al., 2017, "Attention Is All You Need".
        - Xiong et al., 2020, "On Layer Normalization in the Transformer
          Architecture" (pre-norm).
        - Fedus et al., 2021, "Switch Transformers".
    """

    def __init__(
        self,
        num_heads,
        feed_forward,
        key_dim=None,
        dropout=0.0,
        attention_dropout=0.0,
        causal=False,
        layer_norm_epsilon=1e-6,
        kernel_initializer="glorot_uniform",
        seed=None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        check_positive_int("num_heads", num_heads)
        if key_dim is not None:
            check_positive_int("key_dim", key_dim)
        check_rate("dropout", dropout)
        check_rate("attention_dropout", attention_dropout)
        if not isinstance(causal, bool):
            raise ValueError(
                "Received an invalid value for `causal`, expected a bool. "
                f"Received: causal={causal!r}"
            )
        self.num_heads = num_heads
        self.key_dim = key_dim
        self.dropout = float(dropout)
        self.attention_dropout = float(attention_dropout)
        self.causal = causal
        self.layer_norm_epsilon = float(layer_norm_epsilon)
        self.kernel_initializer = keras.initializers.get(kernel_initializer)
        self.seed = seed
        self.feed_forward = self._check_feed_forward(feed_forward)
        self.supports_masking = True

    def _check_feed_forward(self, feed_forward):
        if isinstance(feed_forward, dict):
            # Built by the block's own `build`, so that its variables get the
            # same paths (`block/feed_forward/...`) as in the original model:
            # layout maps and checkpoints are keyed on them.
            feed_forward = dict(feed_forward)
            feed_forward.pop("build_config", None)
            feed_forward = keras.saving.deserialize_keras_object(feed_forward)
        if not isinstance(feed_forward, keras.layers.Layer):
            raise ValueError(
                "Received an invalid value for `feed_forward`, expected a "
                "layer such as `keras_moe.SparseMoE` or "
                "`keras_moe.FeedForward`. Received: "
                f"feed_forward={feed_forward!r}"
            )
        if self.causal and is_routed(feed_forward) and not getattr(
            feed_forward, "causal", False
        ):
            raise ValueError(
                "A causal block needs a causal MoE layer (e.g. "
                "`SparseMoE(..., causal=True)`), whose routing does not look "
                f"at later tokens. Received: feed_forward={feed_forward.name!r}"
                " with causal=False"
            )
        return feed_forward

    def replace_feed_forward(self, feed_forward):
        """Swaps the feed-forward block, e.g. for sparse upcycling.

        The new layer (built here if the block is built) takes the old one's
        place among the block's sublayers, so `block.weights`,
        `get_config()` and saving see only the new one. Compile the model
        again before training it.

        Args:
            feed_forward: the new feed-forward layer (same contract as the
                constructor argument).
        """
        feed_forward = self._check_feed_forward(feed_forward)
        if self.built and not feed_forward.built:
            feed_forward.build(self._block_input_shape)
        # Keras locks a layer's sublayers once it is built; swap the tracked
        # sublayer in place (same position), then lock again.
        tracker = self._tracker
        was_locked = tracker.locked
        tracker.unlock()
        tracker.replace_tracked_value("layers", self.feed_forward, feed_forward)
        self.feed_forward = feed_forward
        if was_locked:
            tracker.lock()
        self._feed_forward_takes_mask = _takes_mask(feed_forward)

    @property
    def is_moe(self):
        """True when the feed-forward block routes tokens to experts."""
        return is_routed(self.feed_forward)

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        if len(input_shape) != 3 or input_shape[-1] is None:
            raise ValueError(
                "TransformerBlock expects inputs (batch, tokens, d_model) with "
                f"a known d_model. Received: input_shape={input_shape}"
            )
        model_dim = input_shape[-1]
        key_dim = self.key_dim
        if key_dim is None:
            if model_dim % self.num_heads:
                raise ValueError(
                    f"d_model={model_dim} is not divisible by num_heads="
                    f"{self.num_heads}; pass `key_dim` or change one of them."
                )
            key_dim = model_dim // self.num_heads

        # === Layers ===
        def layer_norm(name):
            layer = keras.layers.LayerNormalization(
                epsilon=self.layer_norm_epsilon,
                dtype=self.dtype_policy,
                name=name,
            )
            layer.build(input_shape)
            return layer

        def dropout(name, offset):
            return keras.layers.Dropout(
                self.dropout,
                seed=self._sub_seed(offset),
                dtype=self.dtype_policy,
                name=name,
            )

        self.attention_norm = layer_norm("attention_norm")
        self.attention = keras.layers.MultiHeadAttention(
            num_heads=self.num_heads,
            key_dim=key_dim,
            dropout=self.attention_dropout,
            kernel_initializer=clone_initializer(self.kernel_initializer),
            seed=self._sub_seed(0),
            dtype=self.dtype_policy,
            name="attention",
        )
        self.attention.build(input_shape, input_shape)
        self.attention_output_dropout = dropout("attention_output_dropout", 1)
        self.feed_forward_norm = layer_norm("feed_forward_norm")
        if not self.feed_forward.built:
            self.feed_forward.build(input_shape)
        self.feed_forward_output_dropout = dropout("feed_forward_output_dropout", 2)
        self._feed_forward_takes_mask = _takes_mask(self.feed_forward)
        self._block_input_shape = input_shape

    def _sub_seed(self, offset):
        # Each random sublayer gets its own seed: two Dropout layers with the
        # same seed would drop the same units.
        return None if self.seed is None else self.seed + offset

    def _position_major(self):
        # Only one routing group for the whole batch (`group_size=None`) can
        # mix sequences; with a `group_size` dividing the sequence length
        # every group lies inside one sequence and token order is enough.
        return (
            self.causal
            and self.is_moe
            and getattr(self.feed_forward, "group_size", None) is None
        )

    def _apply_feed_forward(self, x, mask, training):
        """The feed-forward block on normalised tokens `(batch, tokens, d)`."""
        if self._position_major():
            # (batch, tokens, d) -> (tokens, batch, d): capacity slots are
            # filled in position order across the batch.
            x = ops.transpose(x, (1, 0, 2))
            mask = None if mask is None else ops.transpose(mask, (1, 0))
        if self._feed_forward_takes_mask:
            y = self.feed_forward(x, mask=mask, training=training)
        else:
            y = self.feed_forward(x, training=training)
        if self._position_major():
            y = ops.transpose(y, (1, 0, 2))
        return y

    def _attention_block(self, inputs, mask, training):
        # Self attention block.
        residual = inputs
        x = self.attention_norm(inputs)
        x = self.attention(
            x,
            x,
            value_mask=mask,
            use_causal_mask=self.causal,
            training=training,
        )  # (batch, tokens, d)
        x = self.attention_output_dropout(x, training=training)
        return x + residual

    def call(self, inputs, mask=None, training=None):
        # Keras passes the Keras mask of `inputs` here by itself.
        mask = None if mask is None else ops.cast(mask, "bool")
        x = self._attention_block(inputs, mask, training)

        # Feedforward block.
        residual = x
        x = self.feed_forward_norm(x)
        x = self._apply_feed_forward(x, mask, training)
        x = self.feed_forward_output_dropout(x, training=training)
        return x + residual

    def route(self, inputs, mask=None):
        """Routing decisions of the MoE feed-forward for `inputs` (inference).

        Runs the attention block, then asks the feed-forward layer where it
        would send each token (`SparseMoE.route`), in the same token order
        as a call.

        Args:
            inputs: `(batch, tokens, d_model)`, the block's input.
            mask: optional bool `(batch, tokens)`, false for padding.

        Returns:
            The dict of `SparseMoE.route`, token axes `(batch, tokens)`:
            `"expert_index"` `(batch, tokens, k)`, `"combine_weights"`
            `(batch, tokens, k)`, `"kept"` `(batch, tokens, k)`,
            `"router_probs"` `(batch, tokens, E)`.
        """
        if not self.is_moe:
            raise ValueError(
                f"Block {self.name!r} has a dense feed-forward block "
                f"({self.feed_forward.__class__.__name__}), which does not "
                "route tokens."
            )
        inputs = ops.convert_to_tensor(inputs)
        if not self.built:
            self.build(inputs.shape)
        mask = None if mask is None else ops.cast(mask, "bool")
        x = self.feed_forward_norm(
            self._attention_block(inputs, mask, training=False)
        )
        if self._position_major():
            x = ops.transpose(x, (1, 0, 2))
            mask = None if mask is None else ops.transpose(mask, (1, 0))
        decisions = self.feed_forward.route(x, mask=mask, training=False)
        if self._position_major():
            decisions = {
                key: ops.transpose(value, (1, 0, 2))
                for key, value in decisions.items()
            }
        return decisions

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "num_heads": self.num_heads,
                "feed_forward": keras.saving.serialize_keras_object(
                    self.feed_forward
                ),
                "key_dim": self.key_dim,
                "dropout": self.dropout,
                "attention_dropout": self.attention_dropout,
                "causal": self.causal,
                "layer_norm_epsilon": self.layer_norm_epsilon,
                "kernel_initializer": keras.initializers.serialize(
                    self.kernel_initializer
                ),
                "seed": self.seed,
            }
        )
        return config
