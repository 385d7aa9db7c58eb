"""Square Attack (Andriushchenko, Croce, Flammarion & Hein, ECCV 2020): a score-based black-box attack.

It reads only the model's outputs, never a gradient, so gradient masking cannot hide a weakness from it:
a model robust to PGD but not to Square has obfuscated gradients, which is why AutoAttack includes it.
It is a random search: each query changes the perturbation on a random square window and keeps the
change if the margin z_y − max_{i≠y} z_i drops; the windows shrink on a fixed schedule, and an image is
no longer queried once it is misclassified. Each image costs at most `queries` forward passes.

Pixels in [0, 1], eval mode, and randomness keyed by image (`vitkit.attacks.noise`), as in every attack
here: an image gets the same attack in any batch.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from vitkit.attacks.noise import draw_seed, image_keys, uniform
from vitkit.attacks.pgd import _norms, check_budget
from vitkit.attacks.pixel import check_pixels, eval_mode, margin
from vitkit.errors import VitkitError

# (iteration of a 10,000-query run, divisor of p_init up to it): the paper's window schedule
SCHEDULE = ((10, 1), (50, 2), (200, 4), (500, 8), (1000, 16), (2000, 32), (4000, 64), (6000, 128), (8000, 256))


def window_fraction(p_init: float, iteration: int, queries: int) -> float:
    """The share p of the image a window covers at `iteration`: p_init, halved at the paper's marks of a
    10,000-query run, the marks rescaled to `queries`."""
    scaled = int(iteration / queries * 10000)
    return p_init / next((divisor for mark, divisor in SCHEDULE if scaled <= mark), 512)


def square(
    model: nn.Module, images: Tensor, labels: Tensor, eps: float, *, norm: str = "linf", queries: int = 5000,
    p_init: float = 0.8, generator: torch.Generator | None = None,
) -> Tensor:
    """Untargeted Square Attack in the ℓ∞ or ℓ2 ball of radius ε, in [0, 1].

    queries: forward passes per image at most (Andriushchenko et al. evaluate with 5,000–10,000; the
        window schedule stretches to the budget).
    p_init: the share of the image the first windows cover (0.8, AutoAttack's setting for both norms).
    generator: where the seed of the random draws comes from (default torch's global generator).
    Returns each image's first misclassified point, else its point of lowest margin (an image the model
    gets wrong already, unchanged).
    """
    check_pixels(images, labels)
    check_budget(eps, norm)
    if queries < 1:
        raise VitkitError(f"the Square Attack needs at least one query per image, got {queries}")
    if not 0 < p_init <= 1:
        raise VitkitError(f"p_init = {p_init} is not a share of the image in (0, 1]: pass e.g. 0.8")
    keys = image_keys(images, draw_seed(generator))
    result = images.clone()
    if eps == 0 or not len(images) or queries == 1:
        return result
    with eval_mode(model), torch.no_grad():
        right = margin(model(images), labels) > 0  # the first query: images misclassified already stay as they are
        if right.any():
            start, propose = (_linf if norm == "linf" else _l2)(images[right], keys[right], eps, queries - 1, p_init)
            result[right] = _random_search(model, start, labels[right], queries - 1, propose)
    return result


# propose(iteration, index, current) -> a candidate for each image at `index` (into the images being searched),
# whose best point so far is `current`
Proposal = Callable[[int, Tensor, Tensor], Tensor]


def _random_search(model: nn.Module, best: Tensor, labels: Tensor, queries: int, propose: Proposal) -> Tensor:
    """From the start `best` (one query), `queries` − 1 rounds: every image still classified right gets a
    proposal, which becomes its best point where it lowers the margin."""
    best_margin = margin(model(best), labels)
    for i in range(1, queries):
        todo = (best_margin > 0).nonzero()[:, 0]
        if not len(todo):
            break
        candidate = propose(i, todo, best[todo])
        candidate_margin = margin(model(candidate), labels[todo])
        better = candidate_margin < best_margin[todo]
        best[todo[better]], best_margin[todo[better]] = candidate[better], candidate_margin[better]
    return best


def _linf(images: Tensor, keys: Tensor, eps: float, queries: int, p_init: float) -> tuple[Tensor, Proposal]:
    """ℓ∞'s start and proposal. Every pixel stays at x ± ε (clipped): the search runs over the vertices of
    the ℓ∞ ball."""
    _, c, h, w = images.shape
    # The start: vertical stripes, one sign per channel and column.
    start = (images + eps * _signs(uniform(keys, 0, (c, 1, w))).to(images.dtype)).clamp(0, 1)

    def propose(i: int, todo: Tensor, current: Tensor) -> Tensor:
        side = max(round(math.sqrt(window_fraction(p_init, i, queries) * h * w)), 1)
        side = min(side, max(min(h, w) - 1, 1))
        u = uniform(keys[todo], i, (2 + c,))
        window = _window(*_corner(u[:, 0], u[:, 1], side, h, w), side, c)
        x = images[todo]
        signs = _signs(u[:, 2:]).to(x.dtype).view(-1, c, 1, 1)
        # A draw equal to the window as it stands would waste a query; the opposite signs then differ at
        # every pixel (the authors' code redraws until something changes).
        unchanged = ((x[window] + eps * signs).clamp(0, 1) == current[window]).flatten(1).all(1)
        signs = torch.where(unchanged.view(-1, 1, 1, 1), -signs, signs)
        candidate = current.clone()
        candidate[window] = (x[window] + eps * signs).clamp(0, 1)
        return candidate

    return start, propose


def _l2(images: Tensor, keys: Tensor, eps: float, queries: int, p_init: float) -> tuple[Tensor, Proposal]:
    """ℓ2's start and proposal. The perturbation stays on the sphere of radius ε (then clipped to the box):
    each proposal moves mass from a second window into the first and adds a fresh bump there."""
    n, c, h, w = images.shape
    # The start: a centred grid of tiles, each a bump times a random sign per channel.
    tile = max(min(h, w) // 5, 1)
    rows, cols = h // tile, w // tile
    u = uniform(keys, 0, (c + 1, rows, cols))
    bumps = _bumps(tile, u[:, c] < 0.5)  # (n, rows, cols, tile, tile), each tile its own transposition
    signed = bumps[:, None] * _signs(u[:, :c])[..., None, None]
    delta = torch.zeros_like(images)
    top, left = (h - rows * tile) // 2, (w - cols * tile) // 2
    delta[:, :, top : top + rows * tile, left : left + cols * tile] = (
        signed.permute(0, 1, 2, 4, 3, 5).reshape(n, c, rows * tile, cols * tile).to(images.dtype))
    start = (images + eps * delta / _norms(delta).clamp_min(1e-12)).clamp(0, 1)

    def propose(i: int, todo: Tensor, current: Tensor) -> Tensor:
        side = max(round(math.sqrt(window_fraction(p_init, i, queries) * h * w)), 3)
        side = min(side + 1 - side % 2, min(h, w))  # odd, so the bump has a centre (unless the image is smaller)
        u = uniform(keys[todo], i, (5 + c,))
        first = _window(*_corner(u[:, 0], u[:, 1], side, h, w), side, c)
        second = _window(*_corner(u[:, 2], u[:, 3], side, h, w), side, c)
        x = images[todo]
        delta = current - x
        union = torch.zeros_like(delta)
        union[first], union[second] = 1.0, 1.0
        # The new window, per channel: the old one's direction plus a fresh bump, with the norm the two
        # windows had in that channel plus a share of what the sphere has left (the authors' rule).
        old = delta[first]
        new = _bumps(side, u[:, 4] < 0.5).to(x.dtype)[:, None] * _signs(u[:, 5:]).view(-1, c, 1, 1)
        new = new + old / (old.pow(2).sum((-2, -1), keepdim=True).sqrt() + 1e-12)
        in_windows = (delta * union).pow(2).sum((-2, -1), keepdim=True)  # per channel
        mass = ((eps**2 - _norms(delta) ** 2).clamp_min(0) / c + in_windows).sqrt()
        delta[second] = 0.0
        delta[first] = new / (new.pow(2).sum((-2, -1), keepdim=True).sqrt() + 1e-12) * mass
        return (x + eps * delta / _norms(delta).clamp_min(1e-12)).clamp(0, 1)

    return start, propose


def _signs(u: Tensor) -> Tensor:
    """±1 from uniform numbers."""
    return torch.where(u < 0.5, -1.0, 1.0)


def _corner(u_row: Tensor, u_col: Tensor, side: int, h: int, w: int) -> tuple[Tensor, Tensor]:
    """A uniform top-left corner of a side×side window inside an h×w image, from uniforms in [0, 1)."""
    return (u_row * (h - side + 1)).long(), (u_col * (w - side + 1)).long()


def _window(rows: Tensor, cols: Tensor, side: int, channels: int) -> tuple[Tensor, ...]:
    """Advanced indices of each image's side×side window at (rows[b], cols[b]), every channel:
    `x[window]` is (B, C, side, side) and `x[window] = v` writes it."""
    n, span = len(rows), torch.arange(side, device=rows.device)
    return (torch.arange(n, device=rows.device).view(n, 1, 1, 1),
            torch.arange(channels, device=rows.device).view(1, channels, 1, 1),
            (rows[:, None] + span).view(n, 1, side, 1), (cols[:, None] + span).view(n, 1, 1, side))


def _rectangles(height: int, width: int) -> Tensor:
    """Concentric rectangles around the centre of a height×width window, ring k weighing 1/(k+1)² and
    every ring adding to the ones inside it; unit ℓ2 norm."""
    rings = max(height // 2 + 1, width // 2 + 1)
    weights = 1.0 / torch.arange(1, rings + 1, dtype=torch.float64) ** 2
    from_ring = weights.flip(0).cumsum(0).flip(0)  # from_ring[d] = Σ_{k ≥ d} 1/(k+1)²
    ring = torch.maximum((torch.arange(height) - height // 2).abs()[:, None],
                         (torch.arange(width) - width // 2).abs()[None, :])
    bump = from_ring[ring]
    return bump / bump.norm()


@functools.cache
def _bump(side: int) -> Tensor:
    """The paper's pseudo-Gaussian window (side, side), float64 on the CPU: rectangles of positive weight
    over the top half, negative over the bottom, unit norm."""
    half = side // 2
    bump = torch.cat([_rectangles(half, side), -_rectangles(side - half, side)]) if side > 1 else torch.ones(1, 1)
    return bump / bump.norm()


def _bumps(side: int, transpose: Tensor) -> Tensor:
    """`_bump(side)`, transposed where `transpose` (any shape S) is True: (*S, side, side) float32."""
    bump = _bump(side).float().to(transpose.device)
    return torch.where(transpose[..., None, None], bump.T, bump)
