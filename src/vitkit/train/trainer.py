"""The training loop: data on the device, one optimiser step per batch, a checkpoint per epoch.

A run folder holds:
    config.json        the TrainConfig (what `--resume` reads back)
    last.safetensors   weights after the latest epoch (EMA weights when EMA is on), config in metadata
    best.safetensors   the same, for the epoch with the best validation accuracy
    state.pt           optimiser, scheduler, RNG and loop state, for an exact resume
    history.jsonl      one line of figures per epoch
    curves.png         loss and accuracy per epoch
    summary.json       final figures (test_accuracy, ...) once training has finished

Under torchrun the ranks train one model with DistributedDataParallel: --batch-size is the global batch, dealt
out evenly to the ranks, whose gradients are averaged, so N ranks take the steps one process would (up to float
rounding, and with per-rank augmentation draws). Validation and test images are sharded across the ranks. Rank 0
alone writes the run folder; its files are those of a single process, so any number of ranks can resume them.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from vitkit import distributed
from vitkit.attacks import ATTACKS, Adversary, Trades
from vitkit.data import Augment, AugmentConfig, DeviceLoader, ImageDataset, channel_stats, load_dataset, train_val_split
from vitkit.errors import VitkitError
from vitkit.models import (
    CIFAR_STEM_MAX_SIZE, VisionTransformer, freeze_blocks, load_pretrained, num_parameters, preset_config,
    read_pretrained, resnet18,
)
from vitkit.plots import plot_learning_curves
from vitkit.smoothing import Ablation, RandomlyAblated
from vitkit.train.checkpoint import (
    build_from_info, describe_model, load_model, load_state, load_weights, restore_rng_state, rng_state, save_run,
    write_json,
)
from vitkit.train.config import TrainConfig
from vitkit.train.distill import Distiller, load_teacher
from vitkit.train.evaluate import FlipAveraged, autocast, classification_metrics, predict_dataset
from vitkit.train.optim import EMA, build_optimizer, build_scheduler
from vitkit.train.patch_dropout import PatchDropped


def select_device(name: str = "auto") -> torch.device:
    """cuda, mps or cpu; `auto` picks the first available in that order."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise VitkitError("--device cuda was asked for but no CUDA GPU is visible: use --device cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise VitkitError("--device mps was asked for but MPS is not available: use --device cpu or auto")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        raise VitkitError(f"unknown device {name!r}: use cuda, mps, cpu or auto")
    return torch.device(name)


@dataclass
class DataSplits:
    train: ImageDataset
    val: ImageDataset | None
    test: ImageDataset | None
    mean: tuple[float, ...]
    std: tuple[float, ...]


def prepare_data(cfg: TrainConfig, image_size: int | None) -> DataSplits:
    """Train/validation/test splits (the test split where the source has one) and training-set statistics."""
    kwargs = dict(image_size=image_size, root=cfg.data_root, download=cfg.download)
    full_train = load_dataset(cfg.data, "train", **kwargs)
    try:
        test = load_dataset(cfg.data, "test", **kwargs)
    except VitkitError:
        test = None  # an ImageFolder without a test/ folder: validation is all there is
    train, val = train_val_split(full_train, cfg.val_fraction, seed=cfg.seed)
    mean, std = channel_stats(train)
    return DataSplits(train, val if len(val) else None, test, mean, std)


def build_model(cfg: TrainConfig, data: ImageDataset) -> torch.nn.Module:
    """The preset, with the data set's classes, channels and image size, or the --pretrained weights adapted
    to them; the embeddings and first --freeze-blocks blocks frozen; a distillation token for --distill hard.
    Or, for --model resnet18, a ResNet-18 with the CIFAR stem on images of at most 64 pixels."""
    if data.image_size[0] != data.image_size[1]:
        raise VitkitError(f"images of {data.image_size[0]}×{data.image_size[1]} are not square: pass --image-size")
    if cfg.model == "resnet18":
        return resnet18(data.num_classes, data.channels, cifar_stem=data.image_size[0] <= CIFAR_STEM_MAX_SIZE)
    model = pretrained_model(cfg, data) if cfg.pretrained else VisionTransformer(preset_config(
        cfg.model,
        num_classes=data.num_classes,
        in_channels=data.channels,
        image_size=data.image_size[0],
        patch_size=cfg.patch_size,
        dim=cfg.dim,
        depth=cfg.depth,
        heads=cfg.heads,
        mlp_dim=cfg.mlp_dim,
        pos_embed=cfg.pos_embed,
        pool=cfg.pool,
        dropout=cfg.dropout,
        drop_path=cfg.drop_path,
        distill_token=cfg.distill == "hard",
        shifted_patches=cfg.spt,
        locality_attention=cfg.lsa,
    ))
    if cfg.distill == "hard" and not model.cfg.distill_token:
        raise VitkitError(
            "--distill hard needs a distillation token, which the --pretrained weights lack: use distilled weights "
            "(e.g. deit_tiny_distilled_patch16_224.fb_in1k) or --distill soft"
        )
    freeze_blocks(model, cfg.freeze_blocks)
    return model


def pretrained_model(cfg: TrainConfig, data: ImageDataset) -> VisionTransformer:
    """The --pretrained weights with the data set's classes (a new head) and image size (resampled position
    embeddings), and --patch-size, --heads, --pool, --dropout, --drop-path where given."""
    fixed = [f"--{name.replace('_', '-')}" for name in ("dim", "depth", "mlp_dim", "pos_embed") if getattr(cfg, name)]
    if fixed:
        raise VitkitError(f"{', '.join(fixed)} cannot change the shape of the --pretrained weights: drop them")
    options = {name: getattr(cfg, name) for name in ("pool", "dropout", "drop_path") if getattr(cfg, name) is not None}
    model = load_pretrained(
        cfg.pretrained, num_classes=data.num_classes, image_size=data.image_size[0], patch_size=cfg.patch_size,
        heads=cfg.heads, **options,
    )
    if model.cfg.in_channels != data.channels:
        raise VitkitError(
            f"the --pretrained weights take {model.cfg.in_channels}-channel images but {cfg.data} has "
            f"{data.channels}-channel ones: use data with {model.cfg.in_channels} channels"
        )
    return model


def augment_config(cfg: TrainConfig) -> AugmentConfig:
    return AugmentConfig(
        hflip=cfg.hflip,
        crop_padding=cfg.crop_padding,
        resized_crop_scale=tuple(cfg.resized_crop_scale) if cfg.resized_crop_scale else None,
        resized_crop_ratio=tuple(cfg.resized_crop_ratio),
        trivial_augment=cfg.trivial_augment,
        random_erasing=cfg.random_erasing,
        mixup_alpha=cfg.mixup,
        cutmix_alpha=cfg.cutmix,
    )


class Trainer:
    """Owns a run folder; `fit()` trains (or resumes) to the last epoch and writes the summary."""

    def __init__(self, cfg: TrainConfig, out_dir: str | Path, progress: bool = True):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.progress = progress and distributed.is_main()
        self.device = distributed.setup(select_device(cfg.device))
        rank, world_size = distributed.world()
        local_batch = distributed.local_batch(cfg.batch_size)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank

        # ImageFolder sources are resized to the preset's size (the pre-trained weights') unless told otherwise; for a
        # ResNet, which takes any size, they keep their own.
        data_is_builtin = cfg.data in ("digits", "cifar10", "cifar100")
        if cfg.image_size or data_is_builtin or cfg.model == "resnet18":
            image_size = cfg.image_size
        else:
            image_size = (read_pretrained(cfg.pretrained)[1] if cfg.pretrained else preset_config(cfg.model)).image_size
        self.data = prepare_data(cfg, image_size)
        self.model = build_model(cfg, self.data.train).to(self.device)
        # self.model stays the bare module (checkpoints, EMA, evaluation, attacks); training steps go through
        # self.forward, DDP-wrapped under torchrun so that gradients are averaged across ranks. torch compiles
        # the DDP module (its DDPOptimizer splits the graph at the gradient buckets).
        net = self.model
        if world_size > 1:
            net = torch.nn.parallel.DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            )
        self.forward = torch.compile(net) if cfg.compile else net
        self.ablation = (
            Ablation(cfg.ablation, cfg.ablation_size, self.data.train.image_size, cfg.ablation_stride)
            if cfg.ablation else None
        )
        if self.ablation:  # one random ablation per image, fully masked tokens dropped (a CNN sees whole images)
            self.forward = RandomlyAblated(self.forward, self.ablation, patch_size=token_size(self.model))
        # PatchDropout: each training image keeps a random subset of its patch tokens, drawn once per step
        # (`resample`) from a (seed, epoch, rank) stream; evaluation goes through self.model and sees them all.
        self.patch_dropout = self.build_patch_dropout(rank) if cfg.patch_dropout else None
        if self.patch_dropout is not None:
            self.forward = self.patch_dropout
        # Attacks target the plain model: a compiled one would recompile at each eval/train switch.
        self.adversary = Adversary(
            self.model, self.data.mean, self.data.std, attack=cfg.adv, eps=cfg.eps, steps=cfg.adv_steps,
            step_size=cfg.adv_step_size, norm=cfg.adv_norm, mix=cfg.adv_mix, early_stop=cfg.fat_tau,
        ) if cfg.adv in ATTACKS else None
        self.trades = Trades(
            self.model, self.data.mean, self.data.std, beta=cfg.trades_beta, eps=cfg.eps, steps=cfg.adv_steps,
            step_size=cfg.adv_step_size, norm=cfg.adv_norm,
        ) if cfg.adv == "trades" else None
        self.distiller = self.build_distiller() if cfg.distill else None

        self.train_loader = DeviceLoader(
            self.data.train, local_batch, mean=self.data.mean, std=self.data.std, device=self.device,
            shuffle=True, drop_last=len(self.data.train) >= 2 * cfg.batch_size,
            augment=Augment(augment_config(cfg), self.data.train.num_classes), seed=cfg.seed,
            rank=rank, world_size=world_size,
        )
        if cfg.batch_size > len(self.data.train):
            raise VitkitError(f"{len(self.data.train)} training images are fewer than one batch: lower --batch-size")
        self.optimizer = build_optimizer(self.model, cfg, self.device)
        self.scheduler = build_scheduler(self.optimizer, len(self.train_loader), cfg)
        self.ema = EMA(self.model, cfg.ema) if cfg.ema > 0 else None
        self.epoch = 0  # epochs completed
        self.best_score = (-1.0, 0.0)
        self.best_epoch = 0
        self.history: list[dict[str, Any]] = []

    def build_patch_dropout(self, rank: int) -> PatchDropped | None:
        """The --patch-dropout wrapper of the training forward; None where K = N (nothing would be dropped)."""
        if not isinstance(self.model, VisionTransformer):  # the config refuses resnet18; this guards the rest
            raise VitkitError("--patch-dropout drops a ViT's patch tokens: use a ViT --model, or drop it")
        wrapped = PatchDropped(self.forward, self.model.cfg.num_patches, self.cfg.patch_dropout, seed=self.cfg.seed,
                               rank=rank, device=self.device)
        return wrapped if wrapped.count < wrapped.num_patches else None

    def build_distiller(self) -> Distiller:
        """The --teacher, frozen on the device (compiled with the student under --compile), and the loss."""
        cfg, train = self.cfg, self.data.train
        teacher, info = load_teacher(cfg.teacher, self.device, train.classes, train.image_size[0], train.channels)
        return Distiller(
            self.model, self.data.mean, self.data.std, torch.compile(teacher) if cfg.compile else teacher,
            info["mean"], info["std"], kind=cfg.distill, alpha=cfg.distill_alpha, temperature=cfg.distill_temperature,
            label_smoothing=cfg.label_smoothing,
        )

    # -- checkpoints -------------------------------------------------------------------------

    def model_info(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """What a checkpoint needs to be used on its own: architecture and shape, classes, normalisation."""
        return {
            **describe_model(self.model, self.data.train.image_size[0]),
            "classes": self.data.train.classes,
            "mean": list(self.data.mean),
            "std": list(self.data.std),
            "data": self.cfg.data,
            "preset": self.cfg.model,
            "ablation": self.ablation.to_dict() if self.ablation else None,
            "epoch": self.epoch,
            "metrics": metrics,
        }

    def eval_state_dict(self) -> dict[str, torch.Tensor]:
        return self.ema.shadow if self.ema else self.model.state_dict()

    def save(self, metrics: dict[str, Any], is_best: bool) -> None:
        state = {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "ema": self.ema.shadow if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": rng_state(self.device),
            "best_score": torch.tensor(self.best_score, dtype=torch.float64),
            "best_epoch": self.best_epoch,
            "history": json.dumps(self.history),
        }
        save_run(self.out, state, self.eval_state_dict(), self.model_info(metrics), self.history, is_best)

    def restore(self) -> None:
        state = load_state(self.out / "state.pt")
        load_weights(self.model, state["model"], str(self.out / "state.pt"))
        if self.ema and state["ema"] is not None:
            self.ema.shadow = {k: v.to(self.device) for k, v in state["ema"].items()}
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        restore_rng_state(state["rng"], self.device)
        self.epoch = state["epoch"]
        self.best_score = tuple(state["best_score"].tolist())
        self.best_epoch = state["best_epoch"]
        self.history = json.loads(state["history"])

    # -- the loop ----------------------------------------------------------------------------

    def train_epoch(self) -> dict[str, float]:
        cfg, loader = self.cfg, self.train_loader
        loader.set_epoch(self.epoch)
        if self.patch_dropout is not None:
            self.patch_dropout.set_epoch(self.epoch)
        self.model.train()
        # Sums stay on the device: no host synchronisation per step.
        loss_sum = torch.zeros((), device=self.device)
        correct = torch.zeros((), device=self.device)
        seen = 0
        start = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", disable=not self.progress, leave=False)
        refresh = cfg.log_every or max(1, len(loader) // 10)
        for step, (x, y) in enumerate(bar):
            if self.adversary:
                x = self.adversary(x, y)  # against the whole-image model, as `vitkit attack` evaluates it
            if self.patch_dropout is not None:
                self.patch_dropout.resample(len(x))  # one draw for every forward of the step (TRADES has two)
            with autocast(self.device, cfg.bf16, cpu=cfg.cpu_bf16):
                if self.distiller:
                    loss, logits = self.distiller(self.forward, x, y)
                else:
                    logits = self.forward(x)
                    loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
                if self.trades:
                    loss = loss + self.trades.loss(self.forward, x, logits)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            self.scheduler.step()
            if self.ema:
                self.ema.update(self.model)
            hard = y if y.ndim == 1 else y.argmax(1)  # mixup/cutmix give soft targets
            loss_sum += loss.detach() * len(x)
            correct += (logits.argmax(1) == hard).sum()
            seen += len(x)
            if step % refresh == 0 and self.progress:
                bar.set_postfix(loss=f"{loss.item():.3f}")
        # Summed over the ranks in one collective: the figures of the global batches.
        totals = torch.stack([loss_sum, correct.float(), torch.tensor(float(seen), device=self.device)])
        loss_sum, correct, seen = distributed.all_reduce_sum(totals).tolist()
        train_loss = loss_sum / seen
        elapsed = time.perf_counter() - start
        if not torch.isfinite(torch.tensor(train_loss)):
            raise VitkitError(
                f"the training loss became {train_loss} in epoch {self.epoch + 1}: lower --lr, set --grad-clip 1.0, "
                f"or resume from the last good epoch ({self.epoch}) with `vitkit train --resume {self.out}`"
            )
        return {
            "train_loss": train_loss,
            "train_accuracy": correct / seen,
            "lr": self.optimizer.param_groups[0]["lr"],
            "epoch_seconds": elapsed,
            "images_per_second": seen / elapsed,
        }

    def evaluation_model(self) -> torch.nn.Module:
        if not self.ema:
            return self.model
        model = build_from_info(describe_model(self.model, self.data.train.image_size[0]), "the EMA weights")
        model.load_state_dict(self.ema.shadow)
        return model.to(self.device)

    def scored(self, model: torch.nn.Module) -> torch.nn.Module:
        """What validation and test accuracy measure: the model on whole images (averaged with their mirror
        images under --tta-flip), or, when training on ablations, on one seeded random ablation per image
        (the same ones every epoch)."""
        if self.ablation:
            return RandomlyAblated(model, self.ablation, patch_size=token_size(model), seed=self.cfg.seed)
        return FlipAveraged(model) if self.cfg.tta_flip else model

    def validate(self) -> dict[str, float]:
        if self.data.val is None:
            return {}
        logits, labels = predict_dataset(
            self.scored(self.evaluation_model()), self.data.val, self.data.mean, self.data.std, self.device,
            self.cfg.eval_batch_size, self.cfg.bf16,
        )
        m = classification_metrics(logits, labels, self.data.val.classes, prefix="val_")
        return {"val_loss": m["val_loss"], "val_accuracy": m["val_accuracy"]}

    def fit(self, resume: bool = False, on_epoch: Callable[[Trainer, dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Trains to the last epoch; `on_epoch(trainer, row)` runs after each epoch's checkpoint (benchmarks use
        it to measure test accuracy along the way, outside the timed training)."""
        self.out.mkdir(parents=True, exist_ok=True)
        if resume:
            self.restore()  # every rank reads rank 0's state: under DDP the optimiser states are the same
        elif distributed.is_main():
            write_json(self.out / "config.json", self.cfg.to_dict())
        started = time.perf_counter()
        while self.epoch < self.cfg.epochs:
            row = {"epoch": self.epoch + 1, **self.train_epoch(), **self.validate()}
            self.epoch += 1
            self.history.append(row)
            # Best by validation accuracy; among equals, by lower validation loss. Without validation data the
            # latest weights are the result (training accuracy under mixup or ablations would be a noisy guide).
            score = (row.get("val_accuracy", 0.0), -row.get("val_loss", 0.0))
            is_best = score > self.best_score or self.data.val is None
            if is_best:
                self.best_score, self.best_epoch = score, self.epoch
            self.save({k: v for k, v in row.items() if "accuracy" in k or "loss" in k}, is_best)
            if self.progress:
                shown = " ".join(f"{k}={v:.4g}" for k, v in row.items() if k != "epoch")
                tqdm.write(f"epoch {self.epoch}/{self.cfg.epochs} {shown}")
            if on_epoch is not None:
                on_epoch(self, row)
        if distributed.is_main():
            plot_learning_curves(self.history, self.out / "curves.png")
        return self.finish(time.perf_counter() - started)

    def finish(self, seconds: float) -> dict[str, Any]:
        """Evaluates the best checkpoint on validation and test data and writes summary.json."""
        model, _ = load_model(self.out / "best.safetensors", self.device)
        summary: dict[str, Any] = {
            "data": self.cfg.data,
            "model": self.cfg.pretrained or self.cfg.model,  # the preset gives no shape to pre-trained weights
            "parameters": num_parameters(model),
            "device": str(self.device),
            "processes": distributed.world()[1],
            "epochs": self.cfg.epochs,
            "best_epoch": self.best_epoch,
            "train_seconds_this_session": round(seconds, 2),
            "train_images_per_second": self.history[-1]["images_per_second"],
        }
        for split, data in (("val", self.data.val), ("test", self.data.test)):
            if data is not None:
                logits, labels = predict_dataset(
                    self.scored(model), data, self.data.mean, self.data.std, self.device, self.cfg.eval_batch_size, self.cfg.bf16
                )
                m = classification_metrics(logits, labels, data.classes, prefix=f"{split}_")
                summary[f"{split}_accuracy"] = m[f"{split}_accuracy"]
                summary[f"{split}_loss"] = m[f"{split}_loss"]
        if self.ablation:
            summary["accuracy_measured_on"] = (
                f"one random {self.ablation.kind} ablation (b={self.ablation.size}) per image; "
                "`vitkit certify` gives the smoothed and certified accuracy"
            )
        summary["checkpoint"] = str(self.out / "best.safetensors")
        if distributed.is_main():
            write_json(self.out / "summary.json", summary)
        return summary


def token_size(model: torch.nn.Module) -> int | None:
    """A ViT's patch size, for ablations to drop its fully masked tokens; None for a CNN, which sees whole images."""
    return model.cfg.patch_size if isinstance(model, VisionTransformer) else None


def train(cfg: TrainConfig, out_dir: str | Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Trains `cfg` into `out_dir` (or resumes the run there) and returns the summary."""
    return Trainer(cfg, out_dir, progress).fit(resume)
