"""Gradient attacks under an ℓ∞ or ℓ2 budget: FGSM (Goodfellow et al. 2015) and PGD (Madry et al. 2018).

Every attack takes a module that maps images in [0, 1] (B, C, H, W) to logits (wrap a ViT in
`PixelModel`), runs it in eval mode and restores its modes after, never writes to its inputs and
leaves the parameters' gradients alone. Adversarial images lie in [0, 1] and within ε of the input.
The random start of an image is a function of one seed drawn from `generator` and of the image's
own pixels (see `vitkit.attacks.noise`): an image gets the same start in any batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.attacks.noise import draw_seed, image_keys, normal, uniform
from vitkit.attacks.pixel import Loss, check_pixels, cross_entropy, eval_mode, input_gradient
from vitkit.errors import VitkitError

NORMS = ("linf", "l2")


def _norms(t: Tensor) -> Tensor:
    """Each image's ℓ2 norm, shaped (B, 1, 1, 1) to broadcast."""
    return t.flatten(1).norm(dim=1).reshape(-1, *[1] * (t.ndim - 1))


def ascent_direction(grad: Tensor, norm: str) -> Tensor:
    """The steepest-ascent step of unit size: sign(g) under ℓ∞, g / ‖g‖₂ under ℓ2 (0 where g is 0)."""
    return grad.sign() if norm == "linf" else grad / _norms(grad).clamp_min(1e-12)


def project(adversarial: Tensor, images: Tensor, eps: float, norm: str) -> Tensor:
    """Back into the ε-ball around `images`, then into the pixel box [0, 1].

    Clipping to the box after the ball is not the exact projection onto their intersection under ℓ2,
    but it only shrinks the perturbation, so the result stays feasible (as in Madry et al.'s code).
    """
    delta = adversarial - images
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _norms(delta).clamp_min(1e-12)).clamp(max=1.0)
    return (images + delta).clamp(0, 1)


def start_in_ball(images: Tensor, keys: Tensor, attempt: int, eps: float, norm: str) -> Tensor:
    """A uniform point of the ε-ball (cube under ℓ∞), clipped to [0, 1]; attempt picks the stream."""
    shape = tuple(images.shape[1:])
    if norm == "linf":
        delta = (2 * uniform(keys, 2 * attempt, shape) - 1) * eps
    else:
        direction = normal(keys, 2 * attempt, shape)
        radius = eps * uniform(keys, 2 * attempt + 1, (1, 1, 1)) ** (1 / images[0].numel())
        delta = direction / _norms(direction).clamp_min(1e-12) * radius
    return project(images + delta.to(images.dtype), images, eps, norm)


def ascend(
    model: nn.Module, images: Tensor, labels: Tensor, start: Tensor, *, steps: int, step_size: float, eps: float,
    norm: str, targeted: bool = False, mask: Tensor | None = None, loss: Loss = cross_entropy,
    early_stop: int | None = None,
) -> Tensor:
    """`steps` projected steps from `start` up the loss of `labels` (down it when targeted); with a
    mask (broadcastable to the images), only the pixels where it is 1 move. `loss` compares the
    logits with `labels` (default the cross-entropy with classes).

    early_stop: τ of Friendly Adversarial Training (Zhang et al. 2020, PGD-K-τ), untargeted with class
        labels: an image stops where it is found misclassified for the (τ+1)-th time, so training sees
        adversarial examples just past the decision boundary rather than far beyond it. None: all steps.
        Unlike the authors' code, τ does not grow with the epochs, no noise is added at each step, and a
        stopped image still goes through the batch's forward and backward passes (no time is saved).
    """
    adversarial = start
    if early_stop is not None:
        allowance = torch.full((len(images),), early_stop, dtype=torch.long, device=images.device)
        stopped = torch.zeros(len(images), dtype=torch.bool, device=images.device)
    predicted = {}

    def loss_and_prediction(logits: Tensor, y: Tensor) -> Tensor:
        predicted["class"] = logits.detach().argmax(1)  # the same forward gives the loss and the prediction
        return loss(logits, y)

    for _ in range(steps):
        _, grad = input_gradient(model, adversarial, labels, loss if early_stop is None else loss_and_prediction)
        if targeted:
            grad = -grad
        if mask is not None:
            grad = grad * mask
        moved = project(adversarial + step_size * ascent_direction(grad, norm), images, eps, norm)
        if early_stop is not None:
            wrong = (predicted["class"] != labels) & ~stopped
            stopped |= wrong & (allowance == 0)
            allowance -= (wrong & ~stopped).long()
            moved = torch.where(stopped.view(-1, *[1] * (moved.ndim - 1)), adversarial, moved)  # stays put
        adversarial = moved
    return adversarial


def keep_worst(
    model: nn.Module, labels: Tensor, attempts: int, run: Callable[[Tensor, int], Tensor], targeted: bool = False
) -> tuple[Tensor, Tensor]:
    """Runs `run(index, attempt)` (adversarial images for the images at `index`) up to `attempts` times
    and keeps, per image, the first success (misclassified; the target class when targeted), else the
    highest loss. Later attempts run only on the images not fooled yet.

    Returns the adversarial images and the attempt each one comes from (B,).
    """
    everyone = torch.arange(len(labels), device=labels.device)
    adversarial = run(everyone, 0)
    chosen = torch.zeros_like(everyone)
    if attempts == 1:  # nothing to compare: spare the scoring forward pass
        return adversarial, chosen
    loss, fooled = _score(model, adversarial, labels, targeted)
    for attempt in range(1, attempts):
        todo = everyone[~fooled]
        if not len(todo):
            break
        candidate = run(todo, attempt)
        new_loss, new_fooled = _score(model, candidate, labels[todo], targeted)
        better = new_fooled | (new_loss > loss[todo])
        index = todo[better]
        adversarial[index] = candidate[better]
        loss[index], fooled[index], chosen[index] = new_loss[better], new_fooled[better], attempt
    return adversarial, chosen


@torch.no_grad()
def _score(model: nn.Module, adversarial: Tensor, labels: Tensor, targeted: bool) -> tuple[Tensor, Tensor]:
    """The attack's objective per image (higher is better for the attacker) and whether it succeeded."""
    logits = model(adversarial)
    loss = F.cross_entropy(logits, labels, reduction="none")
    hit = logits.argmax(1) == labels
    return (-loss, hit) if targeted else (loss, ~hit)


def check_budget(eps: float, norm: str) -> None:
    """Raises a VitkitError for an unknown norm or an ε that is negative, infinite or NaN."""
    if norm not in NORMS:
        raise VitkitError(f"unknown norm {norm!r}: use one of {', '.join(NORMS)}")
    if not 0 <= eps < float("inf"):
        raise VitkitError(f"ε = {eps} is not a finite non-negative budget: pass e.g. 8/255")
    if norm == "linf" and eps > 1:  # pixels lie in [0, 1]: such a budget allows any image
        raise VitkitError(f"an ℓ∞ budget ε = {eps} exceeds the pixel range [0, 1]: pass a fraction, e.g. 8/255")


def check_attack(images: Tensor, labels: Tensor, eps: float, norm: str, steps: int, restarts: int,
                 random_start: bool) -> None:
    """The user errors common to the iterative attacks, each raised as a VitkitError that names the fix."""
    check_pixels(images, labels)
    check_budget(eps, norm)
    if steps < 1 or restarts < 1:
        raise VitkitError(f"an attack needs at least one step and one run, got steps={steps}, restarts={restarts}")
    if restarts > 1 and not random_start:
        raise VitkitError("restarts without a random start repeat the same run: turn on random_start or use 1 run")


def fgsm(
    model: nn.Module, images: Tensor, labels: Tensor, eps: float, *, norm: str = "linf", targeted: bool = False
) -> Tensor:
    """The fast gradient sign method: x + ε·sign(∇ₓL) under ℓ∞ (x + ε·∇ₓL/‖∇ₓL‖₂ under ℓ2), in [0, 1].

    labels: the true classes, or the target classes when `targeted` (their loss is then lowered).
    """
    check_pixels(images, labels)
    check_budget(eps, norm)
    with eval_mode(model):
        _, grad = input_gradient(model, images, labels)
    step = ascent_direction(-grad if targeted else grad, norm)
    return project(images + eps * step, images, eps, norm)


def pgd(
    model: nn.Module, images: Tensor, labels: Tensor, eps: float, *, norm: str = "linf", steps: int = 10,
    step_size: float | None = None, random_start: bool = True, restarts: int = 1, targeted: bool = False,
    generator: torch.Generator | None = None, early_stop: int | None = None,
) -> Tensor:
    """Projected gradient descent on the cross-entropy, in the ℓ∞ or ℓ2 ball of radius ε, in [0, 1].

    labels: the true classes (their loss is raised), or the target classes when `targeted` (lowered).
    step_size: default 2.5·ε/steps (Madry et al.), which lets a run cross the ball and come back.
    random_start: start from a uniform point of the ball instead of the image.
    restarts: runs in all, each from another random start; each image keeps its first success, else
        its highest loss, and later runs skip the images already fooled.
    generator: where the seed of the random starts comes from (default torch's global generator).
    early_stop: FAT's τ (see `ascend`), for adversarial training; an evaluation wants every step (None).
    """
    check_attack(images, labels, eps, norm, steps, restarts, random_start)
    if early_stop is not None and (targeted or early_stop < 0):
        raise VitkitError(f"early_stop = {early_stop} is FAT's τ ≥ 0, for untargeted attacks: pass e.g. 1, or None")
    step_size = 2.5 * eps / steps if step_size is None else step_size
    keys = image_keys(images, draw_seed(generator)) if random_start else None

    def run(index: Tensor, attempt: int) -> Tensor:
        x = images[index]
        start = start_in_ball(x, keys[index], attempt, eps, norm) if keys is not None else x
        return ascend(model, x, labels[index], start, steps=steps, step_size=step_size, eps=eps, norm=norm,
                      targeted=targeted, early_stop=early_stop)

    with eval_mode(model):
        return keep_worst(model, labels, restarts, run, targeted)[0]
