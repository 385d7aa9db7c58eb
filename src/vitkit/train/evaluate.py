"""Batched inference over a data set and the classification figures derived from it."""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit import distributed
from vitkit.data import DeviceLoader, ImageDataset


def autocast(device: torch.device, bf16: bool, cpu: bool = False):
    """bfloat16 autocast on CUDA when asked, and on the CPU too with `cpu`; a no-op elsewhere.

    The CPU is opt-in. On one with native bfloat16 (the 2-core AMD EPYC, AVX512-BF16; one thread, batch 128) a
    DeiT-Ti forward on one ablated column runs 3× faster and its training step 1.6×; a training step of the
    cifar10-cpu ViT (width 128, 64 tokens) 1.2× faster, of the digits ViT (16 tokens) 1.4× slower: the casts
    weigh more than small matrices save. Training's bf16 means CUDA; its CPU figures are float32."""
    if bf16 and (device.type == "cuda" or (cpu and device.type == "cpu")):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


class FlipAveraged(nn.Module):
    """Test-time augmentation: the mean of the model's logits on each image and on its mirror image."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return (self.model(x) + self.model(x.flip(-1))) / 2


@torch.inference_mode()
def predict_logits(model: nn.Module, loader: DeviceLoader, device: torch.device, bf16: bool = False) -> tuple[Tensor, Tensor]:
    """Logits (N, classes) in float32 and labels (N,), both on the CPU, in the loader's order."""
    was_training = model.training
    model.eval()
    logits, labels = [], []
    for x, y in loader:
        with autocast(device, bf16):
            out = model(x)
        logits.append(out.float())
        labels.append(y)
    model.train(was_training)
    return torch.cat(logits).cpu(), torch.cat(labels).cpu()


def predict_dataset(
    model: nn.Module, dataset: ImageDataset, mean: Sequence[float], std: Sequence[float],
    device: torch.device, batch_size: int = 512, bf16: bool = False,
) -> tuple[Tensor, Tensor]:
    """Logits and labels of every image of `dataset`, unaugmented, in order. Under torchrun every rank
    predicts its share and gets the whole result (so every rank must call it)."""
    part = dataset.subset(distributed.shard(len(dataset)))  # a slice: a view, no copy
    loader = DeviceLoader(part, batch_size, mean=mean, std=std, device=device)
    logits, labels = predict_logits(model, loader, device, bf16)
    return distributed.gather_cat(logits), distributed.gather_cat(labels)


def classification_metrics(logits: Tensor, labels: Tensor, classes: Sequence[str], prefix: str = "") -> dict[str, float]:
    """Flat figures: loss, accuracy (a fraction) and the accuracy of each class."""
    pred = logits.argmax(1)
    correct = (pred == labels).float()
    per_class_total = torch.bincount(labels, minlength=len(classes)).float()
    per_class_correct = torch.bincount(labels, weights=correct, minlength=len(classes))
    metrics = {
        f"{prefix}loss": F.cross_entropy(logits, labels).item(),
        f"{prefix}accuracy": correct.mean().item(),
    }
    for name, hit, total in zip(classes, per_class_correct.tolist(), per_class_total.tolist()):
        if total:
            metrics[f"{prefix}accuracy_{name}"] = hit / total
    return metrics
