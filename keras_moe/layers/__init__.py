"""keras_moe layers, one public layer per module."""

from keras_moe.layers.base_router import BaseRouter
from keras_moe.layers.bias_balanced_router import BiasBalancedRouter
from keras_moe.layers.dense_moe import DenseMoE
from keras_moe.layers.expert_choice_router import ExpertChoiceRouter
from keras_moe.layers.expert_ffn import ExpertFFN
from keras_moe.layers.feed_forward import FeedForward
from keras_moe.layers.noisy_top_k_router import NoisyTopKRouter
from keras_moe.layers.soft_moe import SoftMoE
from keras_moe.layers.sparse_moe import SparseMoE
from keras_moe.layers.top_k_router import TopKRouter
