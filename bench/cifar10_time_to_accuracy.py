"""Wall time to 90 / 93 / 94% CIFAR-10 test accuracy of a training recipe, over several seeds.

Each seed is a normal `vitkit train --recipe ...` run; after every epoch a callback measures test
accuracy (as the recipe scores it, e.g. with its test-time flip), outside the timed training. The
training time to a target is the summed time of the epochs up to the first one that reaches it,
torch.compile's first-epoch compilation included; data loading (a cached decode) is reported apart.

    PYTHONPATH=src python bench/cifar10_time_to_accuracy.py --data ../shared/datasets/cifar10-jpg.tar.gz --seeds 0 1 2
    ... --set epochs=20 --set lr=3e-3          # explore a variant of the recipe
    ... --seeds 0 1 2 --jobs 3                 # seeds side by side on one GPU: accuracies, upper-bound times

With --jobs > 1 the seeds run as concurrent processes sharing the device, so their times are upper
bounds of what one run alone takes; the JSON says how many ran at once.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, device_and_sync, environment, parse_sets, run_children, save_report
from vitkit.train import build_config
from vitkit.train.evaluate import classification_metrics, predict_dataset
from vitkit.train.trainer import Trainer


def run_seed(args: argparse.Namespace, seed: int) -> dict:
    cfg = build_config(args.recipe, flag_values={
        "data": args.data, "device": args.device, "seed": seed, **parse_sets(args.set),
    })
    start = time.perf_counter()
    trainer = Trainer(cfg, args.runs / f"{args.recipe}-seed{seed}", progress=False)
    setup_seconds = time.perf_counter() - start
    curve: list[dict] = []
    train_seconds = 0.0

    def measure(t: Trainer, row: dict) -> None:
        nonlocal train_seconds
        train_seconds += row["epoch_seconds"]
        logits, labels = predict_dataset(
            t.scored(t.evaluation_model()), t.data.test, t.data.mean, t.data.std, t.device, cfg.eval_batch_size, cfg.bf16
        )
        accuracy = classification_metrics(logits, labels, t.data.test.classes)["accuracy"]
        curve.append({"epoch": row["epoch"], "train_seconds": round(train_seconds, 2), "test_accuracy": accuracy,
                      "train_loss": row["train_loss"], "images_per_second": round(row["images_per_second"], 1)})
        print(f"seed {seed} epoch {row['epoch']:>3}  {train_seconds:7.1f} s  test {accuracy:.4f}", flush=True)

    summary = trainer.fit(on_epoch=measure)
    reached = {
        f"{target:.2f}": next((p["train_seconds"] for p in curve if p["test_accuracy"] >= target), None)
        for target in args.targets
    }
    return {
        "seed": seed,
        "test_accuracy": summary["test_accuracy"],
        "train_seconds": round(train_seconds, 2),
        "setup_seconds": round(setup_seconds, 2),
        "seconds_to": reached,
        "parameters": summary["parameters"],
        "curve": curve,
        "config": cfg.to_dict(),
    }


def run_concurrently(args: argparse.Namespace) -> list[dict]:
    """One child process per seed, all at once; each writes its run to a temporary JSON file."""
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"seed{seed}.json" for seed in args.seeds]
        run_children([
            [sys.executable, __file__, "--recipe", args.recipe, "--data", args.data, "--device", args.device,
             "--runs", str(args.runs), "--seeds", str(seed), "--child-out", str(out),
             "--targets", *map(str, args.targets), *sum((["--set", s] for s in args.set), [])]
            for seed, out in zip(args.seeds, outs)
        ], jobs=len(args.seeds))
        return [json.loads(out.read_text())[0] for out in outs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="cifar10-fast")
    parser.add_argument("--data", default="cifar10", help="cifar10 (official archive) or the JPEG copy's .tar.gz")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe option")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.90, 0.93, 0.94])
    parser.add_argument("--jobs", type=int, default=1, help="seeds run side by side (times become upper bounds)")
    parser.add_argument("--runs", type=Path, default=Path("runs/time-to-accuracy"), help="run folders")
    parser.add_argument("--out", type=Path, help="JSON (default bench/results/cifar10-time-to-accuracy-<device>.json)")
    parser.add_argument("--child-out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.child_out:
        args.child_out.write_text(json.dumps([run_seed(args, args.seeds[0])]))
        return
    device, _ = device_and_sync(args.device)
    runs = run_concurrently(args) if args.jobs > 1 and len(args.seeds) > 1 else [run_seed(args, s) for s in args.seeds]

    accuracies = [r["test_accuracy"] for r in runs]
    seconds = [r["train_seconds"] for r in runs]
    spread = lambda xs: statistics.stdev(xs) if len(xs) > 1 else 0.0  # noqa: E731
    print(f"\n{args.recipe} on {args.data}: {len(runs)} seed(s), {'concurrently' if args.jobs > 1 else 'one at a time'}")
    print(f"test accuracy {statistics.mean(accuracies):.4f} ± {spread(accuracies):.4f} (min {min(accuracies):.4f})")
    print(f"training time {statistics.mean(seconds):.1f} ± {spread(seconds):.1f} s")
    for target in args.targets:
        times = [r["seconds_to"][f"{target:.2f}"] for r in runs]
        shown = ", ".join("not reached" if t is None else f"{t:.1f} s" for t in times)
        print(f"  to {target:.0%}: {shown}")
    report = {
        **environment(device),
        "recipe": args.recipe,
        "data": args.data,
        "overrides": parse_sets(args.set),
        "concurrent_runs": min(args.jobs, len(args.seeds)),
        "test_accuracy_mean": statistics.mean(accuracies),
        "test_accuracy_std": spread(accuracies),
        "train_seconds_mean": statistics.mean(seconds),
        "runs": runs,
    }
    save_report(report, args.out or RESULTS / f"cifar10-time-to-accuracy-{device.type}.json")


if __name__ == "__main__":
    main()
