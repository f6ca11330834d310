"""Tests of the TFDS loaders on `tfds.testing.mock_data`, offline.

`mock_data` replaces the download and the stored records with random
examples built from each dataset's feature spec in code (`MockPolicy.AUTO`
falls back to `USE_CODE` because the pip package ships no metadata for these
datasets; no network is touched). So these tests check our conversion
(bytes, padding, windows, channels, resizing, structure) against what TFDS
hands over, not the real contents: mock texts are random letters, mock
labels are random, and label names that TFDS only learns while preparing the
real data show as "0".."9" for CIFAR-10 (the real names come from the
prepared dataset's metadata).
"""

import re
import sys

import numpy as np
import pytest

from keras_moe.datasets import load_image_classification
from keras_moe.datasets import load_language_modeling
from keras_moe.datasets import load_text_classification
from keras_moe.datasets import tfds_loaders
from keras_moe.datasets.tfds_loaders import load_image_dataset
from keras_moe.datasets.tfds_loaders import load_imdb_reviews
from keras_moe.datasets.tfds_loaders import load_tiny_shakespeare


@pytest.fixture(scope="module")
def tfds():
    return pytest.importorskip("tensorflow_datasets")


def _tfds_examples(tfds, name, split):
    """All examples of a mocked split, straight from TFDS, as a list."""
    return list(tfds.as_numpy(tfds.load(name, split=split)))


def test_imdb_reviews_match_tfds_text(tfds):
    with tfds.testing.mock_data(num_examples=12):
        train, test, info = load_imdb_reviews(
            sequence_length=16, max_examples=10
        )
        expected = _tfds_examples(tfds, "imdb_reviews", "train")[:10]
    assert train.x.shape == test.x.shape == (10, 16)
    for split in (train, test):
        assert [array.dtype for array in split] == [np.int32] * 3
        assert split.y.shape == split.domains.shape == (10,)
        assert (split.domains == 0).all()
    for tokens, label, example in zip(train.x, train.y, expected):
        text = example["text"][:16]
        assert tokens[: len(text)].astype(np.uint8).tobytes() == text
        assert (tokens[len(text) :] == 0).all()
        assert label == example["label"]
    assert info["class_names"] == ["neg", "pos"]
    assert info["domain_names"] == ["imdb_reviews"]
    _, _, synthetic_info = load_text_classification(
        num_train=1, num_test=1
    )
    assert set(info) == set(synthetic_info)


def test_imdb_reviews_truncates_and_pads(tfds):
    with tfds.testing.mock_data(num_examples=8):
        long_rows, _, _ = load_imdb_reviews(sequence_length=4)
        wide_rows, _, _ = load_imdb_reviews(sequence_length=600)
    assert long_rows.x.shape == (8, 4)
    assert (long_rows.x > 0).all()
    # Mock reviews are far shorter than 600 bytes: padding is a suffix.
    is_padding = wide_rows.x == 0
    assert is_padding[:, -1].all()
    assert (np.diff(is_padding.astype(np.int8), axis=1) >= 0).all()


def test_encode_byte_strings_removes_nul_bytes():
    tokens = tfds_loaders._encode_byte_strings([b"a\0b", b"\xff"], 4)
    np.testing.assert_array_equal(tokens, [[97, 98, 0, 0], [255, 0, 0, 0]])


def test_tiny_shakespeare_windows_of_the_whole_text(tfds):
    with tfds.testing.mock_data(num_examples=6):
        train, test, info = load_tiny_shakespeare(sequence_length=8)
        limited, _, _ = load_tiny_shakespeare(sequence_length=8, max_examples=2)
        texts = [e["text"] for e in _tfds_examples(tfds, "tiny_shakespeare", "train")]
    stream = np.frombuffer(b"".join(texts), dtype=np.uint8).astype(np.int32)
    num_sequences = len(stream) // 9
    assert train.x.shape == (num_sequences, 8)
    assert [array.dtype for array in train] == [np.int32] * 3
    expected = stream[: num_sequences * 9].reshape(num_sequences, 9)
    np.testing.assert_array_equal(train.x, expected[:, :-1])
    np.testing.assert_array_equal(train.y, expected[:, 1:])
    assert train.domains.shape == train.x.shape and (train.domains == 0).all()
    assert test.x.shape[1] == 8 and len(test.x) > 0
    np.testing.assert_array_equal(limited.x, train.x[:2])
    _, _, synthetic_info = load_language_modeling(num_train=1, num_test=1)
    assert set(info) == set(synthetic_info)
    assert info["domain_names"] == ["tiny_shakespeare"]


def test_tiny_shakespeare_too_long_sequence_length_raises(tfds):
    with tfds.testing.mock_data(num_examples=1):
        with pytest.raises(ValueError, match="sequence_length=100000"):
            load_tiny_shakespeare(sequence_length=100000)


def test_cifar10_matches_tfds_images(tfds):
    with tfds.testing.mock_data(num_examples=6):
        train, test, info = load_image_dataset("cifar10", max_examples=5)
        expected = _tfds_examples(tfds, "cifar10", "train")[:5]
    assert train.x.shape == test.x.shape == (5, 32, 32, 3)
    assert train.x.dtype == np.float32
    assert train.y.dtype == train.styles.dtype == np.int32
    assert (train.styles == 0).all()
    for image, label, example in zip(train.x, train.y, expected):
        np.testing.assert_allclose(image, example["image"] / 255.0, atol=1e-6)
        assert label == example["label"]
    assert info["num_classes"] == len(info["class_names"]) == 10
    assert info["style_names"] == ["cifar10"]
    assert info["image_size"] == 32
    _, _, synthetic_info = load_image_classification(num_train=1, num_test=1)
    assert set(info) == set(synthetic_info)


def test_mnist_becomes_rgb_and_resized(tfds):
    with tfds.testing.mock_data(num_examples=4):
        native, _, native_info = load_image_dataset("mnist", image_size=None)
        resized, _, info = load_image_dataset("mnist", image_size=32)
    assert native.x.shape == (4, 28, 28, 3)
    assert native_info["image_size"] == 28
    assert resized.x.shape == (4, 32, 32, 3)
    assert info["image_size"] == 32
    np.testing.assert_array_equal(native.x[..., 0], native.x[..., 2])
    assert native.x.max() <= 1.0 and native.x.min() >= 0.0
    np.testing.assert_allclose(
        resized.x, tfds_loaders._resize_bilinear(native.x, 32), atol=1e-6
    )


@pytest.mark.parametrize("output_size", [7, 16, 28, 32, 57])
def test_resize_bilinear_matches_tensorflow(output_size):
    tf = pytest.importorskip("tensorflow")
    images = np.random.default_rng(0).random((2, 28, 28, 3), np.float32)
    expected = tf.image.resize(
        images, (output_size, output_size), method="bilinear"
    ).numpy()
    np.testing.assert_allclose(
        tfds_loaders._resize_bilinear(images, output_size),
        expected,
        atol=1e-5,
    )


def test_resize_bilinear_halving_averages_blocks():
    images = np.arange(16, dtype=np.float32).reshape(1, 4, 4, 1)
    expected = images.reshape(1, 2, 2, 2, 2, 1).mean(axis=(2, 4))
    np.testing.assert_allclose(
        tfds_loaders._resize_bilinear(images, 2), expected
    )


@pytest.mark.parametrize(
    "function, kwargs, argument",
    [
        (load_image_dataset, {"name": "imagenet"}, "name='imagenet'"),
        (load_image_dataset, {"image_size": 4}, "image_size=4"),
        (load_image_dataset, {"max_examples": 0}, "max_examples=0"),
        (load_imdb_reviews, {"sequence_length": 0}, "sequence_length=0"),
        (load_imdb_reviews, {"max_examples": -5}, "max_examples=-5"),
        (load_tiny_shakespeare, {"sequence_length": 2.5}, "sequence_length=2.5"),
    ],
)
def test_bad_arguments_raise_before_loading(function, kwargs, argument):
    # No mock: the arguments are checked before TFDS is touched.
    with pytest.raises(ValueError, match=re.escape(argument)):
        function(**kwargs)


def test_missing_tfds_raises_a_helpful_import_error(monkeypatch):
    # A None entry in sys.modules makes `import` raise ImportError.
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match="pip install tensorflow-datasets"):
        load_imdb_reviews(sequence_length=8)
