"""How faithful are a ViT's explanations? Deletion and insertion AUCs (Petsiuk et al. 2018) of attention
rollout in several settings, gradient-weighted rollout, one layer's raw attention, and a random order.

The model is the README's CIFAR-small ViT (0.31M parameters: 32/4, width 96, 4 blocks, 6 epochs), trained
into RUNS/cifar-small (an interrupted run resumes; a finished one is reused), or any ViT run given with
--checkpoint. The images are the first N of a seeded permutation of the test set, the ones `vitkit explain
RUN --evaluate --n-eval N` scores, so the rows `rollout`, `grad_rollout` and `random` are that command's
figures. Deletion hides the most relevant patches first (lower AUC is better), insertion reveals
them first (higher is better); both follow the probability of the originally predicted class.

    PYTHONPATH=src OMP_NUM_THREADS=2 python bench/explanations.py --data ../shared/datasets/cifar10-jpg.tar.gz
    PYTHONPATH=src python bench/explanations.py --checkpoint runs/c10 --images 10000
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from common import CIFAR_SMALL, RESULTS, device_and_sync, environment, save_report, train_run
from vitkit.data import load_dataset
from vitkit.explain import patch_relevance
from vitkit.explain.evaluate import evaluate_explanations
from vitkit.train import build_config, load_model

# name: (method, options): the `vitkit explain --method M` options of each row
METHODS = {
    "rollout": ("rollout", {}),  # head mean, nothing discarded, A + I row-normalised: the CLI's defaults
    "rollout_max_discard_0.9": ("rollout", dict(head_fusion="max", discard_ratio=0.9)),
    "rollout_min": ("rollout", dict(head_fusion="min")),
    "rollout_seed_residual": ("rollout", dict(residual="seed")),  # seed 003's raw product
    "rollout_from_layer_1": ("rollout", dict(start_layer=1)),
    "attention_last_layer": ("attention", {}),
    "grad_rollout": ("grad_rollout", {}),
    "random": ("random", {}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", type=Path, help="a trained ViT run (default: train the CIFAR-small model)")
    parser.add_argument("--data", default="cifar10", help="cifar10 (official archive) or the JPEG copy's .tar.gz, "
                                                          "for the CIFAR-small model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--images", type=int, default=1000, help="a seeded random sample of the test set")
    parser.add_argument("--steps", type=int, default=16, help="points on each curve")
    parser.add_argument("--seed", type=int, default=0, help="the sample's and the random order's seed")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--runs", type=Path, default=Path("runs/explanations"), help="where the CIFAR-small model trains")
    parser.add_argument("--out", type=Path, help="JSON (default bench/results/explanations-<device>.json)")
    args = parser.parse_args()

    device, sync = device_and_sync(args.device)
    run, trained = args.checkpoint, {}
    if run is None:
        run = args.runs / "cifar-small"
        cfg = build_config(flag_values={"data": args.data, "device": str(device), **CIFAR_SMALL, "epochs": 6})
        _, history, finished = train_run(cfg, run)
        trained = {"reused_finished_run": finished, "epochs": len(history),
                   "train_seconds": round(sum(r["epoch_seconds"] for r in history), 1), "config": cfg.to_dict()}
    summary = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
    model, info = load_model(run, device)
    # The order of `vitkit explain`: a seeded permutation of the whole test set, its first N images scored.
    data = load_dataset(info["data"], "test", image_size=info["model"]["image_size"])
    data = data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(args.seed))[: args.images])
    mean = torch.tensor(info["mean"], device=device)[:, None, None]
    std = torch.tensor(info["std"], device=device)[:, None, None]

    def batches():
        for start in range(0, len(data), args.batch_size):
            x = data.images[start : start + args.batch_size].to(device).float() / 255
            yield (x - mean) / std, data.labels[start : start + args.batch_size].to(device)

    def relevance(x: torch.Tensor, name: str) -> torch.Tensor:
        method, options = METHODS[name]
        if method == "random":
            return torch.rand(x.shape[0], model.cfg.num_patches, device=device)
        return patch_relevance(model, x, method, **options)

    rows = {}
    for name, (method, options) in METHODS.items():
        torch.manual_seed(args.seed)  # the random order's, as in `vitkit explain --evaluate`
        sync()
        start = time.perf_counter()
        figures, _ = evaluate_explanations(model, batches, relevance, methods=[name], steps=args.steps)
        sync()
        rows[name] = {"method": method, "options": options, "seconds": round(time.perf_counter() - start, 1),
                      **{key.removeprefix(f"{name}_"): value for key, value in figures.items()}}
        print(f"{name:>24s}  deletion AUC {rows[name]['deletion_auc']:.3f}  insertion AUC {rows[name]['insertion_auc']:.3f}")

    out = args.out or RESULTS / f"explanations-{device.type}.json"
    save_report({**environment(device), "checkpoint": str(run), "data": info["data"],
                 "test_accuracy_full_test_set": summary.get("test_accuracy"), "parameters": summary.get("parameters"),
                 **trained, "settings": {"images": len(data), "seed": args.seed, "steps": args.steps,
                                         "command": f"vitkit explain RUN --evaluate --n-eval {args.images} "
                                                    f"--steps {args.steps} --seed {args.seed}"},
                 "methods": rows}, out)


if __name__ == "__main__":
    main()
