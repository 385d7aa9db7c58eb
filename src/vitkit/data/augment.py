"""Per-sample random augmentation of whole batches, as tensor operations on the batch's device.

Every random draw comes from an explicit `torch.Generator`, so a batch's augmentation is a pure
function of the generator's seed (what makes a resumed run exact). There is no loop over images;
TrivialAugment loops over its handful of operation types only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from vitkit.errors import VitkitError


@dataclass
class AugmentConfig:
    """Which augmentations to apply; the defaults turn everything off."""

    hflip: float = 0.0  # probability of a horizontal flip
    crop_padding: int = 0  # random crop of the image zero-padded by this many pixels
    resized_crop_scale: tuple[float, float] | None = None  # RandomResizedCrop area range, e.g. (0.8, 1.0)
    resized_crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)  # its aspect-ratio range (seed 003: 0.9, 1.1)
    trivial_augment: bool = False  # one random operation of random strength per image
    random_erasing: float = 0.0  # probability of erasing a random rectangle
    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0  # with both on, each batch uses one of them with probability 1/2


def _uniform(n: int, lo: float, hi: float, g: torch.Generator, device) -> Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g, device=device)


def random_crop(x: Tensor, padding: int, g: torch.Generator) -> Tensor:
    """Each image: a window of its original size at a random offset of the zero-padded image."""
    B, C, H, W = x.shape
    if padding >= min(H, W):
        raise VitkitError(f"crop padding {padding} is not below the image size {H}×{W}: pass a smaller --crop-padding")
    padded = F.pad(x, (padding,) * 4)  # zeros, as torchvision's RandomCrop
    dy = torch.randint(0, 2 * padding + 1, (B,), generator=g, device=x.device)
    dx = torch.randint(0, 2 * padding + 1, (B,), generator=g, device=x.device)
    rows = (dy[:, None] + torch.arange(H, device=x.device))[:, :, None]  # (B, H, 1)
    cols = (dx[:, None] + torch.arange(W, device=x.device))[:, None, :]  # (B, 1, W)
    batch = torch.arange(B, device=x.device)[:, None, None]
    return padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)


def affine(x: Tensor, theta: Tensor) -> Tensor:
    """Samples each image through its own 2×3 affine map (output coordinates → input, in [-1, 1])."""
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def resized_crop_theta(B: int, scale: tuple[float, float], ratio: tuple[float, float], g, device) -> Tensor:
    """RandomResizedCrop as affine maps: area fraction in `scale`, log-uniform aspect ratio in `ratio`.

    Unlike torchvision's ten retries, a crop that would not fit is clamped to the image.
    """
    area = _uniform(B, *scale, g, device)
    log_ratio = _uniform(B, math.log(ratio[0]), math.log(ratio[1]), g, device)
    w = torch.sqrt(area * log_ratio.exp()).clamp(max=1.0)  # fractions of the image side
    h = torch.sqrt(area / log_ratio.exp()).clamp(max=1.0)
    cx = (2 * torch.rand(B, generator=g, device=device) - 1) * (1 - w)
    cy = (2 * torch.rand(B, generator=g, device=device) - 1) * (1 - h)
    theta = torch.zeros(B, 2, 3, device=device)
    theta[:, 0, 0], theta[:, 0, 2], theta[:, 1, 1], theta[:, 1, 2] = w, cx, h, cy
    return theta


# TrivialAugment (Müller & Hutter 2021), a subset: each image gets one op at a random strength m in [0, 1]
# with a random sign. Strengths are milder than TrivialAugment-Wide's (rotation ±30°, not ±135°).
TRIVIAL_OPS = ("identity", "brightness", "contrast", "saturation", "posterize", "solarize", "autocontrast",
               "rotate", "shear_x", "shear_y", "translate_x", "translate_y")


def _colour_op(name: str, x: Tensor, m: Tensor, factor: Tensor) -> Tensor:
    """`name` applied to the whole batch; m, factor: (B, 1, 1, 1) strength and 1 ± 0.9 m."""
    if name == "brightness":
        return x * factor
    if name == "contrast":
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        return mean + factor * (x - mean)
    if name == "saturation":
        grey = x.mean(dim=1, keepdim=True)
        return grey + factor * (x - grey)
    if name == "posterize":
        step = 2 ** (m * 4).round()  # keep 8 down to 4 bits; rounding to bytes first keeps m = 0 exact
        return torch.floor((x * 255).round() / step) * step / 255
    if name == "solarize":
        return torch.where(x >= 1 - m, 1 - x, x)
    if name == "autocontrast":
        lo = x.amin(dim=(2, 3), keepdim=True)
        hi = x.amax(dim=(2, 3), keepdim=True)
        return torch.where(hi > lo, (x - lo) / (hi - lo).clamp_min(1e-6), x)
    raise ValueError(name)


def trivial_augment(x: Tensor, g: torch.Generator) -> Tensor:
    """One random op per image. Ops are selected with torch.where rather than boolean indexing, which
    would synchronise a GPU with the host; the cost is running each colour op on the whole batch."""
    B, device = x.shape[0], x.device
    op = torch.randint(0, len(TRIVIAL_OPS), (B,), generator=g, device=device)
    m = torch.rand(B, generator=g, device=device)
    signed = torch.where(torch.rand(B, generator=g, device=device) < 0.5, -m, m)
    is_op = {name: op == i for i, name in enumerate(TRIVIAL_OPS)}
    zero = torch.zeros_like(m)

    def amount(name: str, scale: float) -> Tensor:
        return torch.where(is_op[name], signed * scale, zero)

    # The geometric ops share one affine pass; other images get the identity map (an exact resampling).
    angle = amount("rotate", math.radians(30))
    cos, sin = angle.cos(), angle.sin()
    theta = torch.stack([
        torch.stack([cos, -sin + amount("shear_x", 0.3), amount("translate_x", 0.6)], 1),  # 0.6 of the half-width
        torch.stack([sin + amount("shear_y", 0.3), cos, amount("translate_y", 0.6)], 1),
    ], 1)
    x = affine(x, theta)
    m4, factor = m[:, None, None, None], 1 + 0.9 * signed[:, None, None, None]
    for name in ("brightness", "contrast", "saturation", "posterize", "solarize", "autocontrast"):
        x = torch.where(is_op[name][:, None, None, None], _colour_op(name, x, m4, factor), x)
    return x.clamp_(0, 1)


def random_erasing(x: Tensor, p: float, g: torch.Generator) -> Tensor:
    """Per image, with probability p, a rectangle (2-33% of the area, ratio 0.3-3.3) replaced by noise."""
    B, C, H, W = x.shape
    device = x.device
    area = _uniform(B, 0.02, 1 / 3, g, device) * H * W
    log_ratio = _uniform(B, math.log(0.3), math.log(1 / 0.3), g, device)
    h = (area * log_ratio.exp()).sqrt().round().clamp(1, H)
    w = (area / log_ratio.exp()).sqrt().round().clamp(1, W)
    top = (torch.rand(B, generator=g, device=device) * (H - h + 1)).floor()
    left = (torch.rand(B, generator=g, device=device) * (W - w + 1)).floor()
    rows = torch.arange(H, device=device)[None, :, None]
    cols = torch.arange(W, device=device)[None, None, :]
    inside = (rows >= top[:, None, None]) & (rows < (top + h)[:, None, None])
    inside = inside & (cols >= left[:, None, None]) & (cols < (left + w)[:, None, None])
    erase = inside & (torch.rand(B, generator=g, device=device) < p)[:, None, None]
    noise = torch.rand(x.shape, generator=g, device=device)
    return torch.where(erase[:, None], noise, x)


def mix(
    x: Tensor, y: Tensor, num_classes: int, mixup: float, cutmix: float, rng: np.random.Generator
) -> tuple[Tensor, Tensor]:
    """Mixup or CutMix with the reversed batch; targets become the matching soft labels.

    λ and the box come from the host generator `rng` (torch's Beta sampler takes no generator), so
    the GPU never has to report back to the host in the middle of a training step."""
    use_cutmix = cutmix > 0 and (mixup == 0 or rng.random() < 0.5)
    alpha = cutmix if use_cutmix else mixup
    lam = float(rng.beta(alpha, alpha))
    partner = x.flip(0)
    if use_cutmix:
        H, W = x.shape[-2:]
        cut_h, cut_w = int(H * math.sqrt(1 - lam)), int(W * math.sqrt(1 - lam))
        cy, cx = int(rng.integers(H)), int(rng.integers(W))
        top, bottom = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, H)
        left, right = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, W)
        x = x.clone()
        x[:, :, top:bottom, left:right] = partner[:, :, top:bottom, left:right]
        lam = 1 - (bottom - top) * (right - left) / (H * W)  # the area actually pasted
    else:
        x = lam * x + (1 - lam) * partner
    one_hot = F.one_hot(y, num_classes).to(x.dtype)
    return x, lam * one_hot + (1 - lam) * one_hot.flip(0)


class Augment:
    """Applies an AugmentConfig to a batch, in the order crop, resized crop, flip, TrivialAugment, erasing, mix."""

    def __init__(self, cfg: AugmentConfig, num_classes: int):
        for name in ("hflip", "random_erasing"):
            if not 0 <= getattr(cfg, name) <= 1:
                raise VitkitError(f"{name} probability {getattr(cfg, name)} is outside [0, 1]: pass e.g. 0.5")
        if cfg.crop_padding < 0 or cfg.mixup_alpha < 0 or cfg.cutmix_alpha < 0:
            raise VitkitError("crop padding, mixup and cutmix alpha must not be negative: pass 0 to turn one off")
        if cfg.resized_crop_scale and not 0 < cfg.resized_crop_scale[0] <= cfg.resized_crop_scale[1] <= 1:
            raise VitkitError(f"resized-crop scale {cfg.resized_crop_scale} is not 0 < lo <= hi <= 1: pass e.g. 0.8,1.0")
        if not 0 < cfg.resized_crop_ratio[0] <= cfg.resized_crop_ratio[1]:
            raise VitkitError(f"resized-crop ratio {cfg.resized_crop_ratio} is not 0 < lo <= hi: pass e.g. 0.75,1.333")
        self.cfg = cfg
        self.num_classes = num_classes

    def __call__(
        self, images: Tensor, labels: Tensor, generator: torch.Generator, host_rng: np.random.Generator | None = None
    ) -> tuple[Tensor, Tensor]:
        """images (B, C, H, W), float in [0, 1] or uint8 → float in [0, 1], same shape; labels int64 (B,) stay so,
        or become soft targets (B, num_classes) with mixup/cutmix. Per-image draws come from `generator`, the
        batch's mixup/cutmix draws from `host_rng`; without one it is seeded from `generator`, which costs a
        device-to-host synchronisation per batch (DeviceLoader passes one)."""
        cfg, g = self.cfg, generator
        x = images if images.is_floating_point() else images.float().div_(255)
        B, device = x.shape[0], x.device
        if cfg.crop_padding:
            x = random_crop(x, cfg.crop_padding, g)
        if cfg.resized_crop_scale:
            x = affine(x, resized_crop_theta(B, cfg.resized_crop_scale, cfg.resized_crop_ratio, g, device))
        if cfg.hflip:
            flip = torch.rand(B, generator=g, device=device) < cfg.hflip
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        if cfg.trivial_augment:
            x = trivial_augment(x, g)
        if cfg.random_erasing:
            x = random_erasing(x, cfg.random_erasing, g)
        if cfg.mixup_alpha or cfg.cutmix_alpha:
            if host_rng is None:
                host_rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=g, device=device).item()))
            x, labels = mix(x, labels, self.num_classes, cfg.mixup_alpha, cfg.cutmix_alpha, host_rng)
        return x, labels
