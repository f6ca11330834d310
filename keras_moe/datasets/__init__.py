"""Datasets for the keras-moe examples.

Synthetic data, generated offline in about a second, with "domains" or
"styles" for experts to specialise on:

- `load_text_classification`: byte-level binary classification, 5 domains.
- `load_language_modeling`: byte-level language modelling, same 5 domains.
- `load_image_classification`: shapes drawn in 5 visual styles.

The same structures from real data through `tensorflow_datasets` (imported
only when one of these is called):

- `load_imdb_reviews`, `load_tiny_shakespeare`, `load_image_dataset`
  (CIFAR-10 or MNIST).

Every loader returns `(train, test, info)`: two named tuples `(x, y, domains)`
(`TextSplit`) or `(x, y, styles)` (`ImageSplit`) of NumPy arrays, and a dict
of names and sizes.
"""

from keras_moe.datasets.synthetic_images import ImageSplit
from keras_moe.datasets.synthetic_images import load_image_classification
from keras_moe.datasets.synthetic_text import TextSplit
from keras_moe.datasets.synthetic_text import decode_bytes
from keras_moe.datasets.synthetic_text import load_language_modeling
from keras_moe.datasets.synthetic_text import load_text_classification
from keras_moe.datasets.tfds_loaders import load_image_dataset
from keras_moe.datasets.tfds_loaders import load_imdb_reviews
from keras_moe.datasets.tfds_loaders import load_tiny_shakespeare
