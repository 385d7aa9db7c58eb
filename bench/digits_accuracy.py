"""The demo's promise, measured: digits test accuracy and training time of the `digits` recipe over seeds.

    python bench/digits_accuracy.py --seeds 0 1 2
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from common import RESULTS, environment, save_report
from vitkit.train import build_config, select_device, train


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    device = select_device(args.device)

    runs = []
    for seed in args.seeds:
        cfg = build_config("digits", None, {"seed": seed, "device": str(device)})
        start = time.perf_counter()
        with tempfile.TemporaryDirectory() as run_dir:
            summary = train(cfg, run_dir, progress=False)
        runs.append({"seed": seed, "test_accuracy": summary["test_accuracy"], "wall_seconds": time.perf_counter() - start})
        print(f"seed {seed}: test accuracy {summary['test_accuracy']:.4f} in {runs[-1]['wall_seconds']:.1f} s")
    accuracies = [r["test_accuracy"] for r in runs]
    report = {
        **environment(device),
        "recipe": build_config("digits").to_dict(),
        "data": "scikit-learn digits, fixed 80/20 split (359 test images)",
        "runs": runs,
        "test_accuracy_mean": statistics.mean(accuracies),
        "test_accuracy_min": min(accuracies),
        "wall_seconds_mean": statistics.mean(r["wall_seconds"] for r in runs),
    }
    print(f"mean {report['test_accuracy_mean']:.4f}, min {report['test_accuracy_min']:.4f}")
    save_report(report, args.out or RESULTS / f"digits-accuracy-{device.type}.json")


if __name__ == "__main__":
    main()
