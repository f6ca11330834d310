import json
import re

import numpy as np
import pytest

from keras_moe.datasets import synthetic_text
from keras_moe.datasets.synthetic_text import decode_bytes
from keras_moe.datasets.synthetic_text import load_language_modeling
from keras_moe.datasets.synthetic_text import load_text_classification

NUM_DOMAINS = len(synthetic_text.DOMAIN_NAMES)


@pytest.fixture(scope="module")
def classification():
    # 400 = 40 per (domain, label) cell; 48 bytes is the shortest allowed
    # length, where truncation bugs would show first.
    return load_text_classification(
        num_train=400, num_test=100, sequence_length=48, seed=3
    )


@pytest.fixture(scope="module")
def language_modeling():
    return load_language_modeling(
        num_train=300, num_test=50, sequence_length=64, seed=3
    )


def _review_label(text, own_words, own_nouns, other_nouns):
    words = re.findall(r"[a-z]+", text)
    assert set(words) & set(own_nouns), text
    assert not set(words) & set(other_nouns), text
    net = sum(words.count(word) for word in own_words[+1]) - sum(
        words.count(word) for word in own_words[-1]
    )
    assert net != 0, text
    return int(net > 0)


def _arithmetic_label(text):
    net = 0
    for equation in text.split(" "):
        match = re.fullmatch(r"(\d+)([+-])(\d+)=(-?\d+)", equation)
        assert match, text
        a, operator, b, result = match.groups()
        expected = int(a) + int(b) if operator == "+" else int(a) - int(b)
        assert int(result) == expected, equation
        net += 1 if expected >= 0 else -1
    assert net != 0, text
    return int(net > 0)


def _dna_label(text):
    assert set(text) <= set("ACGT"), text
    gc_count = text.count("G") + text.count("C")
    assert 2 * gc_count != len(text), text
    return int(2 * gc_count > len(text))


def _server_log_label(text):
    net = 0
    for record in text.split(" "):
        status = json.loads(record)["status"]
        net += (200 <= status < 300) - (500 <= status < 600)
    assert net != 0, text
    return int(net > 0)


def _oracle_label(text, domain):
    """Recomputes the label from the text alone, by a separate parser."""
    movie_nouns = synthetic_text._MOVIE_NOUNS
    product_nouns = synthetic_text._PRODUCT_NOUNS
    if domain == 0:
        return _review_label(
            text, synthetic_text._MOVIE_WORDS, movie_nouns, product_nouns
        )
    if domain == 1:
        return _review_label(
            text, synthetic_text._PRODUCT_WORDS, product_nouns, movie_nouns
        )
    if domain == 2:
        return _arithmetic_label(text)
    if domain == 3:
        return _dna_label(text)
    return _server_log_label(text)


class TestTextClassification:
    def test_shapes_and_dtypes(self, classification):
        train, test, info = classification
        for split, num in ((train, 400), (test, 100)):
            assert split.x.shape == (num, 48)
            assert split.y.shape == (num,)
            assert split.domains.shape == (num,)
            for array in split:
                assert array.dtype == np.int32
        assert info["class_names"] == ["negative", "positive"]
        assert info["domain_names"] == list(synthetic_text.DOMAIN_NAMES)
        assert set(info["label_descriptions"]) == set(info["domain_names"])
        assert info["vocabulary_size"] == 256
        assert info["padding_id"] == 0
        assert info["sequence_length"] == 48

    def test_bytes_are_printable_ascii_then_right_padding(
        self, classification
    ):
        train, _, _ = classification
        is_padding = train.x == 0
        printable = (train.x >= 32) & (train.x <= 126)
        assert (is_padding | printable).all()
        # Once padding starts it never stops: padding is a suffix.
        assert (np.diff(is_padding.astype(np.int8), axis=1) >= 0).all()
        lengths = (~is_padding).sum(axis=1)
        # Documents fill most of their budget, and some are padded.
        assert lengths.min() >= 5
        assert lengths.mean() > 0.8 * 48
        assert lengths.min() < 48

    def test_labels_follow_from_the_text(self, classification):
        train, test, _ = classification
        for split in (train, test):
            for tokens, label, domain in zip(*split):
                text = decode_bytes(tokens)
                assert _oracle_label(text, domain) == label, text

    def test_labels_follow_from_the_text_for_long_sequences(self):
        train, _, _ = load_text_classification(
            num_train=100, num_test=10, sequence_length=300, seed=1
        )
        # Budgets are at least 300 // 2 bytes, and a document stops only
        # when units no longer fit.
        filled = 150 - synthetic_text.MAX_UNIT_LENGTH
        assert (train.x[:, :filled] != 0).all()
        for tokens, label, domain in zip(*train):
            text = decode_bytes(tokens)
            assert _oracle_label(text, domain) == label, text

    def test_domains_and_labels_are_balanced(self, classification):
        train, _, _ = classification
        cells = np.zeros((NUM_DOMAINS, 2), dtype=int)
        np.add.at(cells, (train.domains, train.y), 1)
        assert (cells == 40).all(), cells

    def test_same_seed_same_data(self, classification):
        train, test, _ = classification
        train_again, test_again, _ = load_text_classification(
            num_train=400, num_test=100, sequence_length=48, seed=3
        )
        for a, b in zip(train + test, train_again + test_again):
            np.testing.assert_array_equal(a, b)

    def test_different_seed_different_data(self, classification):
        train, _, _ = classification
        other, _, _ = load_text_classification(
            num_train=400, num_test=100, sequence_length=48, seed=4
        )
        assert (train.x != other.x).any(axis=1).mean() > 0.95

    def test_test_split_does_not_depend_on_num_train(self, classification):
        _, test, _ = classification
        _, test_again, _ = load_text_classification(
            num_train=7, num_test=100, sequence_length=48, seed=3
        )
        np.testing.assert_array_equal(test.x, test_again.x)

    @pytest.mark.parametrize(
        "kwargs, argument",
        [
            ({"num_train": 0}, "num_train=0"),
            ({"num_train": 1.5}, "num_train=1.5"),
            ({"num_train": True}, "num_train=True"),
            ({"num_test": -1}, "num_test=-1"),
            ({"sequence_length": 47}, "sequence_length=47"),
            ({"sequence_length": "64"}, "sequence_length='64'"),
            ({"seed": -1}, "seed=-1"),
            ({"seed": None}, "seed=None"),
        ],
    )
    def test_bad_arguments_raise(self, kwargs, argument):
        with pytest.raises(ValueError, match=re.escape(argument)):
            load_text_classification(**kwargs)

    def test_numpy_integers_are_accepted(self):
        train, _, _ = load_text_classification(
            num_train=np.int64(10), num_test=2, sequence_length=np.int32(64)
        )
        assert train.x.shape == (10, 64)


def _hashed_bigram_features(tokens, num_buckets=1024):
    # Normalised counts of hashed byte bigrams, (num_examples, num_buckets).
    first, second = tokens[:, :-1], tokens[:, 1:]
    buckets = (first * 257 + second * 31) % num_buckets
    rows = np.arange(len(tokens))[:, None]
    flat = (rows * num_buckets + buckets)[second > 0]
    counts = np.bincount(flat, minlength=len(tokens) * num_buckets)
    counts = counts.reshape(len(tokens), num_buckets).astype(np.float32)
    return 30.0 * counts / counts.sum(axis=1, keepdims=True)


def _fit_logistic_regression(features, labels, steps=300, learning_rate=1.0):
    # Full-batch gradient descent. np.einsum instead of `@` keeps BLAS
    # threads out of it: on a busy 2-core machine they are far slower.
    labels = labels.astype(np.float32)
    weights = np.zeros(features.shape[1], dtype=np.float32)
    bias = np.float32(0.0)
    for _ in range(steps):
        logits = np.einsum("nf,f->n", features, weights) + bias
        error = (1.0 / (1.0 + np.exp(-logits)) - labels) / len(labels)
        weights -= learning_rate * np.einsum("nf,n->f", features, error)
        bias -= learning_rate * error.sum()
    return weights, bias


def _predict(features, weights, bias):
    return (np.einsum("nf,f->n", features, weights) + bias > 0).astype(int)


def test_bigram_model_learns_and_per_domain_models_learn_more():
    """A linear model is far above chance; one per domain does better.

    The per-domain gain comes from the review domains, whose shared
    sentiment words have opposite polarities: a single linear model cannot
    read "unpredictable" both ways.
    """
    train, test, _ = load_text_classification(
        num_train=2000, num_test=1000, sequence_length=128, seed=0
    )
    train_features = _hashed_bigram_features(train.x)
    test_features = _hashed_bigram_features(test.x)
    weights, bias = _fit_logistic_regression(train_features, train.y)
    global_correct = _predict(test_features, weights, bias) == test.y
    per_domain_correct = np.zeros_like(global_correct)
    for domain in range(NUM_DOMAINS):
        in_train = train.domains == domain
        in_test = test.domains == domain
        weights, bias = _fit_logistic_regression(
            train_features[in_train], train.y[in_train]
        )
        per_domain_correct[in_test] = (
            _predict(test_features[in_test], weights, bias)
            == test.y[in_test]
        )
    reviews = test.domains <= 1
    assert global_correct.mean() > 0.8
    assert per_domain_correct.mean() > global_correct.mean() + 0.03
    assert (
        per_domain_correct[reviews].mean()
        > global_correct[reviews].mean() + 0.08
    )


class TestLanguageModeling:
    def test_shapes_and_dtypes(self, language_modeling):
        train, test, info = language_modeling
        for split, num in ((train, 300), (test, 50)):
            for array in split:
                assert array.shape == (num, 64)
                assert array.dtype == np.int32
        assert info["domain_names"] == list(synthetic_text.DOMAIN_NAMES)
        assert info["vocabulary_size"] == 256
        assert info["sequence_length"] == 64
        assert info["document_separator"] == "\n"

    def test_targets_are_next_inputs(self, language_modeling):
        train, _, _ = language_modeling
        np.testing.assert_array_equal(train.y[:, :-1], train.x[:, 1:])

    def test_bytes_are_printable_ascii_or_newline(self, language_modeling):
        train, _, _ = language_modeling
        for tokens in (train.x, train.y):
            printable = (tokens >= 32) & (tokens <= 126)
            assert (printable | (tokens == ord("\n"))).all()

    def test_domain_changes_only_after_a_separator(self, language_modeling):
        train, _, _ = language_modeling
        changes = train.domains[:, 1:] != train.domains[:, :-1]
        assert changes.any()
        assert (train.x[:, :-1][changes] == ord("\n")).all()

    def test_domains_all_present_and_roughly_balanced(
        self, language_modeling
    ):
        train, _, _ = language_modeling
        fractions = np.bincount(
            train.domains.ravel(), minlength=NUM_DOMAINS
        ) / train.domains.size
        assert (fractions > 0.1).all() and (fractions < 0.3).all(), fractions

    def test_documents_parse_in_their_domain(self, language_modeling):
        train, _, _ = language_modeling
        # Whole documents: those between two separators of one sequence.
        tokens, domains = train.x[0], train.domains[0]
        newlines = np.flatnonzero(tokens == ord("\n"))
        for start, stop in zip(newlines[:-1] + 1, newlines[1:]):
            text = decode_bytes(tokens[start:stop])
            domain = domains[start]
            assert (domains[start : stop + 1] == domain).all()
            if domain == 2:
                _arithmetic_label(text)
            elif domain == 3:
                assert set(text) <= set("ACGT")
            elif domain == 4:
                for record in text.split(" "):
                    json.loads(record)

    def test_same_seed_same_data_different_seed_different_data(
        self, language_modeling
    ):
        train, test, _ = language_modeling
        again_train, again_test, _ = load_language_modeling(
            num_train=300, num_test=50, sequence_length=64, seed=3
        )
        for a, b in zip(train + test, again_train + again_test):
            np.testing.assert_array_equal(a, b)
        other, _, _ = load_language_modeling(
            num_train=300, num_test=50, sequence_length=64, seed=4
        )
        assert (train.x != other.x).any(axis=1).mean() > 0.95

    def test_bigram_model_beats_unigram_model(self, language_modeling):
        # Bits per byte on the test split, add-one smoothed counts.
        train, test, _ = language_modeling
        unigram = np.bincount(train.y.ravel(), minlength=256) + 1.0
        unigram_bits = -np.log2(unigram / unigram.sum())[test.y].mean()
        bigram = np.ones((256, 256))
        np.add.at(bigram, (train.x.ravel(), train.y.ravel()), 1.0)
        bigram /= bigram.sum(axis=1, keepdims=True)
        bigram_bits = -np.log2(bigram[test.x, test.y]).mean()
        assert bigram_bits < unigram_bits - 0.7, (bigram_bits, unigram_bits)

    @pytest.mark.parametrize(
        "kwargs, argument",
        [
            ({"num_train": 0}, "num_train=0"),
            ({"num_test": 2.0}, "num_test=2.0"),
            ({"sequence_length": 0}, "sequence_length=0"),
            ({"seed": -3}, "seed=-3"),
        ],
    )
    def test_bad_arguments_raise(self, kwargs, argument):
        with pytest.raises(ValueError, match=re.escape(argument)):
            load_language_modeling(**kwargs)


def test_decode_bytes_drops_padding():
    assert decode_bytes(np.array([104, 105, 33, 0, 0])) == "hi!"
    with pytest.raises(ValueError, match="token_ids"):
        decode_bytes(np.zeros((2, 3), dtype=np.int32))


def test_units_are_at_most_max_unit_length():
    # The minimum sequence_length relies on every unit fitting in it.
    rng = synthetic_text._rng("test", 0, "units")
    for make_unit, p_neutral, _ in synthetic_text._UNIT_DOMAINS.values():
        polarities = (-1, 0, 1) if p_neutral > 0 else (-1, 1)
        longest = max(
            len(make_unit(rng, polarity))
            for polarity in polarities
            for _ in range(2000)
        )
        assert longest <= synthetic_text.MAX_UNIT_LENGTH
    assert (
        synthetic_text.MAX_UNIT_LENGTH
        <= synthetic_text.MIN_CLASSIFICATION_SEQUENCE_LENGTH
    )
