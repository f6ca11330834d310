import math

import keras
import numpy as np
from keras import ops
from keras.src import testing

from keras_moe import FeedForward
from keras_moe import SparseMoE
from keras_moe.models import TransformerBlock
from keras_moe.models import feed_forward_layer
from tests.reference import ACTIVATIONS
from tests.utils import to_numpy


def layer_norm(x, epsilon=1e-6):
    mean = x.mean(axis=-1, keepdims=True)
    variance = x.var(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + epsilon)


def serialized(layer):
    return keras.saving.serialize_keras_object(layer)


def moe(**kwargs):
    config = dict(num_experts=4, intermediate_dim=8, top_k=2)
    config.update(kwargs)
    return SparseMoE(**config)


class TransformerBlockBasicsTest(testing.TestCase):
    def test_layer_basics_dense(self):
        self.run_layer_test(
            TransformerBlock,
            init_kwargs={
                "num_heads": 2,
                "feed_forward": serialized(FeedForward(16)),
                "dropout": 0.1,
            },
            input_shape=(2, 5, 8),
            expected_output_shape=(2, 5, 8),
            # 2 layer norms x (gamma, beta) + attention (q, k, v, output
            # kernels and biases) + FeedForward (2 kernels, 2 biases).
            expected_num_trainable_weights=4 + 8 + 4,
            expected_num_non_trainable_weights=0,
            supports_masking=True,
            # The feed-forward keeps its own dtype policy; mixed precision is
            # tested below with a global policy.
            run_mixed_precision_check=False,
        )

    def test_layer_basics_moe(self):
        self.run_layer_test(
            TransformerBlock,
            init_kwargs={"num_heads": 2, "feed_forward": serialized(moe())},
            input_shape=(2, 5, 8),
            expected_output_shape=(2, 5, 8),
            # Norms 4 + attention 8 + router kernel 1 + expert weights 4.
            expected_num_trainable_weights=4 + 8 + 1 + 4,
            # The SparseMoE's routing statistics.
            expected_num_non_trainable_weights=7,
            supports_masking=True,
            run_mixed_precision_check=False,
        )

    def test_parameter_count(self):
        block = TransformerBlock(num_heads=2, feed_forward=FeedForward(16))
        block.build((None, None, 8))
        expected = (
            2 * (8 + 8)  # two layer norms, gamma and beta of width d=8
            + 3 * (8 * 2 * 4 + 2 * 4)  # query/key/value kernels (d, heads, 4) + biases
            + (2 * 4 * 8 + 8)  # attention output kernel (heads, 4, d) + bias
            + (8 * 16 + 16)  # feed-forward input kernel + bias
            + (16 * 8 + 8)  # feed-forward output kernel + bias
        )
        self.assertEqual(block.count_params(), expected)
        self.assertIs(block.feed_forward.__class__, FeedForward)
        self.assertFalse(block.is_moe)

    def test_hand_computed_feed_forward_path(self):
        # With the attention's output projection at zero the block is
        # x + W2 relu(W1 LN(x) + b1) + b2: pre-norm, then a residual sum.
        rng = np.random.default_rng(0)
        x = rng.normal(size=(2, 3, 4)).astype("float32")
        block = TransformerBlock(
            num_heads=1,
            feed_forward=FeedForward(6, activation="relu"),
        )
        block.build((None, None, 4))
        for weight in block.attention.output_dense.weights:
            weight.assign(np.zeros(weight.shape, "float32"))
        w1 = rng.normal(size=(4, 6)).astype("float32")
        b1 = rng.normal(size=(6,)).astype("float32")
        w2 = rng.normal(size=(6, 4)).astype("float32")
        b2 = rng.normal(size=(4,)).astype("float32")
        ff = block.feed_forward
        ff.intermediate_kernel.assign(w1)
        ff.intermediate_bias.assign(b1)
        ff.output_kernel.assign(w2)
        ff.output_bias.assign(b2)
        expected = x + ACTIVATIONS["relu"](layer_norm(x) @ w1 + b1) @ w2 + b2
        self.assertAllClose(block(x), expected, atol=1e-5)

    def test_attention_path_is_pre_norm_with_residuals(self):
        rng = np.random.default_rng(1)
        x = rng.normal(size=(2, 5, 8)).astype("float32")
        block = TransformerBlock(num_heads=2, feed_forward=moe())
        outputs = to_numpy(block(x))
        normed = block.attention_norm(x)
        after_attention = x + to_numpy(block.attention(normed, normed))
        expected = after_attention + to_numpy(
            block.feed_forward(block.feed_forward_norm(after_attention))
        )
        self.assertAllClose(outputs, expected, atol=1e-5)
        # And the attention term is not zero (so the test can fail).
        self.assertGreater(np.abs(after_attention - x).max(), 1e-3)

    def test_dropout_only_in_training_and_seeds_differ(self):
        x = np.random.default_rng(6).normal(size=(4, 6, 8)).astype("float32")
        block = TransformerBlock(
            num_heads=2, feed_forward=FeedForward(16), dropout=0.5, seed=3
        )
        inference = to_numpy(block(x))
        self.assertAllClose(block(x), inference)
        self.assertNotAllClose(block(x, training=True), inference)
        # Each dropout layer gets its own seed: two layers with one seed
        # would drop the same units.
        self.assertEqual(block.attention_output_dropout.seed, 4)
        self.assertEqual(block.feed_forward_output_dropout.seed, 5)

    def test_padding_is_not_attended_to_or_routed(self):
        rng = np.random.default_rng(2)
        x = rng.normal(size=(2, 6, 8)).astype("float32")
        mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 0, 0]], bool)
        block = TransformerBlock(
            num_heads=2,
            feed_forward=moe(capacity_factor=None, eval_capacity_factor=None),
        )
        outputs = to_numpy(block(x, mask=mask))
        changed = x.copy()
        changed[~mask] = 50.0
        self.assertAllClose(
            to_numpy(block(changed, mask=mask))[mask], outputs[mask], atol=1e-5
        )
        # Without the mask the padding does change the real tokens.
        self.assertNotAllClose(
            to_numpy(block(changed))[mask], to_numpy(block(x))[mask]
        )
        decisions = block.route(x, mask=mask)
        kept = to_numpy(decisions["kept"])  # (2, 6, k)
        self.assertFalse(kept[~mask].any())
        self.assertTrue(kept[mask].all())
        # In training, only the 7 real tokens count in the routing statistics.
        block(x, mask=mask, training=True)
        load = block.feed_forward.routing_statistics()["expert_load"]
        self.assertAllClose(load * 14, np.round(load * 14), atol=1e-4)
        self.assertAllClose(load.sum(), 1.0)

    def test_keras_mask_from_an_embedding_reaches_the_moe(self):
        tokens = np.array([[5, 6, 7, 0, 0], [3, 0, 0, 0, 0]])
        inputs = keras.Input((None,), dtype="int32")
        x = keras.layers.Embedding(10, 8, mask_zero=True)(inputs)
        block = TransformerBlock(num_heads=2, feed_forward=moe())
        model = keras.Model(inputs, block(x))
        model(tokens, training=True)
        load = block.feed_forward.routing_statistics()["expert_load"]
        # 4 real tokens x 2 choices: every share is a multiple of 1/8.
        self.assertAllClose(load * 8, np.round(load * 8), atol=1e-4)
        self.assertAllClose(load.sum(), 1.0)

    def test_causal_block_never_looks_ahead(self):
        # Tight capacity, so tokens are dropped: even then no output at
        # position t depends on a later token, in any sequence of the batch.
        rng = np.random.default_rng(3)
        x = rng.normal(size=(3, 8, 8)).astype("float32")
        block = TransformerBlock(
            num_heads=2,
            feed_forward=moe(
                capacity_factor=0.5, eval_capacity_factor=0.5, min_capacity=1,
                causal=True,
            ),
            causal=True,
        )
        for training in (False, True):
            outputs = to_numpy(block(x, training=training))
            for t in (2, 5):
                changed = x.copy()
                changed[0, t:] = rng.normal(size=(8 - t, 8))
                changed_outputs = to_numpy(block(changed, training=training))
                self.assertAllClose(
                    changed_outputs[:, :t], outputs[:, :t], atol=1e-5
                )
                self.assertNotAllClose(changed_outputs[0, t:], outputs[0, t:])
        kept = to_numpy(block.route(x)["kept"])
        self.assertFalse(kept.all())  # capacity did drop assignments

    def test_non_causal_block_sees_the_future(self):
        rng = np.random.default_rng(4)
        x = rng.normal(size=(2, 6, 8)).astype("float32")
        block = TransformerBlock(num_heads=2, feed_forward=moe())
        changed = x.copy()
        changed[:, -1] = rng.normal(size=(2, 8))
        self.assertNotAllClose(
            to_numpy(block(changed))[:, 0], to_numpy(block(x))[:, 0]
        )

    def test_route_shapes_and_dense_refusal(self):
        block = TransformerBlock(num_heads=2, feed_forward=moe(causal=True), causal=True)
        decisions = block.route(np.ones((3, 5, 8), "float32"))
        self.assertEqual(tuple(decisions["expert_index"].shape), (3, 5, 2))
        self.assertEqual(tuple(decisions["router_probs"].shape), (3, 5, 4))
        dense = TransformerBlock(num_heads=2, feed_forward=FeedForward(8))
        with self.assertRaisesRegex(ValueError, "does not route tokens"):
            dense.route(np.ones((3, 5, 8), "float32"))

    def test_mixed_precision(self):
        keras.config.set_dtype_policy("mixed_bfloat16")
        try:
            block = TransformerBlock(num_heads=2, feed_forward=moe())
            outputs = block(np.ones((2, 4, 8), "float32"), training=True)
            self.assertEqual(keras.backend.standardize_dtype(outputs.dtype), "bfloat16")
            self.assertEqual(block.feed_forward.router.kernel.dtype, "float32")
        finally:
            keras.config.set_dtype_policy("float32")

    def test_config_round_trip_and_upcycling_swap(self):
        block = TransformerBlock(
            num_heads=2, feed_forward=FeedForward(16), dropout=0.1, seed=7,
            name="block",
        )
        x = np.random.default_rng(5).normal(size=(2, 4, 8)).astype("float32")
        block(x)
        restored = TransformerBlock.from_config(block.get_config())
        self.assertIsInstance(restored.feed_forward, FeedForward)
        self.assertFalse(restored.feed_forward.built)  # built by the block
        restored(x)
        self.assertEqual(restored.get_config(), block.get_config())

        # Upcycling: swap the built dense block for a SparseMoE.
        sparse = moe(name="upcycled")
        dense_weights = {id(w) for w in block.feed_forward.weights}
        block.replace_feed_forward(sparse)
        self.assertIs(block.feed_forward, sparse)
        self.assertTrue(sparse.built)
        self.assertTrue(block.is_moe)
        self.assertFalse(dense_weights & {id(w) for w in block.weights})
        self.assertEqual(
            len(block.trainable_weights), 4 + 8 + 1 + 4
        )
        self.assertEqual(tuple(block(x).shape), (2, 4, 8))
        config = block.get_config()
        self.assertEqual(config["feed_forward"]["class_name"], "SparseMoE")
        self.assertTrue(TransformerBlock.from_config(config).is_moe)

    def test_restored_blocks_keep_variable_paths(self):
        # Layout maps (expert parallelism) and checkpoints are keyed on paths.
        inputs = keras.Input((4, 8))
        block = TransformerBlock(num_heads=2, feed_forward=moe(name="ff"), name="b")
        model = keras.Model(inputs, block(inputs))
        restored = keras.Model.from_config(model.get_config())
        self.assertIn("b/ff/experts/intermediate_kernel", [v.path for v in model.weights])
        self.assertEqual(
            sorted(v.path for v in restored.weights), sorted(v.path for v in model.weights)
        )

    def test_invalid_arguments(self):
        ff = FeedForward(8)
        cases = [
            ({"num_heads": 0}, "num_heads=0"),
            ({"key_dim": -1}, "key_dim=-1"),
            ({"dropout": 1.0}, "dropout=1.0"),
            ({"attention_dropout": -0.1}, "attention_dropout=-0.1"),
            ({"causal": "yes"}, "causal='yes'"),
            ({"feed_forward": "dense"}, "feed_forward='dense'"),
        ]
        for kwargs, message in cases:
            arguments = {"num_heads": 2, "feed_forward": ff, **kwargs}
            with self.assertRaisesRegex(ValueError, message):
                TransformerBlock(**arguments)
        with self.assertRaisesRegex(ValueError, "causal MoE layer"):
            TransformerBlock(num_heads=2, feed_forward=moe(), causal=True)
        block = TransformerBlock(num_heads=3, feed_forward=ff)
        with self.assertRaisesRegex(ValueError, "not divisible by num_heads=3"):
            block.build((None, 4, 8))
        with self.assertRaisesRegex(ValueError, r"\(batch, tokens, d_model\)"):
            TransformerBlock(num_heads=2, feed_forward=ff).build((None, 8))


class FeedForwardLayerTest(testing.TestCase):
    def test_moe_and_dense_of_equal_active_size(self):
        sparse = feed_forward_layer(True, 32, num_experts=8, top_k=2, gated=True,
                                    activation="silu", name="moe")
        dense = feed_forward_layer(False, 32, num_experts=8, top_k=2, gated=True,
                                   activation="silu", name="dense")
        self.assertIsInstance(sparse, SparseMoE)
        self.assertEqual((sparse.num_experts, sparse.top_k), (8, 2))
        self.assertIsInstance(dense, FeedForward)
        self.assertEqual(dense.intermediate_dim, 2 * 32)
        self.assertTrue(dense.gated)
        sparse.build((None, 16))
        dense.build((None, 16))
        expert_parameters = sum(
            math.prod(w.shape) for w in sparse.experts.weights
        )
        # A token uses top_k=2 of the 8 experts: the dense block's weights,
        # but for one output bias (d=16) more, as each expert has its own.
        self.assertEqual(expert_parameters * 2 // 8, dense.count_params() + 16)
        self.assertEqual(
            feed_forward_layer(False, 32, top_k=2, dense_intermediate_dim=40)
            .intermediate_dim, 40,
        )

    def test_moe_options(self):
        layer = feed_forward_layer(
            True, 8, num_experts=4, top_k=1, causal=True,
            moe_options={"group_size": 16, "z_loss_weight": 0.0},
        )
        self.assertEqual(
            (layer.group_size, layer.z_loss_weight, layer.causal), (16, 0.0, True)
        )
        with self.assertRaisesRegex(ValueError, "must not set `top_k`"):
            feed_forward_layer(True, 8, moe_options={"top_k": 1})
        with self.assertRaisesRegex(ValueError, "sets `causal` against"):
            feed_forward_layer(True, 8, causal=True, moe_options={"causal": False})
        with self.assertRaisesRegex(ValueError, "dense_intermediate_dim=0"):
            feed_forward_layer(False, 8, dense_intermediate_dim=0)

    def test_mask_passes_only_to_layers_that_take_it(self):
        # FeedForward.call has no mask argument; the block must not pass one.
        inputs = keras.Input((None,), dtype="int32")
        x = keras.layers.Embedding(10, 8, mask_zero=True)(inputs)
        outputs = TransformerBlock(num_heads=2, feed_forward=FeedForward(8))(x)
        model = keras.Model(inputs, outputs)
        result = model(np.array([[1, 2, 0]]))
        self.assertEqual(tuple(ops.shape(result)), (1, 3, 8))


class CausalGroupsTest(testing.TestCase):
    def test_groups_inside_sequences_are_causal_and_batch_independent(self):
        # One routing group per sequence (as expert parallelism needs): no
        # position-major reordering, and each sequence only depends on its
        # own earlier tokens, even with tight capacity.
        rng = np.random.default_rng(7)
        x = rng.normal(size=(3, 8, 8)).astype("float32")
        block = TransformerBlock(
            num_heads=2,
            feed_forward=moe(
                capacity_factor=0.5, eval_capacity_factor=0.5, min_capacity=1,
                causal=True, group_size=8,
            ),
            causal=True,
        )
        self.assertFalse(block._position_major())
        outputs = to_numpy(block(x))
        changed = x.copy()
        changed[0, 4:] = rng.normal(size=(4, 8))
        changed_outputs = to_numpy(block(changed))
        self.assertAllClose(changed_outputs[0, :4], outputs[0, :4], atol=1e-5)
        self.assertAllClose(changed_outputs[1:], outputs[1:], atol=1e-5)
        self.assertNotAllClose(changed_outputs[0, 4:], outputs[0, 4:])

