import re

import numpy as np
import pytest

from keras_moe.datasets import synthetic_images
from keras_moe.datasets.synthetic_images import load_image_classification

NUM_STYLES = len(synthetic_images.STYLE_NAMES)


@pytest.fixture(scope="module")
def images():
    # 300 = 10 per (class, style) cell with 6 classes and 5 styles.
    return load_image_classification(
        num_train=300, num_test=60, image_size=32, num_classes=6, seed=5
    )


def _style_index(name):
    return synthetic_images.STYLE_NAMES.index(name)


class TestImageClassification:
    def test_shapes_dtypes_and_range(self, images):
        train, test, info = images
        for split, num in ((train, 300), (test, 60)):
            assert split.x.shape == (num, 32, 32, 3)
            assert split.x.dtype == np.float32
            assert split.y.shape == split.styles.shape == (num,)
            assert split.y.dtype == split.styles.dtype == np.int32
            assert split.x.min() >= 0.0 and split.x.max() <= 1.0
        assert info["class_names"] == [
            "circle", "square", "triangle", "cross", "ring", "diamond"
        ]
        assert info["style_names"] == list(synthetic_images.STYLE_NAMES)
        assert info["image_size"] == 32
        assert info["num_classes"] == 6

    def test_classes_and_styles_are_balanced(self, images):
        train, _, _ = images
        cells = np.zeros((6, NUM_STYLES), dtype=int)
        np.add.at(cells, (train.y, train.styles), 1)
        assert (cells == 10).all(), cells

    def test_flat_images_show_a_whole_shape_on_a_plain_ground(self, images):
        train, _, _ = images
        flat = train.x[train.styles == _style_index("flat")]
        corner = flat[:, :1, :1, :]
        differs = np.abs(flat - corner).max(axis=-1) > 0.05
        # The shape covers a sizeable part and stays inside the image: the
        # border is all background.
        covered = differs.mean(axis=(1, 2))
        assert covered.min() > 0.04 and covered.max() < 0.6, covered
        border = np.concatenate(
            [differs[:, 0], differs[:, -1], differs[:, :, 0], differs[:, :, -1]],
            axis=1,
        )
        assert not border.any()

    def test_rings_have_a_hole_and_circles_do_not(self, images):
        # The class is the drawn shape: the centre of a ring (the centroid
        # of its pixels) shows the background, the centre of a disc does not.
        train, _, _ = images
        flat = train.styles == _style_index("flat")
        corner = train.x[:, :1, :1, :]
        differs = np.abs(train.x - corner).max(axis=-1) > 0.05
        rows, cols = np.mgrid[:32, :32]
        for label, centre_is_shape in ((0, True), (4, False)):
            for mask in differs[flat & (train.y == label)]:
                row = int(round((rows * mask).sum() / mask.sum()))
                col = int(round((cols * mask).sum() / mask.sum()))
                assert mask[row, col] == centre_is_shape

    def test_styles_differ_in_pixel_statistics(self, images):
        train, _, _ = images

        def roughness(style):
            # Mean absolute difference between horizontal neighbours.
            selected = train.x[train.styles == _style_index(style)]
            return np.abs(np.diff(selected, axis=2)).mean()

        assert roughness("noisy") > 3 * roughness("flat")
        assert roughness("striped") > 2 * roughness("flat")
        assert roughness("gradient") < roughness("striped")

    def test_same_seed_same_data(self, images):
        train, test, _ = images
        train_again, test_again, _ = load_image_classification(
            num_train=300, num_test=60, image_size=32, num_classes=6, seed=5
        )
        for a, b in zip(train + test, train_again + test_again):
            np.testing.assert_array_equal(a, b)

    def test_different_seed_different_data(self, images):
        train, _, _ = images
        other, _, _ = load_image_classification(
            num_train=300, num_test=60, image_size=32, num_classes=6, seed=6
        )
        assert not np.array_equal(train.y, other.y)
        assert (np.abs(train.x - other.x).max(axis=(1, 2, 3)) > 0.1).all()

    def test_test_split_does_not_depend_on_num_train(self, images):
        _, test, _ = images
        _, test_again, _ = load_image_classification(
            num_train=11, num_test=60, image_size=32, num_classes=6, seed=5
        )
        np.testing.assert_array_equal(test.x, test_again.x)

    @pytest.mark.parametrize("image_size", [8, 20, 48])
    def test_other_image_sizes(self, image_size):
        train, _, info = load_image_classification(
            num_train=20, num_test=5, image_size=image_size, num_classes=8
        )
        assert train.x.shape == (20, image_size, image_size, 3)
        assert info["image_size"] == image_size
        assert set(train.y) == set(range(8))
        assert len(info["class_names"]) == 8

    @pytest.mark.parametrize(
        "kwargs, argument",
        [
            ({"num_train": 0}, "num_train=0"),
            ({"num_test": -2}, "num_test=-2"),
            ({"image_size": 7}, "image_size=7"),
            ({"image_size": 32.0}, "image_size=32.0"),
            ({"num_classes": 1}, "num_classes=1"),
            ({"num_classes": 9}, "num_classes=9"),
            ({"seed": -1}, "seed=-1"),
        ],
    )
    def test_bad_arguments_raise(self, kwargs, argument):
        with pytest.raises(ValueError, match=re.escape(argument)):
            load_image_classification(**kwargs)


def _edge_features(images):
    # Colour-invariant features: the gradient magnitude summed over
    # channels, (n, 31, 31), averaged over 3x3 blocks to (n, 100) and
    # normalised per image.
    horizontal = np.abs(np.diff(images, axis=2))[:, :-1].sum(axis=-1)
    vertical = np.abs(np.diff(images, axis=1))[:, :, :-1].sum(axis=-1)
    edges = (horizontal + vertical)[:, :30, :30]
    pooled = edges.reshape(len(images), 10, 3, 10, 3).mean(axis=(2, 4))
    pooled = pooled.reshape(len(images), 100)
    return 100.0 * pooled / pooled.sum(axis=1, keepdims=True)


def test_linear_model_on_edges_learns_shapes_in_every_style():
    # Softmax regression by full-batch gradient descent; np.einsum keeps
    # BLAS threads (slow on a busy 2-core machine) out of it.
    train, test, _ = load_image_classification(
        num_train=2000, num_test=1000, num_classes=6, seed=0
    )
    train_features = _edge_features(train.x)
    mean = train_features.mean(axis=0)
    stddev = train_features.std(axis=0) + 1e-6
    train_features = (train_features - mean) / stddev
    test_features = (_edge_features(test.x) - mean) / stddev
    one_hot = np.eye(6, dtype=np.float32)[train.y]
    weights = np.zeros((100, 6), dtype=np.float32)
    bias = np.zeros(6, dtype=np.float32)
    for _ in range(200):
        logits = np.einsum("nf,fc->nc", train_features, weights) + bias
        logits -= logits.max(axis=1, keepdims=True)
        probabilities = np.exp(logits)
        probabilities /= probabilities.sum(axis=1, keepdims=True)
        error = (probabilities - one_hot) / len(one_hot)
        weights -= 0.5 * np.einsum("nf,nc->fc", train_features, error)
        bias -= 0.5 * error.sum(axis=0)
    logits = np.einsum("nf,fc->nc", test_features, weights) + bias
    correct = logits.argmax(axis=1) == test.y
    # Chance is 1/6.
    assert correct.mean() > 0.6, correct.mean()
    for style in range(NUM_STYLES):
        assert correct[test.styles == style].mean() > 0.35
