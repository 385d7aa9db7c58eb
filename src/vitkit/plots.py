"""Figures for training reports: learning curves, confusion matrix, a grid of predictions.

Figures are built as `matplotlib.figure.Figure` objects and rendered to PNG by Agg, never through
pyplot: no global backend is switched, no GUI is needed and no figure outlives its call. Every
PNG is written to a temporary file beside `path` and renamed over it, so a reader never sees a
half-written image.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from torch import Tensor

from vitkit.errors import VitkitError

RIGHT, WRONG = "tab:green", "tab:red"
TRUE_BOX, PREDICTED_BOX = "deepskyblue", "orange"  # apart from RIGHT/WRONG, which colour the titles
CURVE_TITLES = {"iou_mean": "Mean IoU"}


def _save(fig: Figure, path: str | os.PathLike) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png", dpi=100, bbox_inches="tight")
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    finally:
        fig.clear()  # drop the artists now rather than at garbage collection


def plot_learning_curves(
    history: list[dict], path: str | os.PathLike, metrics: Sequence[str] = ("loss", "accuracy")
) -> None:
    """One panel per metric (default loss and accuracy) per epoch, train and validation, from the trainer's
    JSONL rows.

    Rows need `epoch` and `train_<metric>`; `val_<metric>` may be missing or None (e.g. no validation
    split, or validation every few epochs) and is then left out.
    """
    if not history:
        raise VitkitError("the training history is empty: train for at least one epoch before plotting curves")
    missing = {"epoch", *(f"train_{m}" for m in metrics)} - set(history[0])
    if missing:
        raise VitkitError(f"history rows lack {sorted(missing)}: pass the rows of the trainer's metrics JSONL")
    fig = Figure(figsize=(5 * len(metrics), 4))
    for ax, metric in zip(fig.subplots(1, len(metrics), squeeze=False).ravel(), metrics):
        for split, style in (("train", "o-"), ("val", "s--")):
            points = [(r["epoch"], r[f"{split}_{metric}"]) for r in history if r.get(f"{split}_{metric}") is not None]
            if points:
                epochs, values = zip(*points)
                ax.plot(epochs, values, style, markersize=3, label="train" if split == "train" else "validation")
        ax.set_xlabel("epoch")
        ax.set_ylabel(metric)
        ax.set_title(CURVE_TITLES.get(metric, metric.capitalize()))
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def confusion_matrix(true: Tensor, pred: Tensor, num_classes: int) -> np.ndarray:
    """(classes, classes) int64 counts, rows = true class, columns = predicted class."""
    true, pred = torch.as_tensor(true).long().flatten(), torch.as_tensor(pred).long().flatten()
    if true.shape != pred.shape:
        raise VitkitError(f"{true.numel()} true labels but {pred.numel()} predictions: pass one prediction per label")
    for name, labels in (("true", true), ("predicted", pred)):
        if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
            raise VitkitError(
                f"{name} labels range over {labels.min()}..{labels.max()} but there are {num_classes} classes: "
                "pass labels in 0..classes-1"
            )
    counts = torch.bincount(true * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes).cpu().numpy()


def plot_confusion_matrix(
    confusion: np.ndarray, classes: list[str], path: str | os.PathLike, normalize: bool = True
) -> None:
    """Heat map of a confusion matrix (rows true, columns predicted); `normalize` shows row fractions."""
    confusion = np.asarray(confusion)
    k = len(classes)
    if confusion.shape != (k, k):
        raise VitkitError(f"confusion matrix of shape {confusion.shape} does not match {k} class names")
    if normalize:
        # Classes absent from the data have an all-zero row; show zeros there rather than NaN.
        values = confusion / np.maximum(confusion.sum(axis=1, keepdims=True), 1)
    else:
        values = confusion
    size = min(4 + 0.45 * k, 20)
    fig = Figure(figsize=(size + 1, size))
    ax = fig.subplots()
    im = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if normalize else None)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix" + (" (row-normalised)" if normalize else ""))
    if k <= 30:  # beyond that the numbers no longer fit in the cells
        threshold = values.max() / 2
        for i in range(k):
            for j in range(k):
                text = f"{values[i, j]:.2f}" if normalize else str(int(values[i, j]))
                ax.text(j, i, text, ha="center", va="center", fontsize=7,
                        color="white" if values[i, j] > threshold else "black")
    _save(fig, path)


def _pixels(images: Tensor) -> np.ndarray:
    """A non-empty (N, C, H, W) batch, uint8 or float in [0, 1], C = 1 or 3, as floats (N, H, W, C) in [0, 1]."""
    images = torch.as_tensor(images).detach().cpu()
    if images.ndim != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        raise VitkitError(f"expected a non-empty batch of images (N, 1 or 3, H, W), got {tuple(images.shape)}")
    pixels = images.float() / 255 if images.dtype == torch.uint8 else images.float().clamp(0, 1)
    return pixels.permute(0, 2, 3, 1).numpy()


def _grid(n: int, ncols: int, cell: tuple[float, float]) -> tuple[Figure, np.ndarray]:
    """A figure with at least n axes, at most `ncols` a row, each `cell` inches (width, height)."""
    ncols = max(1, min(ncols, n))
    nrows = -(-n // ncols)
    fig = Figure(figsize=(cell[0] * ncols, cell[1] * nrows))
    return fig, fig.subplots(nrows, ncols, squeeze=False).ravel()


def plot_prediction_grid(
    images: Tensor,
    true: Sequence[int],
    pred: Sequence[int],
    classes: list[str],
    path: str | os.PathLike,
    probs: Sequence[float] | None = None,
    ncols: int = 8,
) -> None:
    """Images in a grid, each titled "pred (p%) / true", green when right and red when wrong.

    images: (N, C, H, W), uint8 or float in [0, 1], with C = 1 (shown in grey) or 3.
    probs: the probability of each predicted class, shown as a percentage when given.
    """
    pixels = _pixels(images)
    n = len(pixels)
    if len(true) != n or len(pred) != n or (probs is not None and len(probs) != n):
        raise VitkitError(f"{n} images need as many true labels, predictions and probabilities")
    labels = [int(label) for label in (*true, *pred)]
    if min(labels) < 0 or max(labels) >= len(classes):
        raise VitkitError(f"labels range over {min(labels)}..{max(labels)} but there are {len(classes)} class names")
    fig, axes = _grid(n, ncols, (1.6, 1.8))
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i >= n:
            continue
        t, p = int(true[i]), int(pred[i])
        if pixels.shape[-1] == 1:
            ax.imshow(pixels[i, ..., 0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        else:
            ax.imshow(pixels[i], interpolation="nearest")
        confidence = f" ({100 * float(probs[i]):.0f}%)" if probs is not None else ""
        ax.set_title(f"{classes[p]}{confidence} / {classes[t]}", fontsize=8, color=RIGHT if p == t else WRONG)
    _save(fig, path)


def _draw_box(ax, box: Tensor, width: int, height: int, colour: str) -> None:
    """A (cx, cy, w, h) box in image fractions, outlined on an image drawn by imshow."""
    from matplotlib.patches import Rectangle

    cx, cy, w, h = (float(v) for v in box)
    # Pixel edges are at -0.5 and width - 0.5 in imshow's coordinates.
    ax.add_patch(Rectangle(((cx - w / 2) * width - 0.5, (cy - h / 2) * height - 0.5), w * width, h * height,
                           fill=False, edgecolor=colour, linewidth=1.5))


def plot_box_predictions(
    images: Tensor,
    true_boxes: Tensor | None,
    pred_boxes: Tensor,
    true: Sequence[int] | None,
    pred: Sequence[int],
    classes: list[str],
    path: str | os.PathLike,
    ious: Sequence[float] | None = None,
    probs: Sequence[float] | None = None,
    ncols: int = 8,
) -> None:
    """Images in a grid with the true box (blue) and the predicted box (orange) drawn on each, titled
    "pred / true" (and the IoU), green when the class is right and red when it is wrong. Without the truth
    (`true_boxes` and `true` None: images to predict), the predicted box alone, titled with its class (and its
    probability from `probs`).

    images: (N, C, H, W), uint8 or float in [0, 1], C = 1 or 3; boxes: (N, 4) (cx, cy, w, h) in [0, 1].
    """
    pixels = _pixels(images)
    pixels = np.repeat(pixels, 3 // pixels.shape[-1], axis=-1)  # grey images shown in colour, under coloured boxes
    n, H, W = pixels.shape[:3]
    if (true_boxes is None) != (true is None):
        raise VitkitError("pass both the true boxes and the true labels, or neither")
    if len(pred_boxes) != n or len(pred) != n or (true is not None and (len(true_boxes) != n or len(true) != n)):
        raise VitkitError(f"{n} images need as many predicted boxes and labels (and true ones, where given)")
    fig, axes = _grid(n, ncols, (1.8, 2.0))
    known = true is not None
    fig.suptitle("true box: blue, predicted box: orange; title: predicted / true class" if known else
                 "predicted box and class", fontsize=9)
    for i, ax in enumerate(axes):
        ax.axis("off")
        if i >= n:
            continue
        ax.imshow(pixels[i], interpolation="nearest")
        drawn = ((true_boxes[i], TRUE_BOX),) if known else ()
        for box, colour in (*drawn, (pred_boxes[i], PREDICTED_BOX)):
            _draw_box(ax, box, W, H, colour)
        p = int(pred[i])
        confidence = f" ({100 * float(probs[i]):.0f}%)" if probs is not None else ""
        if not known:
            ax.set_title(f"{classes[p]}{confidence}", fontsize=8)
            continue
        t = int(true[i])
        iou = f" IoU {float(ious[i]):.2f}" if ious is not None else ""
        ax.set_title(f"{classes[p]}{confidence} / {classes[t]}{iou}", fontsize=8, color=RIGHT if p == t else WRONG)
    _save(fig, path)


def plot_explanations(
    images: Tensor, maps: Tensor, titles: Sequence[str], correct: Sequence[bool], path: str | os.PathLike,
    boxes: Tensor | None = None,
) -> None:
    """Seed 003's figure, one row per image: the image, the relevance heat-map over it, and the image
    darkened where the relevance is low. maps: (N, H, W) in [0, 1]; `boxes` (N, 4) (cx, cy, w, h) in [0, 1],
    predicted boxes, are drawn on the first two panels."""
    pixels = images.float() / 255 if images.dtype == torch.uint8 else images.float().clamp(0, 1)
    pixels = pixels.detach().cpu().permute(0, 2, 3, 1).expand(-1, -1, -1, 3).numpy()
    heat = maps.detach().cpu().float().numpy()
    n = len(pixels)
    fig = Figure(figsize=(5.4, 1.9 * n))
    axes = fig.subplots(n, 3, squeeze=False)
    for i in range(n):
        panels = (pixels[i], pixels[i], pixels[i] * heat[i][..., None])
        for j, (ax, panel) in enumerate(zip(axes[i], panels)):
            ax.imshow(panel, interpolation="nearest")
            if j == 1:
                ax.imshow(heat[i], cmap="jet", alpha=0.5, vmin=0, vmax=1, interpolation="bilinear")
            if boxes is not None and j < 2:
                _draw_box(ax, boxes[i], panel.shape[1], panel.shape[0], PREDICTED_BOX)
            ax.axis("off")
        axes[i, 0].set_title(titles[i], fontsize=8, color=RIGHT if correct[i] else WRONG, loc="left")
    _save(fig, path)


def plot_deletion_insertion(curves: dict[str, dict[str, np.ndarray]], path: str | os.PathLike) -> None:
    """curves[method]["deletion"|"insertion"]: mean probability of the predicted class per step."""
    fig = Figure(figsize=(9, 3.5))
    axes = fig.subplots(1, 2)
    for ax, kind in zip(axes, ("deletion", "insertion")):
        for method, c in curves.items():
            y = np.asarray(c[kind])
            ax.plot(np.linspace(0, 1, len(y)), y, marker=".", label=method)
        ax.set(title=f"{kind} (patches {'removed' if kind == 'deletion' else 'revealed'} by relevance)",
               xlabel="fraction of patches", ylabel="probability of predicted class")
        ax.grid(alpha=0.3)
        ax.legend()
    _save(fig, path)


def plot_certified_accuracy(
    patch_sizes: Sequence[int], certified: Sequence[float], smoothed: float, standard: float, title: str,
    path: str | os.PathLike,
) -> None:
    """Certified accuracy against the patch side m, with the smoothed and standard accuracy for reference."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(patch_sizes, certified, "o-", label="certified")
    ax.axhline(smoothed, color="tab:green", linestyle="--", label=f"smoothed ({smoothed:.1%})")
    ax.axhline(standard, color="tab:grey", linestyle=":", label=f"standard ({standard:.1%})")
    ax.set_xlabel("patch side m (pixels)")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1)
    ax.set_xticks(list(patch_sizes))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    _save(fig, path)


def plot_robustness(
    strengths: Sequence[float], accuracy: Sequence[float], path: str | os.PathLike, xlabel: str = "ε", title: str = ""
) -> None:
    """Accuracy against attack strength (ε, or a patch side); pass strength 0 with the clean accuracy."""
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    ax.plot(strengths, accuracy, "o-")
    for s, a in zip(strengths, accuracy):
        ax.annotate(f"{a:.1%}", (s, a), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set(xlabel=xlabel, ylabel="accuracy", ylim=(0, 1.05), title=title)
    ax.grid(alpha=0.3)
    _save(fig, path)


def plot_adversarial_examples(
    clean: Tensor, adversarial: Tensor, titles: Sequence[Sequence[str]], fooled: Sequence[bool],
    path: str | os.PathLike,
) -> None:
    """Seed 002's panda figure, one row per image: the clean image, the perturbation magnified to the
    full range (grey is 0), the adversarial image. titles: three per row; the third turns red where
    the attack fooled the model. Images (N, C, H, W) in [0, 1] (or uint8), C = 1 or 3."""

    def rgb(images: Tensor) -> np.ndarray:
        pixels = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        return pixels.detach().cpu().permute(0, 2, 3, 1).expand(-1, -1, -1, 3).numpy()

    x, x_adv = rgb(clean), rgb(adversarial)
    delta = x_adv - x
    # Each image's perturbation is scaled on its own: ε = 2/255 would otherwise be invisible.
    scale = 0.5 / np.maximum(np.abs(delta).reshape(len(delta), -1).max(1), 1e-12)
    n = len(x)
    fig = Figure(figsize=(6.6, 2.4 * n))
    axes = fig.subplots(n, 3, squeeze=False)
    for i in range(n):
        panels = (x[i], 0.5 + delta[i] * scale[i], x_adv[i])
        for j, (ax, panel) in enumerate(zip(axes[i], panels)):
            ax.imshow(panel.clip(0, 1), interpolation="nearest")
            ax.axis("off")
            ax.set_title(titles[i][j], fontsize=8, color=WRONG if j == 2 and fooled[i] else "black")
    _save(fig, path)
