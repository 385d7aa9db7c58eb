"""Optimiser with weight decay only where it belongs, and per-step learning-rate schedules."""

from __future__ import annotations

import math
from dataclasses import replace

import torch
from torch import nn

from vitkit.errors import VitkitError
from vitkit.train.config import TrainConfig

# Embedding tables are not decayed (as in timm and DeiT): shrinking them toward zero only hurts.
NO_DECAY_NAMES = ("cls_token", "pos_embed", "dist_token")


def param_groups(model: nn.Module, weight_decay: float, layer_decay: float = 1.0,
                 apart: tuple[str, ...] = ()) -> list[dict]:
    """Matrices (and convolution kernels) decayed; norms (LayerNorm, BatchNorm), biases and embeddings not;
    frozen parameters left out.

    Each group has an "lr_scale": layer_decay^(L + 1 - layer) for a ViT of L blocks, where the embeddings are
    layer 0, block i is layer i + 1 and the final norm and head layer L + 1 (layer-wise learning-rate decay,
    BEiT's fine-tuning: the layers nearest the input change least). The ViT is the model itself or its
    `backbone` (a box model, whose `zoom_backbone` where it has one is decayed alike), whose heads then count as
    layer L + 1. Without decay that is two groups, decayed first; otherwise a pair per layer. The head's come
    first, so param_groups[0] has the peak rate. The parameters whose names start with one of `apart` go into
    groups of their own, flagged "apart" (for a schedule of their own; see `build_scheduler`), after the others.
    """
    depth, prefixes = 0, ("",)  # without decay, any module: every scale is 1
    if layer_decay != 1:
        vit, prefixes = (model, ("",)) if hasattr(model, "blocks") else (
            getattr(model, "backbone", None), ("backbone.", "zoom_backbone."))
        if not hasattr(vit, "blocks"):
            raise VitkitError("layer-wise learning-rate decay needs a ViT (its blocks are the layers): drop --layer-decay")
        depth = len(vit.blocks)
    groups: dict[tuple[bool, float, bool], list[nn.Parameter]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim <= 1 or name.split(".")[-1] in NO_DECAY_NAMES
        vit_prefix = next((start for start in prefixes if name.startswith(start)), None)  # None: a head
        layer = depth + 1 if vit_prefix is None else layer_index(name.removeprefix(vit_prefix), depth)
        groups.setdefault((name.startswith(apart), layer_decay ** (depth + 1 - layer), no_decay), []).append(p)
    return [
        {"params": params, "weight_decay": 0.0 if no_decay else weight_decay, "lr_scale": scale,
         **({"apart": True} if is_apart else {})}
        for (is_apart, scale, no_decay), params in sorted(groups.items(),
                                                          key=lambda item: (item[0][0], -item[0][1], item[0][2]))
    ]


def layer_index(name: str, depth: int) -> int:
    """A ViT parameter's layer: 0 for the patch and position embeddings and class (and distillation) token,
    i + 1 for block i, depth + 1 for the final norm and the heads."""
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    if name.startswith(("norm.", "head.", "head_dist.")):
        return depth + 1
    return 0


def build_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device,
                    apart: tuple[str, ...] = ()) -> torch.optim.Optimizer:
    """SGD or AdamW over `param_groups` (with `apart`'s groups of their own)."""
    groups = [{**g, "lr": cfg.lr * g["lr_scale"]}
              for g in param_groups(model, cfg.weight_decay, cfg.layer_decay, apart)]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.momentum > 0)
    # The fused kernel is one launch for all parameters on CUDA; on CPU the default (foreach) is fastest.
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.999), fused=device.type == "cuda")


def lr_factor(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """The learning rate at optimiser step `step`, as a fraction of cfg.lr."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    epoch = step // steps_per_epoch
    if cfg.schedule == "cosine":
        total = cfg.epochs * steps_per_epoch
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if cfg.schedule == "step":
        return cfg.gamma ** (epoch // cfg.step_size)
    if cfg.schedule == "multistep":
        return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    return 1.0


def build_scheduler(optimizer: torch.optim.Optimizer, steps_per_epoch: int, cfg: TrainConfig,
                    apart_epochs: int | None = None):
    """A LambdaLR stepped once per optimiser step; its state (the step count) is saved for resume. With
    `apart_epochs`, the groups flagged "apart" follow the schedule of a run of that many epochs, then stay at 0."""
    def schedule(step: int) -> float:
        return lr_factor(step, steps_per_epoch, cfg)

    if apart_epochs is None:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    short = replace(cfg, epochs=apart_epochs)

    def apart_schedule(step: int) -> float:
        return lr_factor(step, steps_per_epoch, short) if step < apart_epochs * steps_per_epoch else 0.0

    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, [apart_schedule if g.get("apart") else schedule for g in optimizer.param_groups])


class EMA:
    """Exponential moving average of a model's floating-point weights and buffers."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        for k, v in model.state_dict().items():
            if v.dtype.is_floating_point:
                self.shadow[k].lerp_(v.detach(), 1.0 - self.decay)
            else:
                self.shadow[k].copy_(v)
