"""Vision Transformer models: the architecture, presets and position embeddings."""

from vitkit.models.pos_embed import resample_pos_embed, sincos_1d, sincos_2d
from vitkit.models.presets import PRESETS, create_model, preset_config
from vitkit.models.vit import Attention, Block, PatchEmbed, ViTConfig, VisionTransformer, num_parameters

__all__ = [
    "Attention",
    "Block",
    "PRESETS",
    "PatchEmbed",
    "ViTConfig",
    "VisionTransformer",
    "create_model",
    "num_parameters",
    "preset_config",
    "resample_pos_embed",
    "sincos_1d",
    "sincos_2d",
]
