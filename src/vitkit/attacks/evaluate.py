"""Robust accuracy over a data set: clean accuracy, then accuracy under an attack at each strength,
white-box or transferred from a surrogate model."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import chain

import torch
from torch import Tensor, nn

from vitkit.attacks.pixel import eval_mode

# attack(model, images, labels, strength, generator) -> adversarial images, e.g.
# lambda m, x, y, eps, g: pgd(m, x, y, eps, steps=20, generator=g)
Attack = Callable[[nn.Module, Tensor, Tensor, float, torch.Generator], Tensor]


def worst_case(*attacks: Attack) -> Attack:
    """One attack made of several, as AutoAttack evaluates: each runs on the images the ones before left
    classified right, and an image keeps the first adversarial version that fools the model (else the
    last attack's). An image's result does not depend on its batch when none of the attacks' does.
    "Fools" means fools `model`, the one attacked: in a transfer attack, the surrogate."""

    def attack(model: nn.Module, images: Tensor, labels: Tensor, strength: float, generator: torch.Generator) -> Tensor:
        result = images.clone()
        todo = torch.arange(len(labels), device=labels.device)
        for one in attacks:
            if not len(todo):
                break
            # However many images are left, each attack draws the same seeds from the generator (the
            # attacks here draw one, or none), so an image gets the random draws it would get in any batch.
            adversarial = one(model, images[todo], labels[todo], strength, generator)
            result[todo] = adversarial
            with torch.no_grad(), eval_mode(model):
                todo = todo[model(adversarial).argmax(1) == labels[todo]]
        return result

    return attack


@dataclass
class Robustness:
    """Figures of one attack over a data set, as fractions, one per strength (ε, or a patch size)."""

    strengths: list[float]
    clean_accuracy: float
    robust_accuracy: list[float]  # right on the clean image and on the adversarial one
    success_rate: list[float]  # among the images classified right, the share the attack turns wrong
    images: int

    @classmethod
    def from_outcomes(cls, strengths: Sequence[float], outcomes: Tensor) -> Robustness:
        """The figures of per-image outcomes (N, 1 + S) as `attack_outcomes` returns them."""
        clean_right, robust_right = outcomes[:, 0], outcomes[:, 1:]
        n, n_right = len(outcomes), max(int(clean_right.sum()), 1)
        return cls(
            strengths=list(strengths),
            clean_accuracy=int(clean_right.sum()) / max(n, 1),
            robust_accuracy=[int(r.sum()) / max(n, 1) for r in robust_right.T],
            success_rate=[int((clean_right & ~r).sum()) / n_right for r in robust_right.T],
            images=n,
        )

    def summary(self, name: str = "eps") -> dict[str, float]:
        """Flat figures: clean_accuracy, robust_accuracy_{name}_{strength}, attack_success_rate_{name}_{strength}."""
        figures: dict[str, float] = {"images": self.images, "clean_accuracy": self.clean_accuracy}
        for s, robust, success in zip(self.strengths, self.robust_accuracy, self.success_rate):
            label = f"{s:.4f}" if isinstance(s, float) else str(s)
            figures[f"robust_accuracy_{name}_{label}"] = robust
            figures[f"attack_success_rate_{name}_{label}"] = success
        return figures


def device_of(model: nn.Module) -> torch.device:
    return next(chain(model.parameters(), model.buffers()), torch.empty(0)).device


def attack_outcomes(
    model: nn.Module, images: Tensor, labels: Tensor, attack: Attack, strengths: Sequence[float], *,
    surrogate: nn.Module | None = None, batch_size: int = 256, seed: int = 0,
) -> Tensor:
    """Per image, whether `model` (pixels in [0, 1] to logits) is right: (N, 1 + S) bool on the CPU, column 0
    on the clean image, column 1 + i on it and on its adversarial version at strengths[i] (so a robust image
    is also a clean-right one). Images (N, C, H, W) are uint8 or float in [0, 1]; batches go to the model's
    device. With `surrogate`, the adversarial images are crafted on the surrogate and scored on `model`: a
    transfer (black-box) attack.

    Every batch's attack gets a generator seeded with `seed`; with the attacks of vitkit.attacks, whose
    randomness is keyed by image, the outcomes do not depend on the batch size, nor on which process of a
    torchrun launch attacks the image.
    """
    device = device_of(model)
    crafter = surrogate if surrogate is not None else model
    outcomes = []
    with eval_mode(model):
        for start in range(0, len(labels), batch_size):
            x = images[start : start + batch_size].to(device)
            x = x.float() / 255 if x.dtype == torch.uint8 else x
            y = labels[start : start + batch_size].to(device)
            with torch.no_grad():
                right = model(x).argmax(1) == y
            batch = [right]
            for strength in strengths:
                adversarial = attack(crafter, x, y, strength, torch.Generator().manual_seed(seed))
                with torch.no_grad():
                    batch.append(right & (model(adversarial).argmax(1) == y))
            outcomes.append(torch.stack(batch, 1).cpu())
    return torch.cat(outcomes) if outcomes else torch.zeros(0, 1 + len(strengths), dtype=torch.bool)


def robust_accuracy(
    model: nn.Module, images: Tensor, labels: Tensor, attack: Attack, strengths: Sequence[float], *,
    surrogate: nn.Module | None = None, batch_size: int = 256, seed: int = 0,
) -> Robustness:
    """Clean and robust accuracy of `model` on images with their labels (see `attack_outcomes`).

    An image counts as robust at a strength when the model is right on it and on its adversarial
    version, so robust accuracy never exceeds clean accuracy.
    """
    outcomes = attack_outcomes(model, images, labels, attack, strengths, surrogate=surrogate,
                               batch_size=batch_size, seed=seed)
    return Robustness.from_outcomes(strengths, outcomes)
