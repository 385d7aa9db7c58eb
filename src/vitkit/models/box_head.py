"""Seed 001's two-headed model: a backbone's pooled feature → a class and a bounding box.

The backbone is a vitkit ViT (the feature is the class token after the final norm, `forward_features` then
`pool`) or torchvision's ResNet-18 (the global-average-pooled feature, its `fc` replaced by the identity).
On that feature sit two MLPs of the same shape, D → hidden → ReLU → Dropout → out: the classifier (out =
classes) and the box regressor (out = 4, (cx, cy, w, h), through a sigmoid by default so boxes stay in [0, 1]).

`box_head="dense"` replaces seed 001's regressor by one that reads the grid of patch tokens (a ResNet's last
feature map) instead of the pooled feature: the same MLP shape runs on every cell and gives a weight and the
distances from the cell's centre to the four box edges (FCOS's parametrisation, Tian et al. 2019); the box is the
softmax-weighted mean of the cells' edges (a soft argmax, as in integral regression, Sun et al. 2018). The head runs
the same weights on every cell, so what it learns at one place holds at every other (the global MLP must learn the
map from features to coordinates for each position separately; the backbone's position embeddings are another
matter), and the weighted mean places an edge between cell centres, finer than the grid. Trained on the averaged box
alone, single cells are poor guesses (they cancel out in the mean); `forward(x, cells=True)` also returns every
cell's edges, for a per-cell loss (`vitkit train-boxes --cell-loss`) that makes each cell inside the box give the
box on its own, as FCOS trains its locations. In eval mode the averaged box is clipped to the image (a true box
lies inside it, so clipping can only raise the IoU); training leaves it free, so that an edge outside the image
still gets a gradient. The per-cell edges are returned raw (neither clipped nor scaled).

`region_pool` (dense head only) widens the classifier's input: besides the pooled feature, the grid's features
averaged with the dense head's cell weights, i.e. the features of where the head finds the object (a soft region of
interest pooling, as two-stage detectors classify a box's pooled features). The weights are taken without their
gradient, so the class loss does not move where the box head looks.

`zoom` (a margin, e.g. 1.2) classifies a second look: the backbone runs again on a square crop around the
predicted box, `zoom` times the box's longer side, resampled to the backbone's input size, and the classifier reads
that pass's pooled feature instead of the whole image's (a two-stage detector's classification of its proposals,
here with the backbone shared). The object then fills the input: with a margin of 1.2, a hand half the image wide
is seen through about 2.8 times as many patch tokens. The crop follows the box without its gradient (the class loss
does not move the box), and the box clipped to the image and before `box_scale`, so that training and evaluation
crop alike. It doubles the cost of a step.
`view_size` lets the crop hold detail the first pass never sees: the model takes images larger than the backbone's
size (say 448 for a 224 backbone), the first pass sees them resized to `view_size`, and the crop is cut from the
full image; a hand half of a 448-pixel image is then seen at about its own resolution.
`zoom_backbone` gives the second pass a backbone of its own (a copy of the first's initial weights, in the
two-stage detectors' manner of a separate classification network): the class and the box then learn apart, each
at its own pace, and neither's late training moves the other's features (`vitkit train-boxes --zoom-backbone own`,
with `--class-epochs` to stop the class's learning early). Twice the weights, the same cost per image.

`box_scale` multiplies the predicted widths and heights (about the boxes' centres) in eval mode: a correction for
training boxes drawn looser than the ones the model is judged on (`vitkit train-boxes --box-scale auto` fits it on
the validation images; see vitkit.train.boxes).

`flip_tta` makes eval mode average each image's predictions with those of its mirror image (the mirror's box
reflected back): test-time augmentation for a model trained with mirrored images (`--hflip`), which then predicts the
same class for an image and its mirror, and mirrored boxes.

`BoxModel.spec()` describes the architecture in plain values; `BoxModel.from_spec` rebuilds it (fresh weights),
which is how a checkpoint is reloaded on its own.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.data.boxes import cxcywh_to_xyxy, scale_sizes, square_crops, xyxy_to_cxcywh
from vitkit.errors import VitkitError
from vitkit.models.presets import preset_config
from vitkit.models.pretrained import freeze_blocks, load_pretrained, read_state_dict
from vitkit.models.vit import ViTConfig, VisionTransformer

BACKBONES = ("vit", "resnet18")
BOX_HEADS = ("mlp", "dense")
RESNET18_FEATURES = 512


def _mlp(dim: int, hidden: int, out: int, dropout: float) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out))


class DenseBoxRegressor(nn.Module):
    """One box (cx, cy, w, h) from a grid of features (B, rows, cols, D): per cell, an MLP gives a weight logit and
    the distances (l, t, r, b) from the cell's centre to the edges, each through a sigmoid (so in [0, 1] image
    fractions); the box's edges are the softmax-weighted means of the cells' edges, clipped to [0, 1] in eval
    mode."""

    def __init__(self, dim: int, hidden: int, dropout: float):
        super().__init__()
        self.mlp = _mlp(dim, hidden, 5, dropout)

    def per_cell(self, grid: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Per cell, row by row: the weights (B, cells) (summing to 1), the edges (B, cells, 4) (x1, y1, x2, y2) and
        the centres (cells, 2) (x, y), image fractions."""
        rows, cols = grid.shape[1:3]
        out = self.mlp(grid).flatten(1, 2)  # (B, cells, 5)
        ys = (torch.arange(rows, device=grid.device, dtype=out.dtype) + 0.5) / rows
        xs = (torch.arange(cols, device=grid.device, dtype=out.dtype) + 0.5) / cols
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        centres = torch.stack([cx, cy], dim=-1).flatten(0, 1)  # (cells, 2)
        outward = torch.tensor([-1.0, -1.0, 1.0, 1.0], device=grid.device, dtype=out.dtype)
        edges = centres.repeat(1, 2) + outward * out[..., 1:].sigmoid()
        return out[..., 0].softmax(dim=1), edges, centres

    def average(self, weight: Tensor, edges: Tensor) -> Tensor:
        """The box (B, 4) (cx, cy, w, h) from `per_cell`'s weights and edges: their weighted mean, clipped to the
        image in eval mode."""
        box = torch.einsum("bn,bnk->bk", weight, edges)
        return xyxy_to_cxcywh(box if self.training else box.clamp(0, 1))

    def forward(self, grid: Tensor) -> Tensor:
        """The box (B, 4)."""
        weight, edges, _ = self.per_cell(grid)
        return self.average(weight, edges)


class BoxModel(nn.Module):
    """Returns (logits (B, classes), boxes (B, 4)) from a backbone's features of width `feature_dim`: the classes
    from the pooled feature (with `region_pool`, also from the grid pooled where the dense head looks), the box
    from it too (`box_head="mlp"`, seed 001) or from the grid (`"dense"`); with `zoom`, the classes from a second pass
    over a crop around the box."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, hidden: int = 512,
                 dropout: float = 0.2, sigmoid: bool = True, box_head: str = "mlp", box_scale: float = 1.0,
                 flip_tta: bool = False, region_pool: bool = False, zoom: float = 0.0, view_size: int | None = None,
                 zoom_backbone: nn.Module | None = None):
        super().__init__()
        if num_classes < 1 or hidden < 1 or not 0 <= dropout < 1:
            raise VitkitError(f"box model needs classes ≥ 1, hidden ≥ 1 and dropout in [0, 1), got {num_classes}, "
                              f"{hidden}, {dropout}")
        if not 0 < box_scale < float("inf"):
            raise VitkitError(f"box scale {box_scale} is not a positive factor: pass e.g. 0.95, or 1 for none")
        if box_head not in BOX_HEADS:
            raise VitkitError(f"unknown box head {box_head!r}: use one of {', '.join(BOX_HEADS)}")
        if box_head == "dense" and not sigmoid:
            raise VitkitError("the dense box head bounds its edge distances itself: drop --no-sigmoid, or use "
                              "--box-head mlp")
        if region_pool and box_head != "dense":
            raise VitkitError("--region-pool pools the features where the dense box head looks: add --box-head "
                              "dense, or drop it")
        if zoom and not 1 <= zoom < float("inf"):
            raise VitkitError(f"zoom margin {zoom} would crop the object: pass a margin ≥ 1, e.g. 1.2, or 0 for none")
        if view_size is not None and view_size < 1:
            raise VitkitError(f"view size {view_size} is not positive: pass the backbone's image size, e.g. 224")
        if zoom and not sigmoid:
            raise VitkitError("--zoom crops around the predicted box, which needs its sizes bounded: drop --no-sigmoid")
        if zoom and region_pool:
            raise VitkitError("--zoom classifies a crop around the box, --region-pool the whole image's cells where "
                              "the box is: choose one")
        if zoom_backbone is not None and not zoom:
            raise VitkitError("a backbone of the zoom's own runs the second pass, which needs --zoom: add --zoom 1.2, "
                              "or drop --zoom-backbone own")
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.num_classes = num_classes
        self.hidden = hidden
        self.dropout = dropout
        self.sigmoid = sigmoid
        self.box_head = box_head
        self.box_scale = float(box_scale)
        self.flip_tta = bool(flip_tta)
        self.region_pool = bool(region_pool)
        self.zoom = float(zoom)
        self.view_size = view_size
        self.zoom_backbone = zoom_backbone  # None: the second pass runs `backbone`
        self.classifier = _mlp(feature_dim * (2 if region_pool else 1), hidden, num_classes, dropout)
        # The mlp head's sigmoid has no weights: the same keys either way.
        self.regressor = _mlp(feature_dim, hidden, 4, dropout) if box_head == "mlp" else DenseBoxRegressor(
            feature_dim, hidden, dropout)

    @property
    def zoom_pass_backbone(self) -> nn.Module:
        """The backbone of the zoom's second pass: its own where the model has one, else the first pass's."""
        return self.backbone if self.zoom_backbone is None else self.zoom_backbone

    def features(self, x: Tensor, backbone: nn.Module | None = None) -> tuple[Tensor, Tensor]:
        """The pooled feature (B, D) and the grid (B, rows, cols, D) of `backbone` (default: the first pass's): a
        ViT's class token and patch tokens after the final norm; a ResNet's pooled last feature map, and that map."""
        net = self.backbone if backbone is None else backbone
        if isinstance(net, VisionTransformer):
            z, _ = net.forward_features(x)
            side = x.shape[-1] // net.cfg.patch_size
            return z[:, 0], z[:, net.cfg.num_prefix_tokens:].unflatten(1, (-1, side))
        fmap = net.layer4(net.layer3(net.layer2(net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))))))
        return fmap.mean(dim=(2, 3)), fmap.permute(0, 2, 3, 1)

    def forward(self, x: Tensor, cells: bool = False) -> tuple[Tensor, ...]:
        """(logits, boxes); with `cells` (dense head only), also the cells' edges (B, cells, 4) (x1, y1, x2, y2) and
        centres (cells, 2), as `DenseBoxRegressor.per_cell` gives them. With `flip_tta`, in eval mode, the mean of
        the image's and its mirror's predictions."""
        if cells and self.box_head != "dense":
            raise VitkitError("per-cell outputs exist for the dense box head only: use --box-head dense")
        if self.flip_tta and not self.training and not cells:
            # One batch of the images and their mirrors; the mirrors' boxes reflected back (cx → 1 - cx). The box
            # scale, applied to each box, commutes with the mean (it is linear in the widths and heights).
            logits, boxes = self.single_view(torch.cat([x, x.flip(-1)]))
            boxes = boxes.unflatten(0, (2, -1))
            mirrored = torch.cat([1 - boxes[1, :, :1], boxes[1, :, 1:]], dim=1)
            return logits.unflatten(0, (2, -1)).mean(0), (boxes[0] + mirrored) / 2
        return self.single_view(x, cells)

    def single_view(self, x: Tensor, cells: bool = False) -> tuple[Tensor, ...]:
        """`forward` on the images as given (no mirror averaging)."""
        pooled, grid = self.features(self.first_view(x))
        # The heads run in float32 even under bf16 autocast: they cost nothing, and a box coordinate in bf16 is
        # only good to 1/256 (about a pixel at 224) — too coarse for IoU ≥ 0.9.
        with torch.autocast(pooled.device.type, enabled=False):
            pooled = pooled.float()
            class_input, cell_outputs = pooled, ()
            if self.box_head == "dense":
                grid = grid.float()
                weight, edges, centres = self.regressor.per_cell(grid)
                boxes = self.regressor.average(weight, edges)
                cell_outputs = (edges, centres) if cells else ()
                if self.region_pool:
                    region = torch.einsum("bn,bnd->bd", weight.detach(), grid.flatten(1, 2))
                    class_input = torch.cat([pooled, region], dim=1)
            else:
                boxes = self.regressor(pooled)
                boxes = boxes.sigmoid() if self.sigmoid else boxes
        if self.zoom:
            # The backbone's second pass runs under the caller's autocast, as the first did.
            class_input = self.features(self.zoom_crops(x, boxes), self.zoom_pass_backbone)[0]
        with torch.autocast(pooled.device.type, enabled=False):
            if not self.training and self.box_scale != 1:
                boxes = scale_sizes(boxes, self.box_scale)
            return self.classifier(class_input.float()), boxes, *cell_outputs

    def first_view(self, x: Tensor) -> Tensor:
        """The images as the first pass sees them: resized (bilinear, antialiased) to `view_size` where that is
        set and differs from their size."""
        size = self.view_size or x.shape[-1]
        if x.shape[-2:] == (size, size):
            return x
        return F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)

    def zoom_crops(self, x: Tensor, boxes: Tensor) -> Tensor:
        """The squares the classifier reads with `zoom`, resampled to the backbone's input size: around the first
        pass's `boxes` (before `box_scale`; no gradient) clipped to the image, in training as in evaluation (where
        the dense head clips them)."""
        clipped = xyxy_to_cxcywh(cxcywh_to_xyxy(boxes.detach()).clamp(0, 1))
        return square_crops(x, clipped, self.zoom, self.view_size or x.shape[-1])

    def spec(self) -> dict[str, Any]:
        """The architecture as plain values (JSON), for checkpoints."""
        head = {"num_classes": self.num_classes, "hidden": self.hidden, "dropout": self.dropout,
                "sigmoid": self.sigmoid, "box_head": self.box_head, "box_scale": self.box_scale,
                "flip_tta": self.flip_tta, "region_pool": self.region_pool, "zoom": self.zoom,
                "view_size": self.view_size, "zoom_backbone": "shared" if self.zoom_backbone is None else "own"}
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
        # Checkpoints from before the dense head, the box scale, the flip averaging, the region pooling, the zoom and
        # its own backbone lack their entries (and took images at the backbone's size).
        head.update(box_head=spec.get("box_head", "mlp"), box_scale=spec.get("box_scale", 1.0),
                    flip_tta=spec.get("flip_tta", False), region_pool=spec.get("region_pool", False),
                    zoom=spec.get("zoom", 0.0), view_size=spec.get("view_size"))
        if spec["backbone"] not in BACKBONES:
            raise VitkitError(f"unknown box-model backbone {spec['backbone']!r}: use one of {', '.join(BACKBONES)}")

        def build() -> nn.Module:
            if spec["backbone"] == "vit":
                return VisionTransformer(ViTConfig.from_dict(spec["vit"]))
            return resnet18_backbone(None, spec["in_channels"], spec["cifar_stem"])

        backbone = build()
        dim = backbone.cfg.dim if isinstance(backbone, VisionTransformer) else RESNET18_FEATURES
        own = spec.get("zoom_backbone", "shared") == "own"
        return cls(backbone, dim, **head, zoom_backbone=build() if own else None)


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
