"""Adversarial patch: any pixel values inside an m×m square, the image untouched outside it.

The threat model of certified patch robustness (Levine & Feizi 2020): an empirical attack under it
gives an upper bound on the accuracy a certificate may claim. The attack is masked PGD (sign steps,
pixels kept in [0, 1]) at given positions, or at several random positions per image keeping the
first one that fools the model (else the one of highest loss).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vitkit.attacks.noise import draw_seed, image_keys, uniform
from vitkit.attacks.pgd import ascend, keep_worst
from vitkit.attacks.pixel import check_pixels, eval_mode
from vitkit.errors import VitkitError


def patch_mask(positions: Tensor, size: int, image_size: tuple[int, int]) -> Tensor:
    """(B, 1, H, W) bool, True on the size×size square whose top-left pixel is positions[b] = (row, col)."""
    H, W = image_size
    rows = torch.arange(H, device=positions.device)
    cols = torch.arange(W, device=positions.device)
    top, left = positions[:, :1], positions[:, 1:]
    inside_rows = (rows >= top) & (rows < top + size)  # (B, H)
    inside_cols = (cols >= left) & (cols < left + size)  # (B, W)
    return (inside_rows[:, :, None] & inside_cols[:, None, :])[:, None]


def patch_attack(
    model: nn.Module, images: Tensor, labels: Tensor, size: int, *, positions: Tensor | None = None,
    num_positions: int = 4, steps: int = 20, step_size: float = 0.05, random_start: bool = True,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """An untargeted size×size patch attack; returns the adversarial images and the patch positions used.

    model: any module mapping images in [0, 1] (B, C, H, W) to logits, e.g. a `PixelModel`, or a
        differentiable smoothed classifier.
    positions: (B, 2) int64 top-left (row, col) of each image's patch; None tries `num_positions`
        random positions per image (uniform over all placements) and keeps the first that fools the
        model, else the one of highest loss.
    steps, step_size: sign-gradient steps on the patch pixels (the range is 1, so 20 steps of 0.05
        can take a pixel from one end to the other).
    random_start: start the patch from uniform noise instead of the image's pixels.
    generator: where the seed of the positions and starts comes from (default torch's global
        generator); an image's positions and start depend on that seed and its pixels only.

    Pixels outside the patch are returned bit for bit unchanged.
    """
    check_pixels(images, labels)
    B, _, H, W = images.shape
    if not 1 <= size <= min(H, W):
        raise VitkitError(f"a {size}×{size} patch does not fit {H}×{W} images: pick a size from 1 to {min(H, W)}")
    if positions is not None:
        positions = torch.as_tensor(positions, device=images.device).long()
        bad = positions.shape != (B, 2) or (positions < 0).any() or (positions[:, 0] > H - size).any() \
            or (positions[:, 1] > W - size).any()
        if bad:
            raise VitkitError(
                f"positions must be (B, 2) = ({B}, 2) top-left (row, col) with row <= {H - size} and "
                f"col <= {W - size} for a {size}×{size} patch"
            )
    elif num_positions < 1:
        raise VitkitError(f"num_positions = {num_positions}: try at least one position per image")
    keys = image_keys(images, draw_seed(generator))
    placements = torch.tensor([H - size + 1, W - size + 1], device=images.device)

    def place(index: Tensor, attempt: int | Tensor) -> Tensor:
        if positions is not None:
            return positions[index]
        return (uniform(keys[index], 2 * attempt + 1, (2,)) * placements).long()

    def run(index: Tensor, attempt: int) -> Tensor:
        x = images[index]
        mask = patch_mask(place(index, attempt), size, (H, W)).to(x.dtype)
        start = x
        if random_start:
            start = x * (1 - mask) + uniform(keys[index], 2 * attempt, tuple(x.shape[1:])).to(x.dtype) * mask
        # ε = 1: unbounded inside the patch, where only the box [0, 1] limits the pixels.
        return ascend(model, x, labels[index], start, steps=steps, step_size=step_size, eps=1.0, norm="linf",
                      mask=mask)

    with eval_mode(model):
        adversarial, chosen = keep_worst(model, labels, 1 if positions is not None else num_positions, run)
    return adversarial, place(torch.arange(B, device=images.device), chosen)
