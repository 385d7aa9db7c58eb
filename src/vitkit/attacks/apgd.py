"""Auto-PGD (Croce & Hein 2020, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks"): PGD with momentum whose step size needs no tuning.

PGD with a fixed step size can stall or oscillate and so overstate robustness; APGD starts with steps of
2ε, halves an image's step at checkpoints where its loss has stopped rising, and then goes on from the
best point found so far. With the DLR loss (difference of logits ratio), which does not depend on the
logits' scale, it also sees through models whose cross-entropy gradients are small (saturated softmax).
Same conventions as `vitkit.attacks.pgd`: pixels in [0, 1], eval mode, keyed random starts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from vitkit.attacks.noise import draw_seed, image_keys
from vitkit.attacks.pgd import ascent_direction, check_attack, keep_worst, project, start_in_ball
from vitkit.attacks.pixel import Loss, cross_entropy, eval_mode, input_gradient, margin
from vitkit.errors import VitkitError

MOMENTUM = 0.75  # α: the weight of the new step against the last move
RHO = 0.75  # a step is halved when the loss rose in at most ρ of the iterations since the last checkpoint


def dlr_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Difference of logits ratio per image (B,): -(z_y - max_{i≠y} z_i) / (z_π1 - z_π3), π the classes by
    decreasing logit. Positive once the image is misclassified; unchanged by shifting or scaling the logits."""
    if logits.shape[1] < 3:
        raise VitkitError(f"the DLR loss needs at least 3 classes, the model has {logits.shape[1]}: use the 'ce' loss")
    top = logits.topk(3, dim=1).values
    return -margin(logits, labels) / (top[:, 0] - top[:, 2] + 1e-12)


LOSSES: dict[str, Loss] = {"ce": cross_entropy, "dlr": dlr_loss}


def checkpoints(steps: int) -> list[int]:
    """The iterations after which a step may be halved: w_j = ⌈p_j·steps⌉ with p_0 = 0, p_1 = 0.22 and
    p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), those below `steps`."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    marks = sorted({math.ceil(round(q * steps, 9)) for q in p})  # round: 0.41 · 100 is 41.000000000000004
    return [w for w in marks if w < steps]


def apgd(
    model: nn.Module, images: Tensor, labels: Tensor, eps: float, *, norm: str = "linf", steps: int = 100,
    loss: str = "ce", random_start: bool = True, restarts: int = 1, generator: torch.Generator | None = None,
) -> Tensor:
    """Untargeted Auto-PGD in the ℓ∞ or ℓ2 ball of radius ε, in [0, 1].

    loss: "ce" (APGD-CE) or "dlr" (APGD-DLR; at least 3 classes). The two together, keeping an image's
        worst case, are the untargeted part of AutoAttack.
    steps: iterations (Croce & Hein: 100); the step-size schedule scales with them.
    random_start, restarts, generator: as in `pgd`; each image keeps its first misclassified point, else
        its point of highest loss (between restarts, of highest cross-entropy, whatever `loss`).
    """
    check_attack(images, labels, eps, norm, steps, restarts, random_start)
    if loss not in LOSSES:
        raise VitkitError(f"unknown APGD loss {loss!r}: use one of {', '.join(LOSSES)}")
    keys = image_keys(images, draw_seed(generator)) if random_start else None

    def run(index: Tensor, attempt: int) -> Tensor:
        x = images[index]
        start = start_in_ball(x, keys[index], attempt, eps, norm) if keys is not None else x
        return _one_run(model, x, labels[index], start, eps, norm, steps, LOSSES[loss])

    with eval_mode(model):
        return keep_worst(model, labels, restarts, run)[0]


def _one_run(
    model: nn.Module, images: Tensor, labels: Tensor, start: Tensor, eps: float, norm: str, steps: int, loss: Loss,
) -> Tensor:
    """One APGD run from `start`: every image's first misclassified point, else its point of highest loss.

    An image's result is fixed once it is fooled, so the model sees only the images still standing: on a weak
    model most of the batch drops out in the first steps, and the run costs a fraction of `steps` passes."""
    per_image = (-1,) + (1,) * (images.ndim - 1)

    def evaluate(x: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        predicted = {}

        def objective(logits: Tensor, y: Tensor) -> Tensor:
            predicted["class"] = logits.detach().argmax(1)  # the same forward gives the loss and the prediction
            return loss(logits, y)

        value, grad = input_gradient(model, x, y, objective)
        return value, grad, predicted["class"] != y

    value, grad, wrong = evaluate(start, labels)
    best_value, best_point, best_grad = value.clone(), start.clone(), grad.clone()
    found, fooled = start.clone(), wrong.clone()
    step = torch.full((len(images),), 2.0 * eps, device=images.device, dtype=images.dtype)
    marks = checkpoints(steps)
    windows = {w: w - v for v, w in zip(marks, marks[1:])}
    rises = torch.zeros(len(images), dtype=torch.long, device=images.device)
    # As in the authors' code (fra31/auto-attack), which AutoAttack figures come from: the first checkpoint
    # counts as following a halving, and condition 1 is "at most" ρ of the window.
    halved_last = torch.ones(len(images), dtype=torch.bool, device=images.device)
    best_at_last_mark = best_value.clone()
    current = previous = start
    for k in range(steps):
        alpha = 1.0 if k == 0 else MOMENTUM
        z = project(current + step.view(per_image) * ascent_direction(grad, norm), images, eps, norm)
        moved = project(current + alpha * (z - current) + (1 - alpha) * (current - previous), images, eps, norm)
        # The fooled images keep their last loss and gradient; they no longer matter.
        standing = (~fooled).nonzero().squeeze(1)
        new_value, new_grad, wrong = value.clone(), grad.clone(), fooled.clone()
        new_value[standing], new_grad[standing], wrong[standing] = evaluate(moved[standing], labels[standing])
        first = wrong & ~fooled
        found[first], fooled = moved[first], fooled | wrong
        rises += new_value > value
        better = new_value > best_value
        best_value = torch.where(better, new_value, best_value)
        best_point[better], best_grad[better] = moved[better], new_grad[better]
        previous, current, value, grad = current, moved, new_value, new_grad
        if fooled.all():  # every image keeps its first success: nothing left to do
            break
        if k + 1 in windows:
            # Halve where the loss rose too rarely, or where it was not halved last time and the best has
            # not improved since; those images go on from their best point (the next step's momentum is
            # the move from the last iterate to it, as in the paper).
            halve = (rises <= RHO * windows[k + 1]) | (~halved_last & (best_value <= best_at_last_mark))
            step = torch.where(halve, step / 2, step)
            back = halve.view(per_image)
            current = torch.where(back, best_point, current)
            value, grad = torch.where(halve, best_value, value), torch.where(back, best_grad, grad)
            halved_last, best_at_last_mark = halve, best_value.clone()
            rises.zero_()
    return torch.where(fooled.view(per_image), found, best_point)
