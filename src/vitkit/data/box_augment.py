"""Augmentation that moves each image's box with its pixels, and the loader that applies it.

As in `augment.py`, whole batches are transformed with tensor operations on their device, and every random
draw comes from an explicit `torch.Generator`: a batch is a pure function of the generator's seed.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from vitkit.data.boxes import BoxDataset, cxcywh_to_xyxy, xyxy_to_cxcywh
from vitkit.data.loader import DeviceLoader, stream_seed
from vitkit.errors import VitkitError


@dataclass
class BoxAugmentConfig:
    """Which box-aware augmentations to apply; the defaults turn everything off."""

    # Off by default, unlike for classification: a mirrored sign is the other hand's, and some letters change
    # meaning or become another letter's shape under a mirror (J and Z are traced, P/K and G/H differ by
    # orientation); a flip would teach wrong labels. Turn it on only for data whose classes are mirror-invariant.
    hflip: float = 0.0
    # Crop window area as a fraction of the image, e.g. (0.5, 1.0); above 1 zooms out (the image shrinks into a
    # zero-padded canvas). The window keeps the whole box when it can (see `box_safe_crop`).
    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # the window's aspect-ratio range (log-uniform)
    brightness: float = 0.0  # colour jitter: each factor uniform in [1 - j, 1 + j]; boxes stay where they are
    contrast: float = 0.0
    saturation: float = 0.0

    def __post_init__(self) -> None:
        if not 0 <= self.hflip <= 1:
            raise VitkitError(f"flip probability {self.hflip} is outside [0, 1]: pass e.g. 0.5 (or 0: off)")
        for name in ("crop_scale", "crop_ratio"):
            if getattr(self, name) is not None and len(getattr(self, name)) != 2:
                raise VitkitError(f"--{name.replace('_', '-')} takes two values, lo,hi: e.g. 0.6,1.0")
        if self.crop_scale is not None and not 0 < self.crop_scale[0] <= self.crop_scale[1] <= 4:
            raise VitkitError(f"crop scale {tuple(self.crop_scale)} is not 0 < lo <= hi <= 4: pass e.g. 0.5,1.0")
        if not 0 < self.crop_ratio[0] <= self.crop_ratio[1]:
            raise VitkitError(f"crop ratio {tuple(self.crop_ratio)} is not 0 < lo <= hi: pass e.g. 0.75,1.333")
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) < 1:
                raise VitkitError(f"{name} jitter {getattr(self, name)} is outside [0, 1): pass e.g. 0.2")


def _window_start(a: Tensor, b: Tensor, side: Tensor, u: Tensor) -> Tensor:
    """Start of a window of length `side` on one axis (fractions of the image), for a box spanning [a, b] and
    uniform draws u: uniform over the starts that keep the whole box inside the window and the window inside
    the image (zooming out, side > 1: the image inside the window). A box longer than the window gets a window
    inside the box, so the clipped box then fills it."""
    fits = side >= b - a
    lo = torch.where(fits, torch.maximum(b - side, (1 - side).clamp(max=0)), a)
    hi = torch.where(fits, torch.minimum(a, (1 - side).clamp(min=0)), b - side)
    return lo + u * (hi - lo)


def box_safe_crop(
    x: Tensor, boxes: Tensor, scale: tuple[float, float], ratio: tuple[float, float], g: torch.Generator
) -> tuple[Tensor, Tensor]:
    """A random window per image, resampled to the full size (bilinear, zeros outside the image), and the boxes
    mapped into it and clipped to it. The window's area is uniform in `scale`, its aspect ratio log-uniform in
    `ratio`, its position chosen by `_window_start`: the box's centre always stays in view, so the clipped box is
    never empty."""
    B, device = x.shape[0], x.device
    area = scale[0] + (scale[1] - scale[0]) * torch.rand(B, generator=g, device=device)
    log_ratio = math.log(ratio[0]) + math.log(ratio[1] / ratio[0]) * torch.rand(B, generator=g, device=device)
    sw, sh = (area * log_ratio.exp()).sqrt(), (area / log_ratio.exp()).sqrt()
    if scale[1] <= 1:  # a crop, not a zoom-out: no side may leave the image
        sw, sh = sw.clamp(max=1), sh.clamp(max=1)
    x1, y1, x2, y2 = cxcywh_to_xyxy(boxes).unbind(1)
    left = _window_start(x1, x2, sw, torch.rand(B, generator=g, device=device))
    top = _window_start(y1, y2, sh, torch.rand(B, generator=g, device=device))
    # Output pixel u in [0, 1] samples input point left + sw·u; in affine_grid's [-1, 1] coordinates that is
    # sw·u' + (2·left + sw − 1).
    theta = torch.zeros(B, 2, 3, device=device, dtype=x.dtype)
    theta[:, 0, 0], theta[:, 0, 2] = sw, 2 * left + sw - 1
    theta[:, 1, 1], theta[:, 1, 2] = sh, 2 * top + sh - 1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    moved = torch.stack([(x1 - left) / sw, (y1 - top) / sh, (x2 - left) / sw, (y2 - top) / sh], dim=1)
    return x, xyxy_to_cxcywh(moved.clamp(0, 1))


def colour_jitter(x: Tensor, brightness: float, contrast: float, saturation: float, g: torch.Generator) -> Tensor:
    """Per-image brightness, contrast and saturation factors, each uniform in [1 - j, 1 + j] (0: off)."""
    B, device = x.shape[0], x.device

    def factor(j: float) -> Tensor:
        return (1 + j * (2 * torch.rand(B, generator=g, device=device) - 1))[:, None, None, None]

    if brightness:
        x = x * factor(brightness)
    if contrast:
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = mean + factor(contrast) * (x - mean)
    if saturation:
        grey = x.mean(dim=1, keepdim=True)
        x = grey + factor(saturation) * (x - grey)
    return x.clamp(0, 1)


class BoxAugment:
    """Applies a BoxAugmentConfig to a batch and its boxes, in the order crop, flip, colour."""

    def __init__(self, cfg: BoxAugmentConfig):
        self.cfg = cfg

    def __call__(self, images: Tensor, boxes: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
        """images (B, C, H, W), float in [0, 1] or uint8 → float in [0, 1]; boxes (B, 4) (cx, cy, w, h) moved with
        the pixels. All draws come from `generator`."""
        cfg, g = self.cfg, generator
        x = images if images.is_floating_point() else images.float().div_(255)
        if cfg.crop_scale:
            x, boxes = box_safe_crop(x, boxes, tuple(cfg.crop_scale), tuple(cfg.crop_ratio), g)
        if cfg.hflip:
            flip = torch.rand(x.shape[0], generator=g, device=x.device) < cfg.hflip
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
            boxes = torch.where(flip[:, None], boxes * boxes.new_tensor([-1, 1, 1, 1]) + boxes.new_tensor([1, 0, 0, 0]),
                                boxes)
        if cfg.brightness or cfg.contrast or cfg.saturation:
            x = colour_jitter(x, cfg.brightness, cfg.contrast, cfg.saturation, g)
        return x, boxes


class BoxLoader(DeviceLoader):
    """A DeviceLoader over a BoxDataset: yields (images, labels, boxes), images normalised as DeviceLoader's and
    boxes float32 (B, 4) (cx, cy, w, h) on the device, augmented together by a BoxAugment. Order and augmentation
    are a pure function of (seed, epoch), as DeviceLoader's."""

    def __init__(self, dataset: BoxDataset, batch_size: int, *, augment: BoxAugment | None = None, **options):
        super().__init__(dataset, batch_size, **options)
        self.boxes = dataset.boxes.to(self.device)
        self.box_augment = augment

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        order = self._order()
        g = torch.Generator(device=self.device)
        g.manual_seed(stream_seed(self.seed, self.epoch, self.rank, 1))
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x, y, b = self.images[idx].float().div_(255), self.labels[idx], self.boxes[idx]
            if self.box_augment is not None:
                x, b = self.box_augment(x, b, g)
            yield (x - self.mean) / self.std, y, b
