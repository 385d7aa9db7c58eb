"""Certified patch robustness of a training recipe: train the base model on ablations, then certify the
whole test set (standard, smoothed and certified accuracy for every patch size m from one pass of votes).

One variant per call (`--name`, a recipe plus `--set` overrides), trained into RUNS/NAME. The JSON keeps one
entry per name. A run folder that already holds this exact configuration is resumed, or reported as it is if
finished; votes already saved by `vitkit certify` for its checkpoint, over the whole test set with the
training ablation, are re-read rather than recomputed (the entry says which).

    PYTHONPATH=src python bench/certified_accuracy.py --name smoothing --recipe cifar10-smoothing \\
        --data ../shared/datasets/cifar10-jpg.tar.gz --device cuda --bf16
    ... --name deit32 --recipe cifar10-smoothing-deit --set pretrained=../shared/weights/deit_tiny_patch16_224.safetensors
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from common import RESULTS, device_and_sync, environment, parse_sets, save_report, train_run
from vitkit.data import load_dataset
from vitkit.smoothing import Ablation, SmoothedClassifier, Votes, certification_report, collect_votes, parse_patch_sizes
from vitkit.train import build_config, load_model, read_info


def saved_votes(path: Path, run: Path, ablation: dict, images: int, bf16: bool) -> Votes | None:
    """The votes `vitkit certify` saved for this run's checkpoint, if they cover the whole test set with the
    training ablation, in the same precision, and are newer than the checkpoint."""
    if not path.is_file() or path.stat().st_mtime < (run / "best.safetensors").stat().st_mtime:
        return None
    votes = Votes.load(path)
    same = (votes.ablation.kind, votes.ablation.size, votes.ablation.stride) == (
        ablation["kind"], ablation["size"], ablation.get("stride", 1))
    whole = votes.info.get("split") == "test" and len(votes.labels) == images and votes.info.get("rule") == "top"
    precision = bool(votes.info.get("bf16")) == bf16  # votes from before the key were float32
    return votes if same and whole and precision and Path(votes.info.get("checkpoint", "")) == run else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--name", required=True, help="the variant's name: its run folder and its key in the JSON")
    parser.add_argument("--recipe", default="cifar10-smoothing")
    parser.add_argument("--data", default="cifar10", help="cifar10 (official archive) or the JPEG copy's .tar.gz")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a recipe option")
    parser.add_argument("--patch-size", type=int, default=5, help="the main patch size m (seed 000: 5)")
    parser.add_argument("--patch-sizes", default="1-10", help="every m to report")
    parser.add_argument("--bf16", action="store_true", help="certify under bfloat16 autocast (CUDA, or a CPU with native bfloat16)")
    parser.add_argument("--batch-size", type=int, default=256, help="images per certification batch")
    parser.add_argument("--runs", type=Path, default=Path("runs/certified"), help="run folders")
    parser.add_argument("--out", type=Path, help="JSON (default bench/results/certified-accuracy-<device>.json)")
    args = parser.parse_args()

    device, _ = device_and_sync(args.device)
    overrides = parse_sets(args.set)
    cfg = build_config(args.recipe, flag_values={"data": args.data, "device": str(device), **overrides})
    if not cfg.ablation:
        raise SystemExit(f"recipe {args.recipe} does not train on ablations: pick one that does or --set ablation=column")
    run = args.runs / args.name
    summary, history, finished = train_run(cfg, run)

    info = read_info(run)  # the model is loaded only when its votes are not saved yet
    data = load_dataset(info["data"], "test", image_size=info["model"]["image_size"])
    trained = info["ablation"]
    votes_path = run / "certify" / "votes.safetensors"
    votes = saved_votes(votes_path, run, trained, len(data), args.bf16)
    certification: dict = {"from_saved_votes": votes is not None}
    if votes is None:
        model, _ = load_model(run, device)
        ablation = Ablation(trained["kind"], trained["size"], tuple(data.image_size), trained.get("stride", 1))
        smoothed = SmoothedClassifier(model, ablation, mean=info["mean"], std=info["std"])
        start = time.perf_counter()
        votes = collect_votes(smoothed, data, device, args.batch_size, progress=False, bf16=args.bf16,
                              info={"checkpoint": str(run), "data": info["data"], "split": "test", "bf16": args.bf16})
        seconds = time.perf_counter() - start
        certification.update(seconds=round(seconds, 2), images_per_second=round(len(data) / seconds, 1), bf16=args.bf16)
        votes.save(votes_path)
    report = certification_report(votes, parse_patch_sizes(args.patch_sizes), args.patch_size)

    train_seconds = sum(row["epoch_seconds"] for row in history)
    print(f"{args.name}: {len(history)} epochs, {train_seconds / 60:.1f} min of training; standard / smoothed / "
          f"certified {args.patch_size}×{args.patch_size} accuracy {report['standard_accuracy']:.4f} / "
          f"{report['smoothed_accuracy']:.4f} / {report['certified_accuracy']:.4f}")
    out = args.out or RESULTS / f"certified-accuracy-{device.type}.json"
    results = json.loads(out.read_text()) if out.is_file() else {"variants": {}}
    results["variants"][args.name] = {
        **environment(device),
        "recipe": args.recipe,
        "overrides": overrides,
        "from_finished_run": finished,
        "epochs": len(history),
        "train_seconds": round(train_seconds, 1),
        "train_images_per_second": summary.get("train_images_per_second"),
        "parameters": summary.get("parameters"),
        "test_accuracy_one_random_ablation": summary.get("test_accuracy"),
        **report,
        "certification": certification,
        "config": cfg.to_dict(),
    }
    save_report(results, out)


if __name__ == "__main__":
    main()
