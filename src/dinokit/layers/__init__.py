"""DINOv2 building blocks, one small module each (after Meta's dinov2/layers)."""

from dinokit.layers.attention import Attention
from dinokit.layers.block import Block
from dinokit.layers.drop_path import DropPath, drop_add_residual_stochastic_depth
from dinokit.layers.layer_scale import LayerScale
from dinokit.layers.mlp import Mlp, SwiGLUFFN, swiglu_hidden_features
from dinokit.layers.patch_embed import PatchEmbed
from dinokit.layers.position_embedding import PositionEmbedding

__all__ = [
    "Attention",
    "Block",
    "DropPath",
    "LayerScale",
    "Mlp",
    "PatchEmbed",
    "PositionEmbedding",
    "SwiGLUFFN",
    "drop_add_residual_stochastic_depth",
    "swiglu_hidden_features",
]
