"""Checkpoints: safetensors weights with the model config in their metadata, and a separate
training-state file for resuming.

The metadata's "arch" names the architecture ("vit", or "resnet18") and "model" what rebuilds it: a
ViTConfig, or the ResNet's num_classes, in_channels and cifar_stem; both also hold image_size (the input
size of training) and in_channels. Checkpoints written before "arch" existed are ViTs. Box-head checkpoints
(task "boxes", `vitkit.train.boxes`) are rebuilt there. Every write goes to a temporary file first and is
renamed into place, so an interrupted write never leaves a half-written checkpoint behind."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from vitkit.errors import VitkitError
from vitkit.models import ViTConfig, VisionTransformer, resnet18

FORMAT_VERSION = 1
ARCHS = ("vit", "resnet18")


def atomic_write(path: str | Path, write) -> None:
    """Calls write(tmp_path) then renames tmp_path to path (same folder, so the rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: str | Path, data: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def save_model(path: str | Path, state_dict: dict[str, torch.Tensor], info: dict[str, Any]) -> None:
    """Weights plus `info` (must hold "arch" and "model", see above; also classes, mean, std, ...) as metadata."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}
    metadata = {"vitkit": json.dumps({"format": FORMAT_VERSION, **info})}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_info(path: str | Path) -> dict[str, Any]:
    """The metadata saved with a checkpoint, without loading its weights."""
    from safetensors import safe_open

    path = resolve_checkpoint(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    except (SafetensorError, OSError) as e:
        raise VitkitError(f"{path} is not a readable safetensors checkpoint ({e}): pass a file written by vitkit") from None
    if "vitkit" not in meta:
        raise VitkitError(f"{path} has no vitkit metadata: it was not written by `vitkit train`")
    return json.loads(meta["vitkit"])


def resolve_checkpoint(path: str | Path) -> Path:
    """A .safetensors file, or a run folder (its best.safetensors, else last.safetensors)."""
    path = Path(path)
    if path.is_dir():
        for name in ("best.safetensors", "last.safetensors"):
            if (path / name).is_file():
                return path / name
        raise VitkitError(f"run folder {path} holds no best.safetensors or last.safetensors: train first or pass a file")
    if not path.is_file():
        raise VitkitError(f"checkpoint {path} does not exist: pass a .safetensors file or a run folder")
    return path


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """The model of a checkpoint (a VisionTransformer or a ResNet), in eval mode, with its metadata (classes,
    mean, std, ...)."""
    path = resolve_checkpoint(path)
    info = read_info(path)
    model = build_from_info(info, str(path))
    load_weights(model, load_file(str(path)), str(path))
    return model.to(device).eval(), info


def build_from_info(info: dict[str, Any], source: str) -> torch.nn.Module:
    """A freshly initialised model of the architecture a checkpoint's metadata describes."""
    arch = info.get("arch", "vit")
    if info.get("task") == "boxes":
        raise VitkitError(f"{source} is a bounding-box model (`vitkit train-boxes`): evaluate it with `vitkit eval`")
    if arch == "vit":
        return VisionTransformer(ViTConfig.from_dict(info["model"]))
    if arch == "resnet18":
        m = info["model"]
        return resnet18(m["num_classes"], m["in_channels"], m["cifar_stem"])
    raise VitkitError(f"{source} holds a {arch!r} model, which this vitkit cannot build ({', '.join(ARCHS)}): upgrade vitkit")


def describe_model(model: torch.nn.Module, image_size: int) -> dict[str, Any]:
    """The "arch" and "model" metadata `build_from_info` rebuilds `model` from: a VisionTransformer, or a
    ResNet-18 of `vitkit.models.resnet18` trained on `image_size`-pixel images."""
    if isinstance(model, VisionTransformer):
        return {"arch": "vit", "model": model.cfg.to_dict()}
    return {"arch": "resnet18", "model": {
        "num_classes": model.fc.out_features, "in_channels": model.conv1.in_channels,
        "cifar_stem": isinstance(model.maxpool, torch.nn.Identity), "image_size": image_size,
    }}


def load_weights(model: torch.nn.Module, state_dict: dict[str, torch.Tensor], source: str) -> None:
    """load_state_dict with a message that says which tensors do not fit, instead of PyTorch's wall of text."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    wrong = sorted(k for k in set(own) & set(state_dict) if own[k].shape != state_dict[k].shape)
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}")
        if unexpected:
            parts.append(f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}")
        if wrong:
            k = wrong[0]
            parts.append(f"shape of {k} is {tuple(state_dict[k].shape)}, the model needs {tuple(own[k].shape)}")
        raise VitkitError(
            f"the weights in {source} do not fit this model ({'; '.join(parts)}): "
            "use the model configuration the checkpoint was trained with"
        )
    model.load_state_dict(state_dict)


def rng_state(device: torch.device) -> dict[str, torch.Tensor]:
    """The random-number generators' state (CPU, and the device's on CUDA), for an exact resume."""
    rng = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        rng["cuda"] = torch.cuda.get_rng_state(device)
    return rng


def restore_rng_state(rng: dict[str, torch.Tensor], device: torch.device) -> None:
    torch.set_rng_state(rng["cpu"])
    if "cuda" in rng and device.type == "cuda":
        torch.cuda.set_rng_state(rng["cuda"], device)


def save_state(path: str | Path, state: dict[str, Any]) -> None:
    """Optimiser, scheduler, RNG and loop state for --resume (tensors and plain Python values only)."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def save_run(out: Path, state: dict[str, Any], weights: dict[str, torch.Tensor], info: dict[str, Any],
             history: list[dict[str, Any]], is_best: bool) -> None:
    """A run folder's files after an epoch, written by rank 0 while the other ranks wait: state.pt first (what
    --resume reads), then last.safetensors (and best.safetensors) with `info`, and history.jsonl."""
    from vitkit import distributed

    if distributed.is_main():
        save_state(out / "state.pt", state)
        save_model(out / "last.safetensors", weights, info)
        if is_best:
            save_model(out / "best.safetensors", weights, info)
        (out / "history.jsonl").write_text("".join(json.dumps(row) + "\n" for row in history))
    distributed.barrier()


def load_state(path: str | Path) -> dict[str, Any]:
    # weights_only=True: a state file is never unpickled as arbitrary objects.
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise VitkitError(f"no training state at {path}: this run folder cannot be resumed") from None
    except Exception as e:
        raise VitkitError(f"training state {path} is unreadable ({e}): start a new run") from None
