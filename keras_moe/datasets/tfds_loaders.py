"""Real datasets through `tensorflow_datasets`, as NumPy arrays.

Each loader returns the same structure as its synthetic counterpart, so an
example can switch between generated and real data with one flag:

| loader                | same structure as            |
|-----------------------|------------------------------|
| `load_imdb_reviews`   | `load_text_classification`   |
| `load_tiny_shakespeare` | `load_language_modeling`   |
| `load_image_dataset`  | `load_image_classification`  |

Real data has no domains or styles: those arrays are all zeros and the
single domain/style name is the dataset's name.

`tensorflow_datasets` (and TensorFlow) is imported inside the functions, so
`keras_moe` does not need it. The first call downloads and prepares the
dataset under `data_dir` (default `~/tensorflow_datasets`); pass
`download=False` to fail fast when it must already be there. NumPy arrays are
returned (not `tf.data`) so the data feeds Keras on JAX, TensorFlow and
PyTorch alike; all four datasets fit in memory.
"""

import numpy as np

from keras_moe import _checks
from keras_moe.datasets import synthetic_images
from keras_moe.datasets import synthetic_text

IMAGE_DATASET_NAMES = ("cifar10", "mnist")
_BATCH_SIZE = 1024


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError(
            "This loader needs `tensorflow-datasets` (and TensorFlow): "
            "`pip install tensorflow-datasets tensorflow-cpu`, or "
            "`pip install keras-moe[examples]`. The synthetic loaders of "
            "`keras_moe.datasets` need neither."
        ) from error
    return tfds


def _load_split(name, split, max_examples, data_dir, download):
    """Loads one split as a dict of NumPy arrays, plus the `DatasetInfo`."""
    tfds = _import_tfds()
    dataset, dataset_info = tfds.load(
        name,
        split=split,
        data_dir=data_dir,
        download=download,
        with_info=True,
        shuffle_files=False,
    )
    if max_examples is not None:
        dataset = dataset.take(max_examples)
    batches = list(tfds.as_numpy(dataset.batch(_BATCH_SIZE)))
    if not batches:
        raise ValueError(
            f"Received an empty split: `{name}` has no examples in "
            f"split={split!r}."
        )
    arrays = {
        key: np.concatenate([batch[key] for batch in batches])
        for key in batches[0]
    }
    return arrays, dataset_info


def _encode_byte_strings(texts, sequence_length):
    """Byte strings -> int32 `(len(texts), sequence_length)`, 0-padded.

    Longer texts keep their first `sequence_length` bytes. NUL bytes are
    removed first so that id 0 only ever means padding.
    """
    padded = b"".join(
        text.replace(b"\0", b"")[:sequence_length].ljust(sequence_length, b"\0")
        for text in texts
    )
    tokens = np.frombuffer(padded, dtype=np.uint8)
    return tokens.reshape(len(texts), sequence_length).astype(np.int32)


def load_imdb_reviews(
    sequence_length=512,
    max_examples=None,
    train_split="train",
    test_split="test",
    data_dir=None,
    download=True,
):
    """Loads IMDB movie reviews as byte token ids (TFDS `imdb_reviews`).

    Same structure as `load_text_classification`. Each review is UTF-8 bytes
    (HTML line breaks `<br />` included, as in the raw data), cut to its
    first `sequence_length` bytes and padded with 0. Reviews average about
    1,300 bytes, so short `sequence_length`s see only their beginning.

    Args:
        sequence_length: positive int, bytes per example.
        max_examples: `None` (all 25,000) or a positive int, the number of
            examples kept from the start of each split.
        train_split: TFDS split string for `train`, e.g. `"train[:10%]"`.
        test_split: TFDS split string for `test`.
        data_dir: where TFDS keeps its data; `None` for its default.
        download: whether TFDS may download and prepare the data.

    Returns:
        `(train, test, info)`. `train` and `test` are `TextSplit` named
        tuples `(x, y, domains)`: `x` int32 `(num, sequence_length)` byte ids,
        `y` int32 `(num,)` (0 = `"neg"`, 1 = `"pos"`), `domains` int32
        `(num,)` of zeros. `info` has the keys of
        `load_text_classification`'s: `class_names`, `domain_names`
        (`["imdb_reviews"]`), `label_descriptions`, `vocabulary_size` (256),
        `padding_id` (0), `sequence_length`.
    """
    sequence_length = _checks.check_positive_int(
        "sequence_length", sequence_length
    )
    max_examples = _checks.check_optional_positive_int(
        "max_examples", max_examples
    )
    splits = []
    for split in (train_split, test_split):
        arrays, dataset_info = _load_split(
            "imdb_reviews", split, max_examples, data_dir, download
        )
        num_examples = len(arrays["label"])
        splits.append(
            synthetic_text.TextSplit(
                x=_encode_byte_strings(arrays["text"], sequence_length),
                y=arrays["label"].astype(np.int32),
                domains=np.zeros(num_examples, dtype=np.int32),
            )
        )
    info = {
        "class_names": list(dataset_info.features["label"].names),
        "domain_names": ["imdb_reviews"],
        "label_descriptions": {
            "imdb_reviews": "pos: the reviewer's rating is 7/10 or more"
        },
        "vocabulary_size": synthetic_text.VOCABULARY_SIZE,
        "padding_id": synthetic_text.PADDING_ID,
        "sequence_length": sequence_length,
    }
    return splits[0], splits[1], info


def _language_modeling_windows(stream, sequence_length, max_examples, split):
    # uint8 stream -> non-overlapping windows of sequence_length + 1 bytes.
    window = sequence_length + 1
    num_sequences = len(stream) // window
    if max_examples is not None:
        num_sequences = min(num_sequences, max_examples)
    if num_sequences == 0:
        raise ValueError(
            f"Received too large a `sequence_length` for split={split!r}: it "
            f"holds {len(stream)} bytes, fewer than sequence_length + 1 = "
            f"{window}. Received: sequence_length={sequence_length}"
        )
    tokens = stream[: num_sequences * window].astype(np.int32)
    tokens = tokens.reshape(num_sequences, window)
    return synthetic_text.TextSplit(
        x=tokens[:, :-1],
        y=tokens[:, 1:],
        domains=np.zeros((num_sequences, sequence_length), dtype=np.int32),
    )


def load_tiny_shakespeare(
    sequence_length=128,
    max_examples=None,
    train_split="train",
    test_split="test",
    data_dir=None,
    download=True,
):
    """Loads Tiny Shakespeare as byte-level LM sequences (TFDS).

    Same structure as `load_language_modeling`. The text of a split (one
    long string in TFDS: about 1 MB for train, 55 kB for test) is cut into
    non-overlapping windows of `sequence_length + 1` bytes; the tail that
    does not fill a window is dropped. The text is ASCII.

    Args:
        sequence_length: positive int, length of the input sequences.
        max_examples: `None` or a positive int, the maximum number of
            sequences per split (taken from the start of the text).
        train_split: TFDS split string for `train` (`"train"`,
            `"validation"` or `"test"`).
        test_split: TFDS split string for `test`.
        data_dir: where TFDS keeps its data; `None` for its default.
        download: whether TFDS may download and prepare the data.

    Returns:
        `(train, test, info)`. `train` and `test` are `TextSplit` named
        tuples `(x, y, domains)` of int32 arrays `(num, sequence_length)`:
        input bytes, next-byte targets and zeros. `info` has the keys of
        `load_language_modeling`'s: `domain_names` (`["tiny_shakespeare"]`),
        `vocabulary_size` (256), `padding_id` (0, unused),
        `sequence_length` and `document_separator` (`None`: one document).

    Raises:
        ValueError: if a split has fewer than `sequence_length + 1` bytes.
    """
    sequence_length = _checks.check_positive_int(
        "sequence_length", sequence_length
    )
    max_examples = _checks.check_optional_positive_int(
        "max_examples", max_examples
    )
    splits = []
    for split in (train_split, test_split):
        arrays, _ = _load_split(
            "tiny_shakespeare", split, None, data_dir, download
        )
        stream = np.frombuffer(b"".join(arrays["text"]), dtype=np.uint8)
        splits.append(
            _language_modeling_windows(
                stream, sequence_length, max_examples, split
            )
        )
    info = {
        "domain_names": ["tiny_shakespeare"],
        "vocabulary_size": synthetic_text.VOCABULARY_SIZE,
        "padding_id": synthetic_text.PADDING_ID,
        "sequence_length": sequence_length,
        "document_separator": None,
    }
    return splits[0], splits[1], info


def _resize_bilinear(images, image_size):
    """Bilinear resize of float `(n, h, w, c)` to `(n, size, size, c)`.

    Half-pixel centres without antialiasing, as
    `tf.image.resize(..., method="bilinear")`; for an exact factor of two
    down this averages 2x2 blocks.
    """

    def sample_points(input_size):
        # Source coordinate of each output pixel centre, clamped to the
        # input; the two neighbours and the weight of the upper one.
        scale = input_size / image_size
        source = (np.arange(image_size) + 0.5) * scale - 0.5
        source = np.clip(source, 0.0, input_size - 1)
        lower = np.floor(source).astype(np.int64)
        upper = np.minimum(lower + 1, input_size - 1)
        weight = (source - lower).astype(images.dtype)
        return lower, upper, weight

    _, height, width, _ = images.shape
    row_lower, row_upper, row_weight = sample_points(height)
    col_lower, col_upper, col_weight = sample_points(width)
    row_weight = row_weight[None, :, None, None]
    col_weight = col_weight[None, None, :, None]
    # (n, size, w, c), then (n, size, size, c).
    rows = images[:, row_lower] * (1 - row_weight) + (
        images[:, row_upper] * row_weight
    )
    return rows[:, :, col_lower] * (1 - col_weight) + (
        rows[:, :, col_upper] * col_weight
    )


def load_image_dataset(
    name="cifar10",
    image_size=32,
    max_examples=None,
    train_split="train",
    test_split="test",
    data_dir=None,
    download=True,
):
    """Loads CIFAR-10 or MNIST as float images (TFDS).

    Same structure as `load_image_classification`: float32 RGB in `[0, 1]`.
    MNIST's single channel is repeated three times. Images are resized
    bilinearly when `image_size` differs from the native size (32 for
    CIFAR-10, 28 for MNIST), so the default `image_size=32` also pads MNIST
    out to the synthetic images' size.

    Args:
        name: `"cifar10"` or `"mnist"`.
        image_size: `None` (native size) or an int >= 8.
        max_examples: `None` or a positive int, the number of examples kept
            from the start of each split.
        train_split: TFDS split string for `train`.
        test_split: TFDS split string for `test`.
        data_dir: where TFDS keeps its data; `None` for its default.
        download: whether TFDS may download and prepare the data.

    Returns:
        `(train, test, info)`. `train` and `test` are `ImageSplit` named
        tuples `(x, y, styles)`: `x` float32 `(num, size, size, 3)` in
        `[0, 1]`, `y` int32 `(num,)`, `styles` int32 `(num,)` of zeros.
        `info` has the keys of `load_image_classification`'s:
        `class_names` (TFDS's label names), `style_names` (`[name]`),
        `image_size` and `num_classes`.
    """
    if name not in IMAGE_DATASET_NAMES:
        raise ValueError(
            "Received an invalid value for `name`, expected one of "
            f"{IMAGE_DATASET_NAMES}. Received: name={name!r}"
        )
    if image_size is not None:
        image_size = _checks.check_positive_int(
            "image_size",
            image_size,
            minimum=synthetic_images.MIN_IMAGE_SIZE,
        )
    max_examples = _checks.check_optional_positive_int(
        "max_examples", max_examples
    )
    splits = []
    for split in (train_split, test_split):
        arrays, dataset_info = _load_split(
            name, split, max_examples, data_dir, download
        )
        # uint8 (n, h, w, 1 or 3) -> float32 (n, h, w, 3) in [0, 1].
        images = arrays["image"].astype(np.float32) / 255.0
        if images.shape[-1] == 1:
            images = np.repeat(images, 3, axis=-1)
        if image_size is not None and images.shape[1:3] != (
            image_size,
            image_size,
        ):
            images = _resize_bilinear(images, image_size)
        splits.append(
            synthetic_images.ImageSplit(
                x=np.clip(images, 0.0, 1.0).astype(np.float32),
                y=arrays["label"].astype(np.int32),
                styles=np.zeros(len(images), dtype=np.int32),
            )
        )
    class_names = list(dataset_info.features["label"].names)
    info = {
        "class_names": class_names,
        "style_names": [name],
        "image_size": splits[0].x.shape[1],
        "num_classes": len(class_names),
    }
    return splits[0], splits[1], info
