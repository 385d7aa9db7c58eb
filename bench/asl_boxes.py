"""ASL letters (seed 001): class accuracy and box IoU of the classification + box head, one variant per call.

A variant is the base configuration below with `--set` overrides, trained by `vitkit.train.boxes` into
RUNS/NAME. The JSON (--out) keeps one entry per variant name, so variants measured in separate calls (or side by
side, one thread each) gather in one file. A finished run folder whose configuration equals the requested one is
reported again rather than retrained (the entry says so). Besides the run's validation and test figures, the
best checkpoint is scored on the unaugmented training images (without a box scale): a small gap between the two says the model
generalises as well as it fits, a large one that it memorises. With a box scale (`--set box_scale=auto`), the
validation and test figures without it are recorded too, and the cross-fitted validation figures with it. With
`--set flip_tta=true`, so are the validation and test figures of the single view (no mirror averaging, same scale).

Base: the DeiT-Ti weights, no frozen blocks, AdamW at 3e-4 with a 1-epoch warmup then cosine, 24 epochs of batch 32
at 112 px, box-safe crops (area 0.6-1.0) and colour jitter 0.2, MSE with C balanced at the start, the best epoch by
validation IoU.

    PYTHONPATH=src python bench/asl_boxes.py --name mse-112 --device cpu
    ... --name smooth-l1-224 --set image_size=224 --set box_loss=smooth_l1 --set epochs=30
    ... --name zoom-224 --set image_size=224 --set zoom=1.2 --seeds 0 1 2 3 --jobs 4   # seeds side by side on a GPU

With --class-from RUN_NAME the variant is a class stage (`vitkit train-boxes --class-from`) on the finished run
RUNS/RUN_NAME (with --seeds, on RUN_NAME-seedN for each seed): its configuration is that run's, with the stage's
defaults and the `--set` overrides, and the base above does not apply.

    ... --name own-c20-class-stage --class-from asl224-zoom1.2-src448-own-c20 --seeds 0 1 --jobs 2

With --seeds, the variant is trained once per seed (entries NAME-seedN), in child processes --jobs at a time, and
`seed_means` in the JSON gets NAME's mean and standard deviation over the seeds. A run folder left unfinished (a
call stopped by a time limit) is resumed when the same command runs again.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from common import RESULTS, device_and_sync, environment, parse_sets, run_children, save_report, stored_config_equals
from vitkit.train.boxes import (
    BoxTrainConfig, class_stage_config, evaluate_box_model, load_box_model, prepare_box_data, train_boxes,
)

BASE = dict(
    backbone="vit", freeze_blocks=0, image_size=112, lr=3e-4, epochs=24, batch_size=32, warmup_epochs=1,
    box_loss="mse", loss_balance="auto", crop_scale=[0.6, 1.0], brightness=0.2, contrast=0.2, saturation=0.2,
    select_by="iou",
)
KEPT = ("best_epoch", "train_seconds_this_session", "train_images_per_second", "loss_balance", "parameters",
        "trainable_parameters", "val_accuracy", "val_iou_mean", "val_iou50", "val_iou75", "val_iou90", "test_accuracy",
        "test_iou_mean", "test_iou50", "test_iou75", "test_iou90", "box_scale", "val_cross_fitted_iou_mean",
        "val_cross_fitted_iou50", "val_cross_fitted_iou75", "val_cross_fitted_iou90")


AVERAGED = ("val_accuracy", "val_iou_mean", "val_iou90", "val_cross_fitted_iou_mean", "val_cross_fitted_iou90",
            "test_accuracy", "test_iou_mean", "test_iou90")


def score_variant(args: argparse.Namespace, device, name: str) -> dict:
    """Train (or resume, or take the finished run of) the variant into RUNS/name and score it: its JSON entry."""
    overrides = parse_sets(args.set)
    if args.class_from:
        cfg = class_stage_config({"class_from": str(args.runs / args.class_from), "device": str(device), **overrides})
    else:
        cfg = BoxTrainConfig(**{**BASE, "data": args.data, "pretrained": args.pretrained, "device": str(device),
                                **overrides})
    run = args.runs / name
    if (run / "config.json").is_file() and not stored_config_equals(run, cfg):
        raise SystemExit(f"{run} holds a run of another configuration: pass another --name or --runs")
    reused = (run / "summary.json").is_file()
    if reused:
        summary = json.loads((run / "summary.json").read_text())
    else:
        summary = train_boxes(cfg, run, resume=(run / "state.pt").is_file(), progress=False)

    start = time.perf_counter()
    model, info = load_box_model(run, device)
    data = prepare_box_data(cfg)
    scale, model.box_scale = model.box_scale, 1.0  # the boxes as trained: the training labels' sizes
    fit = evaluate_box_model(model, info, data.train, "train", device, cfg.eval_batch_size, cfg.bf16)

    def score_val_and_test(suffix: str, with_accuracy: bool) -> dict:
        """The model's validation and test IoU figures (and accuracy if asked), each key ending in _suffix."""
        figures = {}
        for split, part in (("val", data.val), ("test", data.test)):
            if part is None:
                continue
            scored = evaluate_box_model(model, info, part, split, device, cfg.eval_batch_size, cfg.bf16)
            figures.update({f"{k}_{suffix}": v for k, v in scored.items()
                            if "iou" in k or (with_accuracy and k.endswith("accuracy"))})
        return figures

    unscaled = score_val_and_test("without_box_scale", with_accuracy=False) if scale != 1 else {}
    model.box_scale = scale
    single_view = {}
    if model.flip_tta:
        model.flip_tta = False
        single_view = score_val_and_test("without_flip_tta", with_accuracy=True)
    print(f"{name}: val accuracy {summary.get('val_accuracy', float('nan')):.4f}, IoU ≥ 0.5/0.75/0.9 "
          f"{summary.get('val_iou50', float('nan')):.3f} / {summary.get('val_iou75', float('nan')):.3f} / "
          f"{summary.get('val_iou90', float('nan')):.3f}; training images (unaugmented) mean IoU "
          f"{fit['train_iou_mean']:.3f} ({time.perf_counter() - start:.0f} s to score them)")
    return {
        **environment(device),
        "overrides": overrides,
        "from_existing_run": reused,
        **{k: summary[k] for k in KEPT if k in summary},
        **{k: v for k, v in fit.items() if k.startswith(("train_accuracy", "train_iou"))},
        **unscaled,
        **single_view,
        "config": cfg.to_dict(),
    }


def score_seeds(args: argparse.Namespace) -> dict[str, dict]:
    """The entries of NAME-seedN for each seed, each trained and scored by a child process of this script."""
    names = [f"{args.name}-seed{seed}" for seed in args.seeds]
    with tempfile.TemporaryDirectory() as tmp:
        outs = [Path(tmp) / f"{name}.json" for name in names]
        run_children([
            [sys.executable, __file__, "--name", name, "--data", args.data, "--pretrained", args.pretrained,
             "--device", args.device, "--runs", str(args.runs), "--out", str(out),
             *sum((["--set", s] for s in args.set), []), "--set", f"seed={seed}",
             *(["--class-from", f"{args.class_from}-seed{seed}"] if args.class_from else [])]
            for name, seed, out in zip(names, args.seeds, outs)
        ], jobs=args.jobs)
        return {name: json.loads(out.read_text())["variants"][name] for name, out in zip(names, outs)}


def seed_means(entries: dict[str, dict]) -> dict:
    """Mean and standard deviation over the seeds' entries of each figure they all have."""
    figures = {"runs": list(entries)}
    for key in AVERAGED:
        values = [e[key] for e in entries.values() if key in e]
        if len(values) == len(entries):
            figures[f"{key}_mean"] = statistics.mean(values)
            figures[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return figures


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="the variant's name: its run folder and its key in the JSON")
    parser.add_argument("--data", default="../shared/datasets/asl-letters.tar.gz")
    parser.add_argument("--pretrained", default="../shared/weights/deit_tiny_patch16_224.safetensors")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a base option")
    parser.add_argument("--seeds", type=int, nargs="+", help="train the variant once per seed, as NAME-seedN, and "
                                                              "record the mean over the seeds")
    parser.add_argument("--class-from", metavar="RUN_NAME", help="a class stage on the finished run RUNS/RUN_NAME "
                                                               "(RUN_NAME-seedN with --seeds)")
    parser.add_argument("--jobs", type=int, default=1, help="with --seeds: runs side by side on the device")
    parser.add_argument("--runs", type=Path, default=Path("runs/asl-boxes"), help="run folders")
    parser.add_argument("--out", type=Path, help="JSON (default bench/results/asl-boxes-<device>.json)")
    args = parser.parse_args()

    if args.seeds and len(set(args.seeds)) < len(args.seeds):
        raise SystemExit(f"--seeds {' '.join(map(str, args.seeds))} repeats a seed: each seed trains one run folder")
    device, _ = device_and_sync(args.device)
    entries = score_seeds(args) if args.seeds else {args.name: score_variant(args, device, args.name)}
    out = args.out or RESULTS / f"asl-boxes-{device.type}.json"
    report = json.loads(out.read_text()) if out.is_file() else {"base": BASE, "variants": {}}
    report["variants"].update(entries)
    if args.seeds:
        means = report.setdefault("seed_means", {})[args.name] = seed_means(entries)
        print(f"{args.name}, {len(entries)} seeds: " + ", ".join(
            f"{k[:-5]} {means[k]:.4f} ± {means[k[:-5] + '_std']:.4f}" for k in means if k.endswith("_mean")))
    save_report(report, out)


if __name__ == "__main__":
    main()
