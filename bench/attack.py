"""What a PGD-10 attack costs beyond the model's own forward and backward passes.

Three loops on the same batch and model (the 0.3M-parameter CIFAR ViT of the README: 32/4, width 96,
4 blocks), timed interleaved so drifts in clock speed or background load hit all alike, median of
the repeats:
    pgd      vitkit.attacks.pgd, 10 steps, ℓ∞ ε = 8/255, random start (keyed noise, projections, mode switch)
    bare     10 × (forward, cross-entropy, gradient to the input only): the floor for any 10-step attack
    params   10 × (forward, cross-entropy, backward to the parameters), a training step's gradient work

    PYTHONPATH=src OMP_NUM_THREADS=1 python bench/attack.py
    PYTHONPATH=src python bench/attack.py --device cuda --batch-size 512
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from common import RESULTS, device_and_sync, environment, save_report
from vitkit.attacks import PixelModel, pgd
from vitkit.models import ViTConfig, VisionTransformer, num_parameters

SHAPE = dict(image_size=32, patch_size=4, num_classes=10, dim=96, depth=4, heads=3, mlp_dim=192)
STEPS, EPS = 10, 8 / 255


def loops(model: PixelModel, x: torch.Tensor, y: torch.Tensor) -> dict[str, Callable[[], None]]:
    def attack() -> None:
        pgd(model, x, y, EPS, steps=STEPS)

    def bare() -> None:
        for _ in range(STEPS):
            xi = x.detach().requires_grad_(True)
            torch.autograd.grad(F.cross_entropy(model(xi), y), xi)

    def params() -> None:
        for _ in range(STEPS):
            F.cross_entropy(model(x), y).backward()
        model.zero_grad(set_to_none=True)

    return {"pgd": attack, "bare": bare, "params": params}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each loop")
    parser.add_argument("--out", type=Path, help="JSON results (default bench/results/attack-<device>.json)")
    args = parser.parse_args()

    device, sync = device_and_sync(args.device)
    torch.manual_seed(0)
    vit = VisionTransformer(ViTConfig(**SHAPE))
    torch.nn.init.normal_(vit.head.weight, std=0.02)  # a zero head would give every image zero gradient
    model = PixelModel(vit.to(device), (0.49, 0.48, 0.45), (0.25, 0.24, 0.26)).eval()
    x = torch.rand(args.batch_size, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (args.batch_size,), device=device)

    steps = loops(model, x, y)
    for step in steps.values():  # warm-up: allocator, caches
        step()
    sync()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    results = {name: {"images_per_s": args.batch_size / t, "seconds_per_batch": t} for name, t in median.items()}
    overhead = median["pgd"] / median["bare"]

    env = environment(device)
    print(f"{env['device_name']}, {env['machine']['torch_threads']} threads, batch {args.batch_size}, "
          f"PGD-{STEPS}, {num_parameters(vit) / 1e6:.2f}M-parameter ViT")
    print(f"{'loop':<8} {'images/s':>9} {'s/batch':>8}")
    for name, r in results.items():
        print(f"{name:<8} {r['images_per_s']:>9.1f} {r['seconds_per_batch']:>8.3f}")
    print(f"pgd / bare = {overhead:.3f}")

    report = {
        **env,
        "settings": {"batch_size": args.batch_size, "repeats": args.repeats, "steps": STEPS, "eps": EPS,
                     "model": {**SHAPE, "parameters": num_parameters(vit)}},
        "results": results,
        "pgd_over_bare": overhead,
    }
    save_report(report, args.out or RESULTS / f"attack-{device.type}.json")


if __name__ == "__main__":
    main()
