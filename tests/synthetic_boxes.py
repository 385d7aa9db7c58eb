"""A synthetic box task for tests: a coloured square on dim noise; the class is the colour, the box the square."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

COLOURS = {"red": (255, 40, 40), "green": (40, 255, 40), "blue": (40, 40, 255)}


def square_images(n: int, size: int = 32, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """images (n, size, size, 3) uint8, labels (n,), boxes (n, 4) (cx, cy, w, h) as fractions."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 90, (n, size, size, 3), dtype=np.uint8)
    labels = rng.integers(0, len(COLOURS), n)
    sides = rng.integers(size // 4, size // 2 + 1, n)
    x0 = rng.integers(0, size - sides + 1)
    y0 = rng.integers(0, size - sides + 1)
    colours = np.array(list(COLOURS.values()), dtype=np.uint8)
    for i in range(n):  # test data only: a loop is clearest
        images[i, y0[i] : y0[i] + sides[i], x0[i] : x0[i] + sides[i]] = colours[labels[i]]
    boxes = np.stack([x0 + sides / 2, y0 + sides / 2, sides, sides], axis=1) / size
    return images, labels, boxes.astype(np.float32)


def write_yolo(root: Path, counts: dict[str, int] | None = None, size: int = 32, seed: int = 0) -> Path:
    """root/data.yaml and root/{train,valid,test}/{images,labels} of the square task (lossless PNGs)."""
    counts = counts or {"train": 240, "valid": 60, "test": 60}
    root.mkdir(parents=True, exist_ok=True)
    (root / "data.yaml").write_text(f"names: [{', '.join(COLOURS)}]\nnc: {len(COLOURS)}\n")
    for s, (split, n) in enumerate(counts.items()):
        images, labels, boxes = square_images(n, size, seed + 1000 * s)
        (root / split / "images").mkdir(parents=True)
        (root / split / "labels").mkdir(parents=True)
        for i in range(n):
            Image.fromarray(images[i]).save(root / split / "images" / f"{i:04d}.png")
            line = f"{labels[i]} " + " ".join(f"{v:.6f}" for v in boxes[i])
            (root / split / "labels" / f"{i:04d}.txt").write_text(line + "\n")
    return root
