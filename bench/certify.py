"""Certification throughput: a smoothed ViT with token dropping against the same model fed full-length
masked images (column ablations of width 4: 32 per 32×32 image), same machine, one run.

With a checkpoint, its test images are certified (and the two modes' certified accuracy reported);
without one, a ViT of the chosen preset with random weights certifies random images: throughput does
not depend on the weights.

    PYTHONPATH=src python bench/certify.py --checkpoint runs/c10-col4 --images 1000
    PYTHONPATH=src python bench/certify.py --model vit_tiny_32 --images 10000 --device cuda --bf16 --full-images 1000
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from common import RESULTS, device_and_sync, environment, save_report
from vitkit.data import ImageDataset, load_dataset
from vitkit.models import create_model, num_parameters
from vitkit.smoothing import Ablation, SmoothedClassifier, certification_report, collect_votes
from vitkit.train import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", help="a trained run or .safetensors (default: a random-weight preset)")
    parser.add_argument("--model", default="vit_tiny_32", help="preset when no checkpoint is given")
    parser.add_argument("--data", help="data of the checkpoint (default: the one it was trained on)")
    parser.add_argument("--images", type=int, default=1000, help="images certified with token dropping")
    parser.add_argument("--full-images", type=int, default=0,
                        help="images certified with full-length inputs (default: as many; fewer saves time on a slow run)")
    parser.add_argument("--ablation-size", type=int, help="column width b (default: as trained, else 4)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--max-batch", type=int, default=8192)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (CUDA, or a CPU with native bfloat16)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the base model")
    parser.add_argument("--out", help="JSON path (default bench/results/certify-<device>.json)")
    args = parser.parse_args()

    device, sync = device_and_sync(args.device)
    torch.manual_seed(0)
    if args.checkpoint:
        model, info = load_model(args.checkpoint, device)
        data = load_dataset(args.data or info["data"], "test", image_size=model.cfg.image_size)
        data = data.subset(torch.randperm(len(data))[: args.images])
        mean, std = info["mean"], info["std"]
    else:
        model = create_model(args.model).to(device).eval()
        torch.nn.init.normal_(model.head.weight, std=0.02)
        size = model.cfg.image_size
        images = torch.randint(0, 256, (args.images, 3, size, size), dtype=torch.uint8)
        data = ImageDataset(images, torch.randint(0, 10, (args.images,)), [str(c) for c in range(10)], "random")
        mean, std = (0.5,) * 3, (0.25,) * 3
    base = torch.compile(model, dynamic=True) if args.compile else model
    trained = (info.get("ablation") or {}) if args.checkpoint else {}
    ablation = Ablation("column", args.ablation_size or trained.get("size", 4), tuple(data.image_size))
    report: dict = {
        "benchmark": "certification throughput",
        **environment(device),
        "model": model.cfg.to_dict(),
        "parameters": num_parameters(model),
        "checkpoint": args.checkpoint,
        "ablation": ablation.to_dict(),
        "ablations_per_image": ablation.num_ablations,
        "bf16": args.bf16,
        "compile": args.compile,
    }
    for mode, drop in (("token_dropping", True), ("full_images", False)):
        n = len(data) if drop or not args.full_images else min(args.full_images, len(data))
        subset = data.subset(torch.arange(n))
        smoothed = SmoothedClassifier(base, ablation, mean=mean, std=std, drop_tokens=drop, max_batch=args.max_batch)
        collect_votes(smoothed, subset.subset(torch.arange(min(n, args.batch_size))), device, args.batch_size,
                      progress=False, bf16=args.bf16)  # warm-up: allocator, kernels, compilation
        sync()
        start = time.perf_counter()
        votes = collect_votes(smoothed, subset, device, args.batch_size, progress=False, bf16=args.bf16)
        sync()
        seconds = time.perf_counter() - start
        row = {"images": n, "seconds": round(seconds, 3), "images_per_second": round(n / seconds, 1),
               "ablated_images_per_second": round(n * ablation.num_ablations / seconds, 1)}
        if args.checkpoint:
            figures = certification_report(votes, [5], 5)
            row.update({k: figures[k] for k in ("standard_accuracy", "smoothed_accuracy", "certified_accuracy")})
        report[mode] = row
        print(f"{mode:15s} {row['images_per_second']:9.1f} images/s ({row['ablated_images_per_second']:.0f} ablated "
              f"images/s), {n} images in {seconds:.2f} s")
    speedup = report["token_dropping"]["images_per_second"] / report["full_images"]["images_per_second"]
    report["speedup"] = round(speedup, 2)
    report["seconds_for_10000_images"] = round(10000 / report["token_dropping"]["images_per_second"], 2)
    print(f"token dropping: {speedup:.2f}x the full-length throughput; 10,000 images would take "
          f"{report['seconds_for_10000_images']:.1f} s")
    save_report(report, Path(args.out) if args.out else RESULTS / f"certify-{device.type}.json")


if __name__ == "__main__":
    main()
