"""Training and inference throughput of vitkit's ViT against timm's at the same configuration.

ViT-Ti body (dim 192, depth 12, 3 heads, MLP 768) on 32×32 images with 4×4 patches, 10 classes,
class-token pooling. Both models run in this one process on the same device-resident batch; the
timed steps alternate between the two models (vitkit, timm, vitkit, ...) so that drifts in clock
speed or background load hit both alike, and the median step time is reported.

    PYTHONPATH=src python bench/throughput.py --steps 10
    PYTHONPATH=src python bench/throughput.py --device cuda --bf16 --compile

With `--data` (CIFAR-10: `cifar10` or the JPEG copy's .tar.gz) it also times whole training steps with
their input pipelines, as a user runs them: vitkit's device-resident loader with its batched on-device
augmentation (crop with 4-pixel padding, flip) against timm's model fed by a torchvision DataLoader with
the same augmentation as per-image PIL transforms in worker processes (pinned memory, non-blocking copies).

    PYTHONPATH=src python bench/throughput.py --device cuda --bf16 --compile --batch-size 512 \
        --data ../shared/datasets/cifar10-jpg.tar.gz --workers 8
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer as TimmViT
from torch import nn

from common import RESULTS, device_and_sync, environment, save_report
from vitkit.models import ViTConfig, VisionTransformer, num_parameters

IMAGE, PATCH, CLASSES, DIM, DEPTH, HEADS, MLP = 32, 4, 10, 192, 12, 3, 768


def build_models(device: torch.device) -> dict[str, nn.Module]:
    ours = VisionTransformer(
        ViTConfig(image_size=IMAGE, patch_size=PATCH, num_classes=CLASSES, dim=DIM, depth=DEPTH, heads=HEADS, mlp_dim=MLP)
    )
    theirs = TimmViT(
        img_size=IMAGE, patch_size=PATCH, in_chans=3, num_classes=CLASSES, embed_dim=DIM, depth=DEPTH,
        num_heads=HEADS, mlp_ratio=MLP / DIM, qkv_bias=True, class_token=True, global_pool="token",
    )
    assert num_parameters(ours) == num_parameters(theirs), (num_parameters(ours), num_parameters(theirs))
    # Same weights as well, so equal outputs prove both compute the same function, not just the same shapes.
    torch.nn.init.normal_(ours.head.weight)  # with the zero-initialised head any two models would agree
    state = ours.state_dict()
    state["patch_embed.proj.weight"] = state["patch_embed.proj.weight"].reshape(DIM, 3, PATCH, PATCH)
    theirs.load_state_dict(state)
    x = torch.randn(2, 3, IMAGE, IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), theirs.eval()(x), rtol=1e-4, atol=1e-4)
    return {"vitkit": ours.to(device), "timm": theirs.to(device)}


def make_steps(model: nn.Module, x: torch.Tensor, y: torch.Tensor, bf16: bool, compile: bool) -> dict[str, Callable]:
    """One training step (forward, cross-entropy, backward, AdamW) and one inference forward."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    forward = torch.compile(model) if compile else model
    autocast = (lambda: torch.autocast(x.device.type, dtype=torch.bfloat16)) if bf16 else nullcontext

    def train() -> None:
        model.train()
        with autocast():
            loss = F.cross_entropy(forward(x), y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def infer() -> None:
        model.eval()
        with torch.inference_mode(), autocast():
            forward(x)

    return {"train": train, "inference": infer}


def time_alternating(steps: dict[str, Callable], repeats: int, warmup: int, sync: Callable) -> dict[str, float]:
    """Median seconds per call of each function, the calls interleaved round-robin."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    sync()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            sync()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def time_pipelines(models: dict[str, nn.Module], args: argparse.Namespace, device: torch.device, sync: Callable) -> dict:
    """Images/s of `args.steps` training steps, each model with its own input pipeline, after warm-up steps."""
    import torchvision.transforms as T
    from torch.utils.data import DataLoader, Dataset

    from vitkit.data import Augment, AugmentConfig, DeviceLoader, channel_stats, load_dataset

    data = load_dataset(args.data, "train")
    mean, std = channel_stats(data)

    class Pil(Dataset):  # what a torchvision user has: one PIL image per item, transformed in a worker
        transform = T.Compose([T.RandomCrop(IMAGE, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)])

        def __len__(self) -> int:
            return len(data)

        def __getitem__(self, i: int):
            return self.transform(T.functional.to_pil_image(data.images[i])), int(data.labels[i])

    loaders = {
        "vitkit": DeviceLoader(data, args.batch_size, mean=mean, std=std, device=device, shuffle=True, drop_last=True,
                               augment=Augment(AugmentConfig(hflip=0.5, crop_padding=4), CLASSES)),
        "timm": DataLoader(Pil(), args.batch_size, shuffle=True, drop_last=True, num_workers=args.workers,
                           pin_memory=device.type == "cuda", persistent_workers=args.workers > 0),
    }
    results = {}
    for name, model in models.items():
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        forward = torch.compile(model) if args.compile else model
        autocast = (lambda: torch.autocast(device.type, dtype=torch.bfloat16)) if args.bf16 else nullcontext
        model.train()
        batches = iter(loaders[name])
        for step in range(args.warmup + args.steps):
            if step == args.warmup:
                sync()
                start = time.perf_counter()
            try:
                x, y = next(batches)
            except StopIteration:
                batches = iter(loaders[name])
                x, y = next(batches)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast():
                loss = F.cross_entropy(forward(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        sync()
        results[name] = args.steps * args.batch_size / (time.perf_counter() - start)
    print(f"with input pipelines: vitkit {results['vitkit']:.0f} img/s, timm + torchvision DataLoader "
          f"({args.workers} workers) {results['timm']:.0f} img/s, ratio {results['vitkit'] / results['timm']:.2f}")
    return {"train_images_per_s": results, "ratio_vitkit_over_timm": results["vitkit"] / results["timm"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: cuda if available)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per model and mode")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation, allocator, caches)")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (meant for GPUs)")
    parser.add_argument("--compile", action="store_true", help="torch.compile both models")
    parser.add_argument("--data", help="also time training with input pipelines on this CIFAR-10 source")
    parser.add_argument("--workers", type=int, default=8, help="torchvision DataLoader worker processes (with --data)")
    parser.add_argument("--out", type=Path, help="JSON results (default bench/results/throughput-<device>.json)")
    args = parser.parse_args()

    device, sync = device_and_sync(args.device)
    torch.manual_seed(0)
    models = build_models(device)
    x = torch.randn(args.batch_size, 3, IMAGE, IMAGE, device=device)
    y = torch.randint(0, CLASSES, (args.batch_size,), device=device)

    steps = {name: make_steps(m, x, y, args.bf16, args.compile) for name, m in models.items()}
    medians = {
        mode: time_alternating({name: s[mode] for name, s in steps.items()}, args.steps, args.warmup, sync)
        for mode in ("train", "inference")
    }

    results = {
        name: {
            f"{mode}_images_per_s": args.batch_size / medians[mode][name] for mode in medians
        } | {f"{mode}_step_ms": 1e3 * medians[mode][name] for mode in medians}
        for name in models
    }
    ratio = {mode: medians[mode]["timm"] / medians[mode]["vitkit"] for mode in medians}

    env = environment(device)
    device_name = env["device_name"]
    print(f"{device_name}, batch {args.batch_size}, {args.steps} steps, bf16={args.bf16}, compile={args.compile}")
    print(f"{'model':<8} {'train img/s':>12} {'infer img/s':>12}")
    for name, r in results.items():
        print(f"{name:<8} {r['train_images_per_s']:>12.1f} {r['inference_images_per_s']:>12.1f}")
    print(f"{'ratio':<8} {ratio['train']:>12.3f} {ratio['inference']:>12.3f}   (vitkit / timm)")

    report = {
        **env,
        "settings": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
        | {"model": dict(image_size=IMAGE, patch_size=PATCH, num_classes=CLASSES, dim=DIM, depth=DEPTH,
                         heads=HEADS, mlp_dim=MLP, pool="cls", parameters=num_parameters(models["vitkit"]))},
        "results": results,
        "ratio_vitkit_over_timm": ratio,
    }
    if args.data:
        report["with_input_pipelines"] = time_pipelines(models, args, device, sync)
    save_report(report, args.out or RESULTS / f"throughput-{device.type}.json")


if __name__ == "__main__":
    main()
