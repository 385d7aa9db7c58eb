"""Named model shapes.

The 224/16 presets are Table 1 of Dosovitskiy et al. (seed 002) plus DeiT's Tiny and Small; the
small-image presets keep a ViT-Ti/S body on 32×32 images with 4×4 patches (64 tokens), Lee et al.'s
9-layer plain ViT for CIFAR, and a small model for the embedded 8×8 digits.
"""

from __future__ import annotations

from vitkit.errors import VitkitError
from vitkit.models.vit import ViTConfig, VisionTransformer

_TINY = dict(dim=192, depth=12, heads=3, mlp_dim=768)
_SMALL = dict(dim=384, depth=12, heads=6, mlp_dim=1536)

PRESETS: dict[str, dict] = {
    # ImageNet-size shapes, 224×224 with 16×16 patches (197 tokens).
    "vit_tiny": dict(**_TINY),  # 5.7M parameters (DeiT-Ti)
    "vit_small": dict(**_SMALL),  # 22M (DeiT-S)
    "vit_base": dict(dim=768, depth=12, heads=12, mlp_dim=3072),  # 86M
    "vit_large": dict(dim=1024, depth=24, heads=16, mlp_dim=4096),  # 307M
    "vit_huge": dict(dim=1280, depth=32, heads=16, mlp_dim=5120),  # 632M
    # 32×32 images (CIFAR), 4×4 patches: an 8×8 grid.
    "vit_tiny_32": dict(image_size=32, patch_size=4, num_classes=10, **_TINY),
    "vit_small_32": dict(image_size=32, patch_size=4, num_classes=10, **_SMALL),
    "vit_lite_32": dict(image_size=32, patch_size=4, num_classes=10, dim=192, depth=9, heads=12, mlp_dim=384),
    # 8×8 grey images (scikit-learn digits), 2×2 patches: a 4×4 grid.
    "vit_digits": dict(image_size=8, patch_size=2, in_channels=1, num_classes=10, dim=128, depth=4, heads=4, mlp_dim=256),
}


def preset_config(name: str, **overrides) -> ViTConfig:
    """The ViTConfig of a preset, with any field overridden (e.g. num_classes=100, drop_path=0.1)."""
    if name not in PRESETS:
        raise VitkitError(f"unknown preset {name!r}: choose one of {', '.join(PRESETS)}")
    return ViTConfig(**{**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})


def create_model(name: str, **overrides) -> VisionTransformer:
    """A freshly initialised VisionTransformer of a preset, e.g. `create_model("vit_tiny_32", num_classes=100)`."""
    return VisionTransformer(preset_config(name, **overrides))
