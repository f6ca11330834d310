"""Model builders: MoE transformers for text and ViT-MoE for images."""

from keras_moe.models.causal_lm import causal_language_model
from keras_moe.models.placement import moe_block_indices
from keras_moe.models.routing_report import moe_blocks
from keras_moe.models.routing_report import routing_decisions
from keras_moe.models.text_classifier import text_classifier
from keras_moe.models.transformer_block import TransformerBlock
from keras_moe.models.transformer_block import feed_forward_layer
from keras_moe.models.vit_layers import PatchEmbedding
from keras_moe.models.vit_layers import TokenPooling
from keras_moe.models.vit_moe import vit_moe_classifier
