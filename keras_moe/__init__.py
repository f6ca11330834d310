"""keras-moe: sparse Mixture-of-Experts layers and models for Keras 3."""

from keras_moe import callbacks
from keras_moe import distribution
from keras_moe import losses
from keras_moe import models
from keras_moe import plotting
from keras_moe import routing
from keras_moe import upcycling
from keras_moe import utils
from keras_moe.layers import BiasBalancedRouter
from keras_moe.layers import DenseMoE
from keras_moe.layers import ExpertChoiceRouter
from keras_moe.layers import ExpertFFN
from keras_moe.layers import FeedForward
from keras_moe.layers import NoisyTopKRouter
from keras_moe.layers import SoftMoE
from keras_moe.layers import SparseMoE
from keras_moe.layers import TopKRouter

__version__ = "0.1.0"
