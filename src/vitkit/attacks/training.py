"""Adversarial training (Madry et al. 2018): part of every training batch is replaced by attacks on
the model at its current weights. The trainer's batches are normalised; the attack runs in pixels."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from vitkit.attacks.pgd import fgsm, pgd
from vitkit.attacks.pixel import PixelModel
from vitkit.errors import VitkitError

ATTACKS = ("pgd", "fgsm")


class Adversary:
    """Turns a normalised batch into a mix: its first `mix` share stays clean (0.5 is seed 002's
    half-half; 0 is Madry et al.'s all-adversarial), the rest becomes PGD or FGSM examples."""

    def __init__(
        self, model: nn.Module, mean: Sequence[float], std: Sequence[float], *, attack: str = "pgd",
        eps: float = 8 / 255, steps: int = 7, step_size: float = 2 / 255, norm: str = "linf", mix: float = 0.5,
    ):
        if attack not in ATTACKS:
            raise VitkitError(f"unknown adversarial training attack {attack!r}: use one of {', '.join(ATTACKS)}")
        self.pixel_model = PixelModel(model, mean, std)
        self.attack, self.eps, self.norm, self.mix = attack, eps, norm, mix
        self.steps, self.step_size = steps, step_size

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """x: normalised images (B, C, H, W); y: labels (B,) or soft targets (B, classes) from mixup."""
        n_clean = round(self.mix * len(x))
        if n_clean == len(x):  # a small batch with a mix near 1
            return x
        m = self.pixel_model
        # The clamp absorbs the rounding of the round trip through normalised space.
        pixels = (x[n_clean:] * m.std + m.mean).clamp(0, 1)
        hard = y[n_clean:] if y.ndim == 1 else y[n_clean:].argmax(1)
        if self.attack == "fgsm":
            adversarial = fgsm(m, pixels, hard, self.eps, norm=self.norm)
        else:
            adversarial = pgd(m, pixels, hard, self.eps, norm=self.norm, steps=self.steps, step_size=self.step_size)
        return torch.cat([x[:n_clean], m.normalize(adversarial)])
