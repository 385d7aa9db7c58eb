"""What standalone Auto-PGD costs once fooled images leave the batch: model passes against a full-batch run.

APGD fixes an image's result at its first misclassified point, so from then on the image is not run through the
model again. This script attacks a seeded sample of the CIFAR-10 test set with APGD-CE (100 steps, ℓ∞ 8/255) on
the robustness bench's models (`bench/robustness.py` trains them into RUNS/NAME) and counts the images the model
sees: a run that kept every image to the end would pass (steps + 1) × N of them. Seconds are wall time.

    PYTHONPATH=src OMP_NUM_THREADS=2 python bench/apgd_cost.py --device cpu
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from torch import nn

from common import RESULTS, device_and_sync, environment, save_report
from vitkit.attacks import apgd, load_pixel_model
from vitkit.data import load_dataset


class Counting(nn.Module):
    """The model, counting the images it is run on."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.images = model, 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += len(x)
        return self.model(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", default="standard,half-half", help="comma-separated run names under --runs")
    parser.add_argument("--runs", type=Path, default=Path("runs/robustness"))
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--eps", type=float, default=8 / 255)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, help="JSON (default bench/results/apgd-cost-<device>.json)")
    args = parser.parse_args()

    device, sync = device_and_sync(args.device)
    rows = {}
    for name in args.rows.split(","):
        model, info = load_pixel_model(args.runs / name, device)
        data = load_dataset(info["data"], "test", image_size=info["model"]["image_size"]).sample(args.images, 0)
        x, y = data.images.to(device).float() / 255, data.labels.to(device)
        counting = Counting(model)
        sync()
        start = time.perf_counter()
        adversarial = apgd(counting, x, y, args.eps, steps=args.steps, loss="ce", generator=torch.Generator().manual_seed(0))
        sync()
        seconds = time.perf_counter() - start
        with torch.no_grad():
            clean = (model(x).argmax(1) == y).float().mean().item()
            robust = (model(adversarial).argmax(1) == y).float().mean().item()
        full = (args.steps + 1) * len(x)
        rows[name] = {"clean_accuracy": clean, "robust_accuracy": robust, "seconds": round(seconds, 2),
                      "model_images": counting.images, "full_batch_model_images": full,
                      "share_of_full_batch": round(counting.images / full, 4)}
        print(f"{name:>12s}  clean {clean:.3f}  APGD-CE robust {robust:.3f}  {seconds:.1f} s  model passes "
              f"{counting.images:,} of {full:,} ({counting.images / full:.1%})")
    out = args.out or RESULTS / f"apgd-cost-{device.type}.json"
    save_report({**environment(device), "settings": {"images": args.images, "steps": args.steps, "eps": args.eps,
                                                     "loss": "ce", "norm": "linf"}, "rows": rows}, out)


if __name__ == "__main__":
    main()
