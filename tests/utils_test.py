import keras
import numpy as np
import pytest

import keras_moe
from keras_moe import ExpertFFN
from keras_moe import FeedForward
from keras_moe import SparseMoE
from keras_moe import utils
from keras_moe.models import text_classifier


def built(layer, shape):
    layer.build(shape)
    return layer


def test_sparse_moe_counts_by_hand():
    moe = built(SparseMoE(num_experts=8, intermediate_dim=32, top_k=2), (None, 16))
    experts = 8 * (16 * 32 + 32 + 32 * 16 + 16)  # kernels and biases of 8 experts
    router = 16 * 8  # router kernel
    counts = utils.count_parameters(moe)
    assert counts == utils.ParameterCount(
        total=router + experts,
        active=router + experts * 2 // 8,  # top_k=2 of 8 experts
        expert_total=experts,
        expert_active=experts * 2 // 8,
    )


def test_gated_experts_without_biases_and_router_bias():
    moe = built(
        SparseMoE(
            num_experts=4, intermediate_dim=8, top_k=1, gated=True,
            use_bias=False, router=keras_moe.TopKRouter(4, 1, use_bias=True),
        ),
        (None, 6),
    )
    experts = 4 * (6 * 8 + 6 * 8 + 8 * 6)  # intermediate, gate, output kernels
    router = 6 * 4 + 4  # router kernel + bias
    counts = utils.count_parameters(moe)
    assert (counts.total, counts.active) == (router + experts, router + experts // 4)


def test_shared_structure_counts_once():
    # The same FeedForward used twice (weight sharing) and a shared expert
    # next to the MoE layer: shared weights count once, and a dense shared
    # expert is active for every token.
    inputs = keras.Input((5, 8))
    shared = FeedForward(4, name="shared")
    moe = SparseMoE(4, 4, top_k=2, name="moe")
    x = shared(shared(inputs))
    x = keras.layers.Add()([moe(x), FeedForward(6, name="shared_expert")(x)])
    model = keras.Model(inputs, x)
    shared_params = 8 * 4 + 4 + 4 * 8 + 8  # counted once
    shared_expert = 8 * 6 + 6 + 6 * 8 + 8
    experts = 4 * (8 * 4 + 4 + 4 * 8 + 8)
    router = 8 * 4
    counts = utils.count_parameters(model)
    assert counts.total == shared_params + shared_expert + experts + router
    assert counts.active == shared_params + shared_expert + experts // 2 + router


def test_experts_outside_an_moe_layer_are_all_active():
    experts = built(ExpertFFN(num_experts=3, intermediate_dim=4), (3, None, 2))
    counts = utils.count_parameters(experts)
    assert counts.total == counts.active == 3 * (2 * 4 + 4 + 4 * 2 + 2)


def test_flops_per_token_by_hand():
    model = text_classifier(
        num_classes=3, sequence_length=16, vocabulary_size=32, num_layers=2,
        model_dim=8, num_heads=2, intermediate_dim=4, num_experts=4, top_k=2,
    )
    projections = 4 * (2 * 8 * 8 + 8)  # q, k, v, output: 2 * kernel + bias
    scores = 2 * 16 * 2 * (4 + 4)  # QK^T and AV over T=16 keys, 2 heads of 4
    attention = projections + scores
    dense_ff = (2 * 8 * 8 + 8) + (2 * 8 * 8 + 8)  # FeedForward, 8 units
    router = 2 * 8 * 4  # router matmul, no bias
    one_expert = (2 * 8 * 4 + 4) + (2 * 4 * 8 + 8)
    head = (2 * 8 * 3 + 3) / 16  # once per example, spread over 16 tokens
    expected = (
        attention + dense_ff  # block_0
        + attention + router + 2 * one_expert  # block_1, top_k=2 experts
        + head
    )
    assert utils.flops_per_token(model, sequence_length=16) == pytest.approx(expected)
    assert expected == pytest.approx(2731.1875)
    with pytest.raises(ValueError, match="Pass `sequence_length`"):
        utils.flops_per_token(model)


def test_flops_read_the_sequence_length_of_fixed_size_models():
    inputs = keras.Input((6, 8))
    x = keras.layers.MultiHeadAttention(2, 4)(inputs, inputs)
    model = keras.Model(inputs, SparseMoE(4, 4, top_k=1)(x))
    expected = 4 * (2 * 64 + 8) + 2 * 6 * 2 * 8 + 2 * 32 + (2 * 32 + 4 + 2 * 32 + 8)
    assert utils.flops_per_token(model) == pytest.approx(expected)


def test_unbuilt_models_are_refused():
    with pytest.raises(ValueError, match="is not built"):
        utils.count_parameters(SparseMoE(4, 4))
    with pytest.raises(ValueError, match="is not built"):
        utils.flops_per_token(SparseMoE(4, 4))


def test_routing_map():
    expert_index = np.array(
        [[[0, 1], [1, 2]], [[2, 3], [3, 3]]]
    )  # (2 examples, 2 tokens, k=2)
    valid = np.array([[True, True], [True, False]])
    fractions = utils.routing_map(expert_index, np.array([0, 1]), 3, 4, valid)
    np.testing.assert_allclose(
        fractions,
        [[0.25, 0.5, 0.25, 0.0], [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]],
    )
    per_token = utils.routing_map(expert_index, np.array([[0, 1], [1, 0]]), 2, 4)
    np.testing.assert_allclose(per_token.sum(axis=1), [1.0, 1.0])
    np.testing.assert_allclose(per_token[0], [0.25, 0.25, 0, 0.5])
    with pytest.raises(ValueError, match="groups.shape=\\(3,\\)"):
        utils.routing_map(expert_index, np.array([0, 1, 1]), 2, 4)


def test_byte_kinds():
    kinds = utils.byte_kinds(np.frombuffer(b"hello World 42!\n", np.uint8))
    names = [utils.BYTE_KINDS[k] for k in kinds]
    assert names[:5] == ["lowercase"] * 5
    assert names[5] == "space" and names[6] == "uppercase"
    assert names[12:14] == ["digit", "digit"]
    assert names[14:] == ["punctuation", "newline"]


def test_shared_experts_and_expert_choice():
    moe = built(
        SparseMoE(4, 8, top_k=2, num_shared_experts=1, shared_intermediate_dim=6),
        (None, 8),
    )
    experts = 4 * (8 * 8 + 8 + 8 * 8 + 8)  # routed experts
    router = 8 * 4
    shared = 8 * 6 + 6 + 6 * 8 + 8  # one always-on FeedForward of 6 units
    counts = utils.count_parameters(moe)
    assert counts.total == experts + router + shared
    assert counts.active == experts // 2 + router + shared
    choice = built(
        SparseMoE(4, 8, top_k=1, router="expert_choice", capacity_factor=2.0),
        (None, 8),
    )
    # Each expert takes 2 * G * 1 / 4 tokens: 2 experts per token on average.
    assert utils.count_parameters(choice).expert_active == experts // 2
