"""Is an explanation meaningful? Deletion and insertion curves (Petsiuk et al. 2018) over patches.

Deletion hides the most relevant patches first and watches the predicted class's probability fall:
the faster, the better (lower AUC). Insertion starts from a blank image and reveals the most relevant
patches first: the faster the probability rises, the better (higher AUC). A random order is the
baseline any explanation must beat. A hidden patch is set to 0 in normalised space (the data mean).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence

import torch
from torch import Tensor

from vitkit.models import VisionTransformer


def patch_mask(order: Tensor, shown: int, grid: int, patch: int) -> Tensor:
    """(B, 1, H, W) float mask, 1 on the first `shown` patches of each image's `order`."""
    B, N = order.shape
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(N, device=order.device).expand(B, N))
    visible = (rank < shown).float().reshape(B, 1, grid, grid)
    return visible.repeat_interleave(patch, 2).repeat_interleave(patch, 3)


@torch.no_grad()
def deletion_insertion_curves(
    model: VisionTransformer, x: Tensor, relevance: Tensor, steps: int = 16, labels: Tensor | None = None
) -> dict[str, Tensor]:
    """Per-image curves (B, steps + 1), for deletion and insertion in order of decreasing relevance:
    `*_prob` the originally predicted class's probability, `*_kept` whether the prediction is unchanged,
    and with `labels`, `*_correct` whether it is right."""
    model.eval()
    cfg = model.cfg
    N = cfg.num_patches
    predicted = model(x).argmax(1)
    order = relevance.argsort(1, descending=True)
    counts = torch.linspace(0, N, steps + 1).round().long().tolist()
    curves: dict[str, list[Tensor]] = {}
    for count in counts:
        top = patch_mask(order, count, cfg.grid_size, cfg.patch_size)
        for name, masked in (("deletion", x * (1 - top)), ("insertion", x * top)):
            probs = model(masked).softmax(1)
            curves.setdefault(f"{name}_prob", []).append(probs.gather(1, predicted[:, None])[:, 0])
            curves.setdefault(f"{name}_kept", []).append((probs.argmax(1) == predicted).float())
            if labels is not None:
                curves.setdefault(f"{name}_correct", []).append((probs.argmax(1) == labels).float())
    return {k: torch.stack(v, dim=1) for k, v in curves.items()}


def area_under(curve: Tensor) -> float:
    """Trapezoid area of a mean curve sampled evenly on [0, 1]."""
    y = curve.double()
    return float(((y[1:] + y[:-1]) / 2).mean())


def evaluate_explanations(
    model: VisionTransformer,
    batches: Callable[[], Iterable[tuple[Tensor, Tensor | None]]],
    relevance: Callable[[Tensor, str], Tensor],
    methods: Sequence[str] = ("rollout", "grad_rollout", "random"),
    steps: int = 16,
) -> tuple[dict[str, float], dict[str, dict[str, Tensor]]]:
    """Deletion and insertion AUCs of each method over all batches (normalised images, labels or None).

    `batches()` gives a fresh pass over the data; `relevance(x, method)` gives (B, N) patch relevance.
    Returns flat figures ({method}_{deletion|insertion}_auc, ..._agreement_auc, ..._accuracy_auc) and
    the mean probability curves per method, for plotting.
    """
    figures: dict[str, float] = {}
    curves: dict[str, dict[str, Tensor]] = {}
    for method in methods:
        sums: dict[str, Tensor] = {}
        n = 0
        for x, y in batches():
            for k, v in deletion_insertion_curves(model, x, relevance(x, method), steps, y).items():
                sums[k] = sums.get(k, 0) + v.sum(0)
            n += len(x)
        mean = {k: v / n for k, v in sums.items()}
        curves[method] = {kind: mean[f"{kind}_prob"].cpu() for kind in ("deletion", "insertion")}
        for kind in ("deletion", "insertion"):
            figures[f"{method}_{kind}_auc"] = area_under(mean[f"{kind}_prob"])
            figures[f"{method}_{kind}_agreement_auc"] = area_under(mean[f"{kind}_kept"])
            if f"{kind}_correct" in mean:
                figures[f"{method}_{kind}_accuracy_auc"] = area_under(mean[f"{kind}_correct"])
    return figures, curves
