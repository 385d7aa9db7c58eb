"""Adversarial training on the model at its current weights: Madry et al. (2018) replace part of every
training batch by attacks, which FAT (Zhang et al. 2020) stops just past the decision boundary; TRADES
(Zhang et al. 2019) adds a term that pulls the prediction on an
attacked image towards the prediction on the clean one. The trainer's batches are normalised; the
attacks run in pixels."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.attacks.noise import draw_seed, image_keys, normal
from vitkit.attacks.pgd import ascend, check_budget, fgsm, pgd, project
from vitkit.attacks.pixel import PixelModel, eval_mode
from vitkit.errors import VitkitError

ATTACKS = ("pgd", "fgsm")


class Adversary:
    """Turns a normalised batch into a mix: its first `mix` share stays clean (0.5 is seed 002's
    half-half; 0 is Madry et al.'s all-adversarial), the rest becomes PGD or FGSM examples; PGD stopped
    early with `early_stop` = τ is Friendly Adversarial Training (Zhang et al. 2020)."""

    def __init__(
        self, model: nn.Module, mean: Sequence[float], std: Sequence[float], *, attack: str = "pgd",
        eps: float = 8 / 255, steps: int = 7, step_size: float = 2 / 255, norm: str = "linf", mix: float = 0.5,
        early_stop: int | None = None,
    ):
        if attack not in ATTACKS:
            raise VitkitError(f"unknown adversarial training attack {attack!r}: use one of {', '.join(ATTACKS)}")
        if early_stop is not None and attack != "pgd":
            raise VitkitError("early stopping (FAT's τ) stops PGD's steps: use attack='pgd'")
        self.pixel_model = PixelModel(model, mean, std)
        self.attack, self.eps, self.norm, self.mix = attack, eps, norm, mix
        self.steps, self.step_size, self.early_stop = steps, step_size, early_stop

    def __call__(self, x: Tensor, y: Tensor) -> Tensor:
        """x: normalised images (B, C, H, W); y: labels (B,) or soft targets (B, classes) from mixup."""
        n_clean = round(self.mix * len(x))
        if n_clean == len(x):  # a small batch with a mix near 1
            return x
        m = self.pixel_model
        pixels = m.to_pixels(x[n_clean:])
        hard = y[n_clean:] if y.ndim == 1 else y[n_clean:].argmax(1)
        if self.attack == "fgsm":
            adversarial = fgsm(m, pixels, hard, self.eps, norm=self.norm)
        else:
            adversarial = pgd(m, pixels, hard, self.eps, norm=self.norm, steps=self.steps, step_size=self.step_size,
                              early_stop=self.early_stop)
        return torch.cat([x[:n_clean], m.normalize(adversarial)])


def kl_divergence(logits: Tensor, target: Tensor) -> Tensor:
    """Per-image KL(target ‖ softmax(logits)) (B,), for target probabilities (B, classes)."""
    return F.kl_div(F.log_softmax(logits, 1), target, reduction="none").sum(1)


def trades_example(
    model: nn.Module, images: Tensor, eps: float, *, steps: int, step_size: float, norm: str = "linf",
    generator: torch.Generator | None = None,
) -> Tensor:
    """TRADES's attack: PGD up KL(f(x) ‖ f(x')) over x' in the ε-ball around x and in [0, 1], from
    x + 0.001·N(0, I), with the model in eval mode.

    model: maps images in [0, 1] to logits (a `PixelModel`). No labels: the target is the model's own
    prediction on the image. The start is keyed by image from one seed drawn from `generator`
    (default torch's global generator, whose state a training checkpoint keeps).
    """
    check_budget(eps, norm)
    with eval_mode(model):
        with torch.no_grad():
            target = model(images).softmax(1)
        # The start must not be x itself: the KL and its gradient are exactly 0 there.
        noise = normal(image_keys(images, draw_seed(generator)), 0, tuple(images.shape[1:]))
        start = project(images + 0.001 * noise.to(images.dtype), images, eps, norm)
        return ascend(model, images, target, start, steps=steps, step_size=step_size, eps=eps, norm=norm,
                      loss=kl_divergence)


class Trades:
    """TRADES: the loss CE(f(x), y) + β·KL(f(x) ‖ f(x')) on clean batches, x' from `trades_example`.
    The trainer keeps its cross-entropy (label smoothing and mixup apply to it) and adds `loss`."""

    def __init__(
        self, model: nn.Module, mean: Sequence[float], std: Sequence[float], *, beta: float = 6.0,
        eps: float = 8 / 255, steps: int = 10, step_size: float = 2 / 255, norm: str = "linf",
    ):
        self.pixel_model = PixelModel(model, mean, std)
        self.beta, self.eps, self.steps, self.step_size, self.norm = beta, eps, steps, step_size, norm

    def loss(self, forward: Callable[[Tensor], Tensor], x: Tensor, logits: Tensor) -> Tensor:
        """β·KL(softmax(logits) ‖ softmax(forward(x'))), averaged over the batch (batchmean).

        forward: the function being trained (it may be compiled or ablate its input); x: the
        normalised batch; logits: forward(x), with their graph, so the gradient reaches both sides.
        """
        m = self.pixel_model
        pixels = m.to_pixels(x)
        # In float32 even under the trainer's bf16 autocast (as Adversary's attacks, which run before it):
        # the KL near the start is far below bf16's resolution.
        with torch.autocast(x.device.type, enabled=False):
            adversarial = trades_example(m, pixels, self.eps, steps=self.steps, step_size=self.step_size,
                                         norm=self.norm)
        kl = kl_divergence(forward(m.normalize(adversarial)).float(), logits.float().softmax(1))
        return self.beta * kl.mean()
