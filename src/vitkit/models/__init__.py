"""Vision Transformer models: the architecture, presets, position embeddings and pre-trained weights; and a
ResNet-18 as a convolutional baseline and distillation teacher."""

from vitkit.models.pos_embed import resample_pos_embed, sincos_1d, sincos_2d
from vitkit.models.pretrained import (
    freeze_blocks,
    load_pretrained,
    read_pretrained,
    resample_patch_projection,
    timm_state_dict_from_hf,
)
from vitkit.models.presets import PRESETS, create_model, preset_config
from vitkit.models.resnet import CIFAR_STEM_MAX_SIZE, resnet18
from vitkit.models.vit import Attention, Block, PatchEmbed, ViTConfig, VisionTransformer, num_parameters

__all__ = [
    "Attention",
    "CIFAR_STEM_MAX_SIZE",
    "Block",
    "PRESETS",
    "PatchEmbed",
    "ViTConfig",
    "VisionTransformer",
    "create_model",
    "freeze_blocks",
    "load_pretrained",
    "num_parameters",
    "preset_config",
    "read_pretrained",
    "resample_patch_projection",
    "resample_pos_embed",
    "resnet18",
    "sincos_1d",
    "sincos_2d",
    "timm_state_dict_from_hf",
]
