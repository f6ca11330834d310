"""Procedurally drawn shape images in several visual styles.

Each image shows one shape (the class) drawn in one of five styles:

| id | style      | background                               | shape          |
|----|------------|------------------------------------------|----------------|
| 0  | `flat`     | one flat colour                          | filled         |
| 1  | `noisy`    | flat colour, then pixel noise everywhere | filled         |
| 2  | `gradient` | linear gradient between two colours      | filled         |
| 3  | `outline`  | one flat colour                          | outline only   |
| 4  | `striped`  | stripes of two colours, period ~size/6   | filled         |

Shape classes, in order (`num_classes` takes the first ones): circle, square,
triangle, cross, ring, diamond, star, crescent. Position (up to 12% of the
image off centre), size (22% to 32% of the image side as half-extent),
rotation (up to 15 degrees either way, so squares never look like diamonds)
and colours vary per image; the shape is always light on a dark background or
dark on a light one, so it stays visible. The styles change low-level patch
statistics a lot while the class depends on global shape, which gives the
experts of a ViT-MoE something to divide up: background texture, edges,
filled interiors.

Drawing is vectorised NumPy on signed distance functions with anti-aliased
edges; 10,000 images of 32x32 take about half a second. Seeded and
deterministic (NumPy `PCG64`).
"""

import collections

import numpy as np

from keras_moe import _checks

ImageSplit = collections.namedtuple("ImageSplit", ["x", "y", "styles"])
ImageSplit.__doc__ = """One split of an image classification dataset.

Fields:
    x: float32 array `(num_examples, image_size, image_size, 3)`, values in
        `[0, 1]`.
    y: int32 array `(num_examples,)` of class ids.
    styles: int32 array `(num_examples,)` of style ids, indexing
        `info["style_names"]`.
"""

SHAPE_NAMES = (
    "circle",
    "square",
    "triangle",
    "cross",
    "ring",
    "diamond",
    "star",
    "crescent",
)
STYLE_NAMES = ("flat", "noisy", "gradient", "outline", "striped")
MIN_IMAGE_SIZE = 8
_NOISE_STDDEV = 0.12
_MAX_ROTATION = np.deg2rad(15.0)
# Images are drawn in chunks to bound the memory of the float temporaries.
_CHUNK_SIZE = 512


# === Signed distance functions ===
# Each takes the shape-frame coordinates `u, v` (any shape, in units of the
# shape's half-extent) and returns the signed distance in the same units:
# negative inside, zero on the edge. Star and diamond are close approximations,
# which only blurs their anti-aliased edge a little.
def _length(x, y):
    # np.hypot is about 8x slower and its overflow safety is not needed here.
    return np.sqrt(x * x + y * y)


def _box(u, v, half_width, half_height):
    qx = np.abs(u) - half_width
    qy = np.abs(v) - half_height
    outside = _length(np.maximum(qx, 0.0), np.maximum(qy, 0.0))
    inside = np.minimum(np.maximum(qx, qy), 0.0)
    return outside + inside


def _circle(u, v):
    return _length(u, v) - 1.0


def _square(u, v):
    return _box(u, v, 0.85, 0.85)


def _triangle(u, v):
    # Equilateral triangle pointing up (image rows grow downwards, hence -v),
    # after Inigo Quilez's sdEquilateralTriangle; circumradius 1.1.
    r = 0.95
    k = 3.0**0.5
    px = np.abs(u) - r
    py = -v + r / k
    fold = px + k * py > 0.0
    px, py = (
        np.where(fold, (px - k * py) / 2.0, px),
        np.where(fold, (-k * px - py) / 2.0, py),
    )
    px = px - np.clip(px, -2.0 * r, 0.0)
    return -_length(px, py) * np.sign(py)


def _cross(u, v):
    return np.minimum(_box(u, v, 1.0, 0.3), _box(u, v, 0.3, 1.0))


def _ring(u, v):
    return np.abs(_length(u, v) - 0.72) - 0.28


def _diamond(u, v):
    return (np.abs(u) + np.abs(v) - 1.15) * 0.5**0.5


def _star(u, v):
    # Five points: the boundary radius goes linearly from 0.5 (between
    # points) to 1.1 (at a point) with the polar angle.
    radius = _length(u, v)
    turns = np.arctan2(v, u) * (5.0 / (2.0 * np.pi)) + 0.25
    closeness_to_point = 1.0 - 2.0 * np.abs(turns - np.floor(turns) - 0.5)
    boundary = 0.5 + 0.6 * closeness_to_point
    return (radius - boundary) * 0.6


def _crescent(u, v):
    return np.maximum(_length(u, v) - 1.0, 0.8 - _length(u - 0.5, v))


_SHAPE_FUNCTIONS = (
    _circle,
    _square,
    _triangle,
    _cross,
    _ring,
    _diamond,
    _star,
    _crescent,
)


def _draw_chunk(rng, labels, styles, image_size):
    """Draws `len(labels)` images; returns float32 `(n, 3, size, size)`.

    Channels come first while drawing because NumPy broadcasts an
    `(n, 1, size, size)` mask against `(n, 3, 1, 1)` colours far faster than
    `(n, size, size, 1)` against `(n, 1, 1, 3)`.
    """
    n = len(labels)
    size = float(image_size)
    # Pixel centres, (1, size, 1) and (1, 1, size).
    rows = (np.arange(image_size, dtype=np.float32) + 0.5)[None, :, None]
    cols = (np.arange(image_size, dtype=np.float32) + 0.5)[None, None, :]

    def per_image(values):
        # (n,) -> float32 (n, 1, 1), broadcasting against (n, size, size).
        return values.astype(np.float32)[:, None, None]

    # Per-image geometry, each (n, 1, 1).
    centre_x = per_image(size / 2 + rng.uniform(-0.12, 0.12, n) * size)
    centre_y = per_image(size / 2 + rng.uniform(-0.12, 0.12, n) * size)
    half_extent = per_image(rng.uniform(0.22, 0.32, n) * size)
    angle = rng.uniform(-_MAX_ROTATION, _MAX_ROTATION, n)
    cos_angle, sin_angle = per_image(np.cos(angle)), per_image(np.sin(angle))

    # Shape-frame coordinates, (n, size, size).
    dx = cols - centre_x
    dy = rows - centre_y
    u = (cos_angle * dx + sin_angle * dy) / half_extent
    v = (-sin_angle * dx + cos_angle * dy) / half_extent

    # Signed distance in pixels, (n, size, size).
    distance = np.empty((n, image_size, image_size), dtype=np.float32)
    for label, shape_function in enumerate(_SHAPE_FUNCTIONS):
        selected = labels == label
        if selected.any():
            distance[selected] = shape_function(u[selected], v[selected])
    distance *= half_extent

    # Anti-aliased coverage in [0, 1], (n, 1, size, size): a one-pixel ramp
    # across the edge, or a stroke of about size/16 pixels for outlines.
    coverage = np.clip(0.5 - distance, 0.0, 1.0)
    is_outline = styles == STYLE_NAMES.index("outline")
    half_stroke = max(0.75, size / 32.0)
    coverage[is_outline] = np.clip(
        half_stroke + 0.5 - np.abs(distance[is_outline]), 0.0, 1.0
    )
    coverage = coverage[:, None]

    # Colours, (n, 3, 1, 1): light shape on dark ground or the reverse.
    dark_ground = (rng.random(n) < 0.5)[:, None]
    dark = rng.uniform(0.0, 0.4, (n, 3))
    light = rng.uniform(0.6, 1.0, (n, 3))
    second_dark = rng.uniform(0.0, 0.4, (n, 3))
    second_light = rng.uniform(0.6, 1.0, (n, 3))

    def per_image_colour(values):
        return values.astype(np.float32)[:, :, None, None]

    ground = per_image_colour(np.where(dark_ground, dark, light))
    second_ground = per_image_colour(
        np.where(dark_ground, second_dark, second_light)
    )
    ink = per_image_colour(np.where(dark_ground, light, dark))

    # Background blend weight, (n, 1, size, size): 0 (flat), a ramp between
    # the two ground colours (gradient) or a square wave (stripes), both
    # along a random direction.
    direction = rng.uniform(0.0, 2.0 * np.pi, n)
    period = rng.uniform(size / 7, size / 5, n)
    blend = np.zeros((n, image_size, image_size), dtype=np.float32)
    for style_name in ("gradient", "striped"):
        selected = styles == STYLE_NAMES.index(style_name)
        along = per_image(np.cos(direction[selected])) * (
            cols - size / 2
        ) + per_image(np.sin(direction[selected])) * (rows - size / 2)
        if style_name == "gradient":
            blend[selected] = np.clip(0.5 + along / size, 0.0, 1.0)
        else:
            half_periods = np.floor(along * (2.0 / per_image(period[selected])))
            blend[selected] = half_periods.astype(np.int32) & 1
    blend = blend[:, None]

    # Images, (n, 3, size, size).
    background = ground + (second_ground - ground) * blend
    images = background + (ink - background) * coverage
    is_noisy = styles == STYLE_NAMES.index("noisy")
    noise = rng.standard_normal(
        (int(is_noisy.sum()), 3, image_size, image_size), dtype=np.float32
    )
    images[is_noisy] += _NOISE_STDDEV * noise
    return np.clip(images, 0.0, 1.0, out=images)


def _image_split(rng, num_examples, image_size, num_classes):
    num_styles = len(STYLE_NAMES)
    index = np.arange(num_examples)
    # Labels and styles balanced (jointly when num_examples is a multiple of
    # num_classes * num_styles), then shuffled together.
    labels = index % num_classes
    styles = (index // num_classes) % num_styles
    order = rng.permutation(num_examples)
    labels = labels[order].astype(np.int32)
    styles = styles[order].astype(np.int32)
    images = np.empty(
        (num_examples, image_size, image_size, 3), dtype=np.float32
    )
    for start in range(0, num_examples, _CHUNK_SIZE):
        stop = min(start + _CHUNK_SIZE, num_examples)
        chunk = _draw_chunk(
            rng, labels[start:stop], styles[start:stop], image_size
        )
        # (n, 3, size, size) -> (n, size, size, 3).
        images[start:stop] = chunk.transpose(0, 2, 3, 1)
    return ImageSplit(x=images, y=labels, styles=styles)


def load_image_classification(
    num_train=10000,
    num_test=2000,
    image_size=32,
    num_classes=6,
    seed=0,
):
    """Loads a synthetic image classification task: shapes in five styles.

    See the module docstring for the shapes and styles. Classes and styles
    are balanced and independent of each other.

    Args:
        num_train: positive int, number of training images.
        num_test: positive int, number of test images.
        image_size: int >= 8, height and width in pixels.
        num_classes: int in `[2, 8]`; the first `num_classes` shapes of
            `SHAPE_NAMES` are used.
        seed: non-negative int. The same seed gives the same arrays; the
            test split does not depend on `num_train`.

    Returns:
        `(train, test, info)`. `train` and `test` are `ImageSplit` named
        tuples `(x, y, styles)`:
        - `x`: float32 `(num, image_size, image_size, 3)` in `[0, 1]`.
        - `y`: int32 `(num,)` class ids.
        - `styles`: int32 `(num,)` style ids.
        `info` is a dict with `class_names`, `style_names`, `image_size`
        and `num_classes`.

    Example:

    >>> train, test, info = load_image_classification(
    ...     num_train=64, num_test=16, image_size=16, num_classes=4)
    >>> train.x.shape, train.x.dtype, train.y.shape, train.styles.shape
    ((64, 16, 16, 3), dtype('float32'), (64,), (64,))
    >>> info["class_names"]
    ['circle', 'square', 'triangle', 'cross']
    """
    num_train = _checks.check_positive_int("num_train", num_train)
    num_test = _checks.check_positive_int("num_test", num_test)
    image_size = _checks.check_positive_int(
        "image_size", image_size, minimum=MIN_IMAGE_SIZE
    )
    num_classes = _checks.check_positive_int(
        "num_classes", num_classes, minimum=2
    )
    if num_classes > len(SHAPE_NAMES):
        raise ValueError(
            "Received an invalid value for `num_classes`, expected an "
            f"integer in [2, {len(SHAPE_NAMES)}]. "
            f"Received: num_classes={num_classes}"
        )
    seed = _checks.check_seed(seed)
    train = _image_split(
        np.random.default_rng([seed, 0]), num_train, image_size, num_classes
    )
    test = _image_split(
        np.random.default_rng([seed, 1]), num_test, image_size, num_classes
    )
    info = {
        "class_names": list(SHAPE_NAMES[:num_classes]),
        "style_names": list(STYLE_NAMES),
        "image_size": image_size,
        "num_classes": num_classes,
    }
    return train, test, info
