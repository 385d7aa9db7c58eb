"""Attacks work on pixels in [0, 1]; models are trained on normalised input.

`PixelModel` moves the normalisation inside the model, so every budget is in pixel units (ε = 8/255
is 8 grey levels, whatever the data set's mean and std) and the box constraint is simply [0, 1].
Mixing the two spaces is the classic source of wrong robustness figures.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.errors import VitkitError


class PixelModel(nn.Module):
    """`model((x - mean) / std)` for images x in [0, 1]: the form every attack here expects."""

    def __init__(self, model: nn.Module, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.model = model
        # On the model's device from the start; not persistent: the statistics belong to the
        # checkpoint's metadata, not to its weights.
        device = next(model.parameters(), torch.empty(0)).device
        for name, values in (("mean", mean), ("std", std)):
            stats = torch.tensor(list(values), dtype=torch.float32, device=device).reshape(1, -1, 1, 1)
            self.register_buffer(name, stats, persistent=False)

    def normalize(self, x: Tensor) -> Tensor:
        return (x - self.mean) / self.std

    def to_pixels(self, x: Tensor) -> Tensor:
        """Normalised images back in [0, 1]; the clamp absorbs the rounding of the round trip."""
        return (x * self.std + self.mean).clamp(0, 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.model(self.normalize(x))


def load_pixel_model(checkpoint: str | Path, device: str | torch.device = "cpu") -> tuple[PixelModel, dict[str, Any]]:
    """A checkpoint's model wrapped with its own normalisation, in eval mode, and its metadata."""
    # Imported here: vitkit.train's trainer imports this package for adversarial training.
    from vitkit.train.checkpoint import load_model

    model, info = load_model(checkpoint, device)
    return PixelModel(model, info["mean"], info["std"]).eval(), info


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode while attacking (the attacked function is the deployed one: no dropout), then every
    submodule's own train/eval mode back, also when an error interrupts."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


# loss(logits, targets) -> per-image losses (B,): what an attack raises.
Loss = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-image cross-entropy (B,): the loss of every attack unless told otherwise."""
    return F.cross_entropy(logits, labels, reduction="none")


def margin(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-image z_y − max_{i≠y} z_i (B,): negative exactly when the image is misclassified."""
    true = logits.gather(1, labels[:, None])[:, 0]
    return true - logits.scatter(1, labels[:, None], float("-inf")).amax(1)


def input_gradient(
    model: nn.Module, images: Tensor, labels: Tensor, loss: Loss = cross_entropy
) -> tuple[Tensor, Tensor]:
    """Per-image losses `loss(model(images), labels)` (B,), the cross-entropy by default, and their
    gradient with respect to the images.

    Only the input gets a gradient: torch.autograd.grad leaves the parameters' .grad and
    requires_grad alone and skips the weight-gradient work. Works inside torch.no_grad too.
    """
    with torch.enable_grad():
        x = images.detach().requires_grad_(True)
        losses = loss(model(x), labels)
        (grad,) = torch.autograd.grad(losses.sum(), x)
    return losses.detach(), grad


def check_pixels(images: Tensor, labels: Tensor) -> None:
    """User errors an attack would otherwise turn into silently wrong figures."""
    if images.ndim != 4 or labels.shape != images.shape[:1]:
        raise VitkitError(
            f"attacks take images (B, C, H, W) and labels (B,), got {tuple(images.shape)} and {tuple(labels.shape)}"
        )
    if not images.numel():
        return
    lo, hi = torch.stack(torch.aminmax(images)).tolist()  # one device synchronisation
    if lo < 0 or hi > 1:
        raise VitkitError(
            f"the images span {lo:.3g}..{hi:.3g}, not [0, 1]: attack unnormalised pixels and wrap the model "
            "in PixelModel(model, mean, std)"
        )
