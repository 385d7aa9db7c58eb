"""Seed 001's two-headed model: a backbone's pooled feature → a class and a bounding box.

The backbone is a vitkit ViT (the feature is the class token after the final norm, `forward_features` then
`pool`) or torchvision's ResNet-18 (the global-average-pooled feature, its `fc` replaced by the identity).
On that feature sit two MLPs of the same shape, D → hidden → ReLU → Dropout → out: the classifier (out =
classes) and the box regressor (out = 4, (cx, cy, w, h), through a sigmoid by default so boxes stay in [0, 1]).

`BoxModel.spec()` describes the architecture in plain values; `BoxModel.from_spec` rebuilds it (fresh weights),
which is how a checkpoint is reloaded on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from vitkit.errors import VitkitError
from vitkit.models.presets import preset_config
from vitkit.models.pretrained import freeze_blocks, load_pretrained, read_state_dict
from vitkit.models.vit import ViTConfig, VisionTransformer

BACKBONES = ("vit", "resnet18")
RESNET18_FEATURES = 512


def _mlp(dim: int, hidden: int, out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out))


class BoxModel(nn.Module):
    """Returns (logits (B, classes), boxes (B, 4)) from a backbone's pooled feature of width `feature_dim`."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, hidden: int = 512,
                 dropout: float = 0.2, sigmoid: bool = True):
        super().__init__()
        if num_classes < 1 or hidden < 1 or not 0 <= dropout < 1:
            raise VitkitError(f"box model needs classes ≥ 1, hidden ≥ 1 and dropout in [0, 1), got {num_classes}, "
                              f"{hidden}, {dropout}")
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.hidden = hidden
        self.dropout = dropout
        self.sigmoid = sigmoid
        self.classifier = _mlp(feature_dim, hidden, num_classes, dropout)
        self.regressor = _mlp(feature_dim, hidden, 4, dropout)  # the sigmoid has no weights: same keys either way

    def features(self, x: Tensor) -> Tensor:
        """The pooled feature (B, D): a ViT's class token after the final norm, a ResNet's pooled map."""
        if isinstance(self.backbone, VisionTransformer):
            z, _ = self.backbone.forward_features(x)
            return z[:, 0]
        return self.backbone(x)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.features(x)
        # The heads run in float32 even under bf16 autocast: they cost nothing, and a box coordinate in bf16 is
        # only good to 1/256 (about a pixel at 224) — too coarse for IoU ≥ 0.9.
        with torch.autocast(f.device.type, enabled=False):
            f = f.float()
            boxes = self.regressor(f)
            return self.classifier(f), boxes.sigmoid() if self.sigmoid else boxes

    def spec(self) -> dict[str, Any]:
        """The architecture as plain values (JSON), for checkpoints."""
        head = {"num_classes": self.num_classes, "hidden": self.hidden, "dropout": self.dropout, "sigmoid": self.sigmoid}
        if isinstance(self.backbone, VisionTransformer):
            return {"backbone": "vit", "vit": self.backbone.cfg.to_dict(), **head}
        return {
            "backbone": "resnet18",
            "in_channels": self.backbone.conv1.in_channels,
            "cifar_stem": isinstance(self.backbone.maxpool, nn.Identity),
            **head,
        }

    @classmethod
    def from_spec(cls, spec: dict[str, Any]) -> BoxModel:
        """A freshly initialised model of `spec` (as `spec()` writes it)."""
        head = {k: spec[k] for k in ("num_classes", "hidden", "dropout", "sigmoid")}
        if spec["backbone"] == "vit":
            backbone = VisionTransformer(ViTConfig.from_dict(spec["vit"]))
            return cls(backbone, backbone.cfg.dim, **head)
        if spec["backbone"] == "resnet18":
            return cls(resnet18_backbone(None, spec["in_channels"], spec["cifar_stem"]), RESNET18_FEATURES, **head)
        raise VitkitError(f"unknown box-model backbone {spec['backbone']!r}: use one of {', '.join(BACKBONES)}")


def vit_backbone(
    model: str = "vit_tiny", *, image_size: int, pretrained: str | Path | None = None, patch_size: int | None = None,
    in_channels: int = 3, freeze: int = 0, drop_path: float = 0.0, **shape: Any,
) -> VisionTransformer:
    """A headless ViT: the `pretrained` timm/Hugging Face weights (a file, folder or hub name; position embeddings
    resampled to `image_size`, the patch projection to `patch_size`), else a fresh `model` preset with the `shape`
    overrides (dim, depth, heads, mlp_dim); stochastic depth up to `drop_path`; the embeddings and first `freeze`
    blocks frozen."""
    if pretrained:
        vit = load_pretrained(pretrained, num_classes=0, image_size=image_size, patch_size=patch_size,
                              drop_path=drop_path)
        if vit.cfg.in_channels != in_channels:
            raise VitkitError(f"the pre-trained ViT takes {vit.cfg.in_channels}-channel images, the data has "
                              f"{in_channels}: use data with {vit.cfg.in_channels} channels")
    else:
        vit = VisionTransformer(preset_config(model, num_classes=0, image_size=image_size, patch_size=patch_size,
                                              in_channels=in_channels, drop_path=drop_path, **shape))
    freeze_blocks(vit, freeze)
    return vit


def resnet18_backbone(pretrained: str | Path | None = None, in_channels: int = 3, cifar_stem: bool = False) -> nn.Module:
    """torchvision's ResNet-18 without its classifier (`fc` is the identity: the output is the 512-wide pooled
    feature), with ImageNet weights from a local `pretrained` file where given: torchvision's state dict (e.g.
    resnet18-f37072fd.pth, read with weights_only) or a .safetensors of it; its `fc` is dropped. Nothing is
    downloaded."""
    from vitkit.models.resnet import resnet18

    net = resnet18(num_classes=1000, in_channels=in_channels, cifar_stem=cifar_stem)
    net.fc = nn.Identity()
    if pretrained:
        path = Path(pretrained).expanduser()
        if not path.is_file():
            raise VitkitError(f"ResNet-18 weights {pretrained} are not a local file: pass torchvision's "
                              "resnet18-f37072fd.pth or a .safetensors of it (nothing is downloaded)")
        from vitkit.train.checkpoint import load_weights  # here: vitkit.train imports vitkit.models

        state = {k: v.float() for k, v in read_state_dict(path).items() if not k.startswith("fc.")}
        # torchvision's released files predate batch norm's step counter; it does not change the outputs.
        state = {**{k: v for k, v in net.state_dict().items() if k.endswith("num_batches_tracked")}, **state}
        load_weights(net, state, str(path))
    return net
