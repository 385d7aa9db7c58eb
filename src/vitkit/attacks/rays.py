"""RayS (Chen & Gu, KDD 2020, "RayS: A Ray Searching Method for Hard-label Adversarial Attack"): a
decision-based black-box attack under an ℓ∞ budget.

It sees only the predicted class, the least an attacker can get from a deployed model. Along a direction
d ∈ {−1, +1}^D it finds by bisection the radius r at which x + r·d (clipped to [0, 1]) changes the
prediction, and it searches the sign vectors hierarchically: flip the signs of the whole image, then of
each half, each quarter and so on down to single pixels (then over them again), keeping a flip when it
brings the boundary closer. Most flips cost one query: only when x + r·d' (r the best radius so far) is
adversarial does a bisection follow. An image is attacked until it is fooled within ε or has spent
`queries` predictions. Deterministic: no random draws, so an image gets the same attack in any batch.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from vitkit.attacks.pgd import check_budget
from vitkit.attacks.pixel import check_pixels, eval_mode
from vitkit.errors import VitkitError


def rays(
    model: nn.Module, images: Tensor, labels: Tensor, eps: float, *, queries: int = 5000,
    tolerance: float | None = None,
) -> Tensor:
    """Untargeted RayS in the ℓ∞ ball of radius ε, in [0, 1].

    queries: predictions per image at most (Chen & Gu report most successes within 10,000).
    tolerance: the bisection stops when the boundary is bracketed this tightly, or as soon as a point within
        ε is found (default 10⁻³/√D, the authors' 10⁻³ along a direction of unit ℓ2 norm: the radii of
        two directions must differ by more than this for the search to tell them apart).
    Returns x + r·d for the best direction d when its boundary radius r is at most ε (an adversarial
    image; r = 0 for an image the model gets wrong already), else x + ε·d, the point of that ray at the
    edge of the budget; both clipped to [0, 1]. x + r·d lies within one tolerance of the boundary, so
    scoring it again in another batch (other kernels) may, rarely, find it right: an error on the side
    of robustness.
    """
    check_pixels(images, labels)
    check_budget(eps, "linf")
    if queries < 1:
        raise VitkitError(f"RayS needs at least one query per image, got {queries}")
    if tolerance is not None and not tolerance > 0:
        raise VitkitError(f"the bisection tolerance must be positive, got {tolerance}")
    if eps == 0 or not images.numel():
        return images.clone()
    tolerance = 1e-3 / images[0].numel() ** 0.5 if tolerance is None else tolerance
    with eval_mode(model), torch.no_grad():
        search = _RaySearch(model, images, labels, queries, tolerance)
        search.run(eps)
        radius = search.radius.clamp(max=eps).view(-1, 1, 1, 1)
        return (images + radius * search.direction.view_as(images)).clamp(0, 1)


class _RaySearch:
    """The state of the search: each image's best direction (N, D), its boundary radius (N,; inf while no
    adversarial point is known on it; at most 1, where the ray reaches the corner of the box) and the
    queries spent."""

    def __init__(self, model: nn.Module, images: Tensor, labels: Tensor, queries: int, tolerance: float):
        self.model, self.images, self.labels = model, images, labels
        self.limit, self.tolerance = queries, tolerance
        n = len(images)
        self.direction = torch.ones(n, images[0].numel(), device=images.device, dtype=images.dtype)
        self.radius = torch.full((n,), float("inf"), device=images.device, dtype=images.dtype)
        self.spent = torch.zeros(n, dtype=torch.long, device=images.device)

    def fooled(self, index: Tensor, direction: Tensor, radius: Tensor) -> Tensor:
        """One query for the images at `index`: is x + r·d misclassified?"""
        self.spent[index] += 1
        x = self.images[index]
        point = (x + radius.view(-1, 1, 1, 1) * direction.view_as(x)).clamp(0, 1)
        return self.model(point).argmax(1) != self.labels[index]

    def run(self, eps: float) -> None:
        d = self.direction.shape[1]
        everyone = torch.arange(len(self.images), device=self.images.device)
        # The first query, on the clean images: those misclassified already are adversarial at radius 0.
        self.radius[self.fooled(everyone, self.direction, torch.zeros_like(self.radius))] = 0.0
        self.try_flip(slice(0, 0), eps)  # the all-positive start (nothing flipped)
        level = 0
        while True:
            blocks = 2**level
            size = -(-d // blocks)
            for block in range(blocks):
                start = block * size
                if start >= d:
                    break
                if not self.try_flip(slice(start, min(start + size, d)), eps):
                    return
            if size > 1:  # once down to single pixels, pass over them again (as the authors' code)
                level += 1

    def try_flip(self, block: slice, eps: float) -> bool:
        """Tries the best direction with `block`'s signs flipped on every image still attacked, keeping it
        where its boundary is closer. Returns False once no image is left to attack."""
        active = ((self.radius > eps) & (self.spent < self.limit)).nonzero()[:, 0]
        if not len(active):
            return False
        attempt = self.direction[active].clone()
        attempt[:, block] *= -1
        # At most the radius known so far: beyond it the attempt cannot win; at most 1, the box's corner.
        high = self.radius[active].clamp(max=1.0)
        closer = self.fooled(active, attempt, high)
        index, attempt, high = active[closer], attempt[closer], high[closer]
        low = torch.zeros_like(high)
        searching = torch.arange(len(index), device=index.device)
        while True:
            # Within ε the image is fooled and leaves the search: no need to bracket the boundary further.
            searching = searching[(high[searching] - low[searching] > self.tolerance) & (high[searching] > eps)
                                  & (self.spent[index[searching]] < self.limit)]
            if not len(searching):
                break
            middle = (low[searching] + high[searching]) / 2
            hit = self.fooled(index[searching], attempt[searching], middle)
            high[searching[hit]], low[searching[~hit]] = middle[hit], middle[~hit]
        better = high < self.radius[index]
        self.direction[index[better]], self.radius[index[better]] = attempt[better], high[better]
        return True
