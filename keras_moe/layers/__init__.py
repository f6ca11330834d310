"""keras_moe layers, one public layer per module."""

from keras_moe.layers.expert_ffn import ExpertFFN
from keras_moe.layers.feed_forward import FeedForward
from keras_moe.layers.sparse_moe import SparseMoE
from keras_moe.layers.top_k_router import TopKRouter
