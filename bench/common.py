"""What every benchmark records beside its figures: when, on which machine and device, with which versions."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch
import yaml

import vitkit

RESULTS = Path(__file__).parent / "results"


# The README's CIFAR-small ViT (0.31M parameters: 32/4, width 96, 4 blocks) and its training options, shared by
# the attack table (bench/robustness.py) and the explanation scores (bench/explanations.py); epochs are theirs.
CIFAR_SMALL = dict(model="vit_lite_32", dim=96, depth=4, heads=3, mlp_dim=192, lr=2e-3, warmup_epochs=0.5, hflip=0.5,
                   crop_padding=4, label_smoothing=0.1)


def cpu_name() -> str:
    # platform.processor() is often empty or just "x86_64" on Linux; /proc/cpuinfo has the model.
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_and_sync(name: str) -> tuple[torch.device, Callable[[], None]]:
    """The device to time on (`auto`: cuda when available) and a function that waits for its queued work,
    so a timer stops when the work is done rather than when it was launched."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    return device, (torch.cuda.synchronize if device.type == "cuda" else (lambda: None))


def environment(device: torch.device) -> dict[str, Any]:
    versions = {"torch": torch.__version__, "vitkit": vitkit.__version__}
    try:
        import timm

        versions["timm"] = timm.__version__
    except ImportError:
        pass
    return {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            "platform": platform.platform(),
            "processor": cpu_name(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
        },
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "versions": versions,
    }


def save_report(report: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"saved {out}")


def stored_config_equals(run: Path, cfg: Any) -> bool:
    """Whether `run` holds a run of exactly `cfg` (a config dataclass; options added since it ran count at
    their defaults)."""
    if not (run / "config.json").is_file():
        return False
    stored = json.loads((run / "config.json").read_text())
    known = {f.name for f in fields(cfg)}
    return type(cfg)(**{k: v for k, v in stored.items() if k in known}) == cfg


def train_run(cfg: Any, run: Path) -> tuple[dict, list[dict], bool]:
    """Train `cfg` (a TrainConfig) into `run`, resuming an interrupted run of it, or take it as it is when
    finished: its summary, its per-epoch history, and whether it was already finished. A folder holding a
    run of another configuration is refused."""
    from vitkit.train import train

    if (run / "config.json").is_file() and not stored_config_equals(run, cfg):
        raise SystemExit(f"{run} holds a run of another configuration: pass another --name or --runs")
    finished = (run / "summary.json").is_file()
    if not finished:
        train(cfg, run, resume=(run / "state.pt").is_file(), progress=False)
    history = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines() if line.strip()]
    return json.loads((run / "summary.json").read_text()), history, finished


def parse_value(text: str):
    """A number (YAML reads 3e-3 as a string), else YAML: true, [0.8, 1.0], a name."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        return yaml.safe_load(text)


def parse_sets(items: list[str]) -> dict:
    """KEY=VALUE pairs: `--set lr=3e-3 --set trivial_augment=true`."""
    values = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--set {item!r} is not KEY=VALUE")
        values[key.replace("-", "_")] = parse_value(value)
    return values


def run_children(commands: list[list[str]], jobs: int) -> None:
    """Run the commands as child processes, at most `jobs` at a time (runs side by side on one device); exit
    naming the ones that failed. If this process stops first (an error, Ctrl-C), the children still running stop
    too."""
    if jobs < 1:
        raise SystemExit(f"--jobs {jobs}: pass at least 1")
    waiting, running, failed = list(commands), [], []
    try:
        while waiting or running:
            while waiting and len(running) < jobs:
                running.append(subprocess.Popen(waiting.pop(0)))
            time.sleep(1)
            for child in [c for c in running if c.poll() is not None]:
                running.remove(child)
                if child.returncode != 0:
                    failed.append(" ".join(child.args))
    finally:
        for child in running:
            child.terminate()
            child.wait()
    if failed:
        raise SystemExit(f"{len(failed)} run(s) failed: " + "; ".join(failed))
