"""Seed 001's classification-plus-localisation fine-tuning: a class and the hand's bounding box per image.

The loss is CE / C + box loss, the box loss the mean squared error of the (cx, cy, w, h) coordinates (seed 001),
smooth L1 or 1 − GIoU. C balances the two terms: a number, or `auto`, which measures the mean cross-entropy and
the mean box loss of the first `balance_batches` training batches (eval mode, before the first step) and sets
C = CE / box loss, so that both terms start equal; it is then fixed for the run and saved with it. With the dense
box head, `--cell-loss λ` adds λ × the mean box loss of the cells whose centres lie inside the true box, each cell's
edges taken as a box of its own (FCOS's training of locations; see vitkit.models.box_head).

The figures are accuracy, the mean IoU and the share of images whose predicted box has IoU ≥ 0.5, 0.75 and 0.9
with the true box. IoU is measured on every image, whatever the predicted class (seed 001's definition).

Training boxes can be looser than the boxes a model is judged on: ASL letters' training images are copies rotated
and sheared by up to 5°, and each copy's box encloses the turned box, so a model that fits them predicts boxes
about 5% too wide and tall on the untouched validation and test images. `--box-scale auto` measures that after
training: the factor on predicted widths and heights that maximises the mean IoU on the validation images, saved
with the model and applied whenever it predicts. Fitted there, the validation figures flatter it; the summary adds
cross-fitted ones (each quarter of the validation images scored with the factor fitted on the other three).

With --hflip the model also learns mirrored images; --flip-tta then makes every evaluation (validation during
training, the box scale, test, the saved model's predictions) average each image's class scores and box with those
of its mirror, at twice the cost of a prediction.

`--zoom 1.2` classifies a second look of the backbone at a square crop around the predicted box (see
vitkit.models.box_head); with `--source-size 448` the images are kept at 448 pixels, the first pass sees them at
--image-size and the crop is cut from the 448-pixel image, and the checkpoint takes images of 448 pixels.
`--zoom-backbone own` runs that second look on a backbone of its own (a copy of the first's starting weights): the
class loss then trains it and the classifier only, the box losses the first backbone and the box head only.
`--class-epochs N` gives the class's parameters a schedule of N epochs (warmup and cosine, as the run's), after
which their rate is 0 and they stay fixed while the box learns on; a small training set is memorised by the class
long before the box is tight.

`--class-from RUN` is a class stage after such a run: RUN's box (first backbone and box head) is loaded and kept
fixed, the zoom's backbone starts from RUN's first backbone, which has learned where the objects are and what
their outlines look like, and the class learns alone, on a fresh classifier, from crops cut where the finished box
points. The stage's checkpoint is a whole model: RUN's box with the new class.

A run folder holds config.json (the BoxTrainConfig, what `--resume` reads back), last.safetensors and
best.safetensors (by --select-by: best by validation accuracy, then mean IoU, or the reverse, or the last; metadata
task "boxes", the architecture, classes, normalisation, image size: a checkpoint loads on its own with
`load_box_model`), state.pt (exact resume at epoch boundaries), history.jsonl, curves.png, boxes.png and
confusion.png (test predictions) and summary.json. With --ema the checkpoints, and the validation and test figures,
are those of the exponential moving average of the weights (the train_* figures are the live weights'); state.pt
keeps both. train_loss is the objective trained on (the smoothed CE with --label-smoothing, plus the --cell-loss
term, logged on its own as train_cell_loss); val_loss is CE / C + box loss with the plain CE.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor
from tqdm.auto import tqdm

from vitkit import distributed
from vitkit.data.box_augment import BoxAugment, BoxAugmentConfig, BoxLoader
from vitkit.data.boxes import (
    BoxDataset, MissingSplit, box_iou, cxcywh_to_xyxy, generalized_box_iou, load_box_dataset, scale_sizes, xyxy_to_cxcywh,
)
from vitkit.data.datasets import channel_stats, class_difference, train_val_split
from vitkit.errors import VitkitError
from vitkit.models.box_head import BACKBONES, BOX_HEADS, RESNET18_FEATURES, BoxModel, resnet18_backbone, vit_backbone
from vitkit.models.vit import num_parameters
from vitkit.plots import confusion_matrix, plot_box_predictions, plot_confusion_matrix, plot_learning_curves
from vitkit.train.config import option, shared_checks
from vitkit.train.checkpoint import (
    load_state, load_weights, read_info, resolve_checkpoint, restore_rng_state, rng_state, save_model, save_run,
    write_json,
)
from vitkit.train.evaluate import autocast, classification_metrics
from vitkit.train.optim import EMA, build_optimizer, build_scheduler
from vitkit.train.trainer import select_device

BOX_LOSSES = ("mse", "smooth_l1", "giou")
ZOOM_BACKBONES = ("shared", "own")
CLASS_PARTS = ("zoom_backbone.", "classifier.")  # with --zoom-backbone own, what the class alone trains
BOX_PARTS = ("backbone.", "regressor.")  # and what the box alone trains (what --class-from keeps fixed)
SELECTIONS = ("accuracy", "iou", "last")
SMOOTH_L1_BETA = 0.05  # where smooth L1 turns from quadratic to linear, in box units (about 11 pixels at 224)
SCHEDULES = ("cosine", "constant", "plateau")
NORMALIZATIONS = ("auto", "imagenet", "dataset")
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IOU_THRESHOLDS = (0.5, 0.75, 0.9)
IOU_NOTE = "IoU of each image's predicted box with its true box, on every image, whatever the predicted class"


@dataclass
class BoxTrainConfig:
    """Everything a box-training run depends on; saved as config.json in the run folder."""

    # data
    data: str | None = option(None, "a YOLO folder (data.yaml, {train,valid,test}/{images,labels}), a .tar.gz of one, "
                                  "or a CSV (path,label,x_min,y_min,x_max,y_max[,split], pixels)")
    image_size: int = option(224, "images are resized to this square size (boxes are fractions: they do not move)")
    val_fraction: float = option(0.1, "share of the training images held out for validation when the data has no "
                                    "val/valid split")
    # model
    backbone: str = option("vit", "vit or resnet18")
    model: str = option("vit_tiny", "ViT preset when no --pretrained weights are given")
    pretrained: str | None = option(None, "vit: timm/HF weights, a file or a hub name (e.g. "
                                        "deit_tiny_patch16_224.fb_in1k); resnet18: a local torchvision state dict")
    patch_size: int | None = option(None, "vit: patch size (the pre-trained projection is resampled to it)")
    dim: int | None = option(None, "vit from scratch: override the preset's width")
    depth: int | None = option(None, "vit from scratch: override the preset's number of blocks")
    heads: int | None = option(None, "vit from scratch: override the preset's attention heads")
    mlp_dim: int | None = option(None, "vit from scratch: override the preset's MLP width")
    freeze_blocks: int = option(0, "vit with --pretrained: freeze the embeddings and the first N blocks (seed 001: 6)")
    drop_path: float = option(0.0, "vit: stochastic depth rate of the last block (rising linearly from 0 at the first)")
    cifar_stem: bool = option(False, "resnet18: 3x3 stride-1 stem without max-pool, for images of about 32 pixels")
    hidden: int = option(512, "hidden width of the classifier and box-regressor MLPs")
    head_dropout: float = option(0.2, "dropout in the two head MLPs")
    box_head: str = option("mlp", "box regressor: mlp on the pooled feature (seed 001), or dense: on every patch "
                                "token (ResNet: feature-map cell), a weight and the distances to the four edges, "
                                "averaged by the weights")
    cell_loss: float = option(0.0, "dense box head: weight of a per-cell loss, by which every patch token (cell) inside "
                                   "the true box learns to give the box's edges on its own (FCOS), besides the "
                                   "averaged box (0: off)")
    region_pool: bool = option(False, "dense box head: the classifier also reads the patch tokens (cells) averaged "
                                      "with the box head's weights, the features of where it finds the object")
    zoom: float = option(0.0, "classify a second pass of the backbone over a square crop around the predicted box, "
                              "this many times its longer side (e.g. 1.2), resized to --image-size: the object "
                              "seen larger, at twice the cost of a step (0: off)")
    source_size: int | None = option(None, "with --zoom: load the images at this size (above --image-size, e.g. 448) "
                                           "and cut the zoom's crops from them, so the second look sees detail the "
                                           "first (the image resized to --image-size) does not; the model then "
                                           "takes images of this size")
    zoom_backbone: str = option("shared", "with --zoom: the second pass runs the first's backbone (shared), or a copy "
                                          "of its own (own): the class and the box learn apart, twice the weights, "
                                          "the same cost per image")
    class_epochs: int | None = option(None, "with --zoom-backbone own: the class (the zoom's backbone and the "
                                            "classifier) learns this many epochs, on a schedule of its own, then "
                                            "stays fixed while the box learns on (none: every epoch)")
    sigmoid: bool = option(True, "mlp box head: sigmoid on its output, so boxes stay in [0, 1]")
    box_scale: str = option("1", "factor on predicted widths and heights at evaluation, or auto: the one that "
                                 "maximises the validation mean IoU, fitted after training (for training boxes "
                                 "looser than the evaluation ones)")
    flip_tta: bool = option(False, "evaluation (validation, test, the box scale, the saved model) averages each "
                                   "image's class scores and box with its mirror's: test-time augmentation for a "
                                   "model trained with --hflip")
    normalize: str = option("auto", "pixel normalisation: imagenet, dataset (training-set statistics), or auto "
                                  "(imagenet with --pretrained weights, which were trained with it; else dataset)")
    # loss
    box_loss: str = option("mse", "box loss: mse (seed 001), smooth_l1 or giou")
    label_smoothing: float = option(0.0, "label smoothing of the training cross-entropy (train_ce and train_loss are "
                                         "smoothed, validation and test CE plain)")
    loss_balance: str = option("auto", "C in CE/C + box loss: a number, or auto (both terms equal at the start)")
    balance_batches: int = option(4, "training batches measured for --loss-balance auto")
    # optimisation
    epochs: int = option(25, "training epochs")
    batch_size: int = option(32, "batch size")
    optimizer: str = option("adamw", "adamw or sgd")
    lr: float = option(1e-4, "peak learning rate")
    weight_decay: float = option(0.0, "weight decay of matrices (0 with adamw: Adam, as seed 001)")
    layer_decay: float = option(1.0, "vit: layer-wise learning-rate decay, block i (from 0) of L at lr·decay^(L-i), "
                                     "the heads at lr (1: off)")
    momentum: float = option(0.9, "SGD momentum (Nesterov)")
    schedule: str = option("cosine", "cosine (after warmup), constant, or plateau (ReduceLROnPlateau on the "
                                   "validation loss, after warmup)")
    warmup_epochs: float = option(1.0, "linear warmup length in epochs")
    plateau_patience: int = option(3, "plateau: epochs without improvement before the learning rate drops")
    plateau_factor: float = option(0.5, "plateau: factor of each drop")
    grad_clip: float = option(0.0, "clip the gradient norm to this value (0: off)")
    ema: float = option(0.0, "decay of an exponential moving average of the weights, updated every step; validation, "
                             "test and the checkpoints use the average (0: off; e.g. 0.995)")
    bf16: bool = option(True, "bfloat16 autocast of the backbone on CUDA (the heads stay float32; ignored on CPU)")
    cpu_bf16: bool = option(False, "bfloat16 autocast of the backbone's training steps on the CPU too (a CPU with "
                                   "native bfloat16: AVX512-BF16, AMX); evaluation stays float32")
    # augmentation (batched on the device; boxes move with the pixels)
    hflip: float = option(0.0, "horizontal flip probability (0 by default: a mirror can change what an image "
                                 "shows, e.g. text; an ASL letter stays the same letter, signed with the other hand)")
    crop_scale: list[float] | None = option(None, "box-safe random crop: window area range, e.g. 0.6,1.0 (>1 zooms out)")
    crop_ratio: list[float] = option((0.75, 4 / 3), "box-safe random crop: window aspect-ratio range")
    brightness: float = option(0.0, "colour jitter: brightness factor range ±j")
    contrast: float = option(0.0, "colour jitter: contrast factor range ±j")
    saturation: float = option(0.0, "colour jitter: saturation factor range ±j")
    # run
    seed: int = option(0, "random seed (data order, augmentation, initialisation)")
    device: str = option("auto", "cuda, mps, cpu or auto")
    eval_batch_size: int = option(256, "batch size for validation and test")
    select_by: str = option("accuracy", "best checkpoint by validation accuracy then mean IoU (accuracy), by mean "
                                      "IoU then accuracy (iou), or the last epoch's (last: no choice made on the "
                                      "validation images, whose figures then stay out of sample)")
    class_from: str | None = option(None, "a finished run folder of --zoom with its box to keep: its backbone and box "
                                          "head are loaded and fixed, the zoom's own backbone starts from that "
                                          "backbone (which has learned where objects are) and the class alone "
                                          "learns, on a fresh classifier; needs --zoom-backbone own. `vitkit "
                                          "train-boxes --class-from RUN` takes RUN's options, with --epochs its "
                                          "--class-epochs, --select-by last and its loss balance, unless given")

    def __post_init__(self) -> None:
        self.loss_balance = str(self.loss_balance)
        self.box_scale = str(self.box_scale)
        self.crop_ratio = [float(r) for r in self.crop_ratio]
        if self.crop_scale is not None:
            self.crop_scale = [float(s) for s in self.crop_scale]
        shape = [f"--{n.replace('_', '-')}" for n in ("dim", "depth", "heads", "mlp_dim") if getattr(self, n)]
        checks = shared_checks(self) + [
            (self.data is not None, "--data is required: a YOLO folder, a .tar.gz of one, or a CSV file"),
            (self.backbone in BACKBONES, f"unknown backbone {self.backbone!r}: use one of {', '.join(BACKBONES)}"),
            (self.box_head in BOX_HEADS, f"unknown box head {self.box_head!r}: use one of {', '.join(BOX_HEADS)}"),
            (self.sigmoid or self.box_head == "mlp",
             "--no-sigmoid applies to the mlp box head (the dense head bounds its edges itself): drop it"),
            (self.cell_loss >= 0, "--cell-loss must be 0 (off) or a positive weight, e.g. 1"),
            (not self.cell_loss or self.box_head == "dense",
             "--cell-loss trains the dense head's cells: add --box-head dense, or drop it"),
            (not self.region_pool or self.box_head == "dense",
             "--region-pool pools the features where the dense box head looks: add --box-head dense, or drop it"),
            (self.zoom == 0 or self.zoom >= 1,
             f"--zoom {self.zoom} would crop the object: pass a margin ≥ 1, e.g. 1.2, or 0 for none"),
            (not (self.zoom and self.region_pool),
             "--zoom classifies a crop around the box, --region-pool the whole image's cells where the box is: "
             "choose one"),
            (self.source_size is None or (self.zoom and self.source_size >= self.image_size),
             f"--source-size is where --zoom cuts its crops from: add --zoom 1.2, with a size ≥ --image-size "
             f"{self.image_size}, or drop it"),
            (self.zoom_backbone in ZOOM_BACKBONES,
             f"unknown --zoom-backbone {self.zoom_backbone!r}: use one of {', '.join(ZOOM_BACKBONES)}"),
            (self.zoom_backbone == "shared" or self.zoom,
             "--zoom-backbone own gives the zoom's second pass a backbone of its own: add --zoom 1.2, or drop it"),
            (self.class_epochs is None or (self.zoom_backbone == "own" and 1 <= self.class_epochs <= self.epochs),
             f"--class-epochs stops the class's own backbone learning early: pass 1 to --epochs {self.epochs} with "
             f"--zoom 1.2 --zoom-backbone own, or drop it"),
            (self.class_from is None or (self.zoom_backbone == "own" and self.class_epochs is None),
             "--class-from trains the class on the zoom's own backbone while the run's box stays fixed, every epoch: "
             "pass --zoom 1.2 --zoom-backbone own, without --class-epochs"),
            (self.class_epochs is None or self.schedule != "plateau",
             "--class-epochs sets the class's own schedule, which --schedule plateau would override: use cosine or "
             "constant, or drop --class-epochs"),
            (self.box_loss in BOX_LOSSES, f"unknown box loss {self.box_loss!r}: use one of {', '.join(BOX_LOSSES)}"),
            (self.box_scale == "auto" or _positive_number(self.box_scale),
             f"--box-scale {self.box_scale!r} is neither auto nor a positive number: pass e.g. auto, 0.95 or 1"),
            (self.loss_balance == "auto" or _positive_number(self.loss_balance),
             f"--loss-balance {self.loss_balance!r} is neither auto nor a positive number: pass e.g. auto or 10"),
            (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}: use one of {', '.join(SCHEDULES)}"),
            (self.normalize in NORMALIZATIONS, f"unknown --normalize {self.normalize!r}: use one of "
                                               f"{', '.join(NORMALIZATIONS)}"),
            (self.hidden > 0, "--hidden must be positive"),
            (not self.flip_tta or self.hflip > 0,
             "--flip-tta averages each image with its mirror, which the model sees in training only with --hflip: "
             "add e.g. --hflip 0.5, or drop --flip-tta"),
            (0 <= self.head_dropout < 1, "--head-dropout must lie in [0, 1), e.g. 0.2"),
            (0 <= self.ema < 1, "--ema must lie in [0, 1), e.g. 0.995 (0: off)"),
            (self.plateau_patience >= 0, "--plateau-patience must be 0 or a positive number of epochs"),
            (self.balance_batches > 0, "--balance-batches must be positive"),
            (self.select_by in SELECTIONS,
             f"unknown --select-by {self.select_by!r}: use one of {', '.join(SELECTIONS)}"),
            (0 < self.plateau_factor < 1, "--plateau-factor must lie in (0, 1)"),
            (self.backbone == "vit" or (self.layer_decay == 1 and not self.drop_path),
             "--layer-decay and --drop-path apply to ViT backbones: drop them with --backbone resnet18"),
            (not self.freeze_blocks or (self.backbone == "vit" and self.pretrained),
             "--freeze-blocks keeps pre-trained ViT blocks fixed: use --backbone vit with --pretrained, or drop it"),
            (not (shape and (self.pretrained or self.backbone != "vit")),
             f"{', '.join(shape)} shape a ViT trained from scratch: drop them with --pretrained or --backbone resnet18"),
            (self.backbone == "vit" or self.patch_size is None,
             "--patch-size applies to ViT backbones: drop it with --backbone resnet18"),
            (not self.cifar_stem or self.backbone == "resnet18", "--cifar-stem applies to --backbone resnet18 only"),
        ]
        for ok, message in checks:
            if not ok:
                raise VitkitError(message)
        self.augment_config()  # its own checks

    def augment_config(self) -> BoxAugmentConfig:
        return BoxAugmentConfig(
            hflip=self.hflip, crop_scale=tuple(self.crop_scale) if self.crop_scale else None,
            crop_ratio=tuple(self.crop_ratio), brightness=self.brightness, contrast=self.contrast,
            saturation=self.saturation,
        )

    def to_dict(self) -> dict:
        return asdict(self)


def _positive_number(text: str) -> bool:
    try:
        return 0 < float(text) < float("inf")
    except ValueError:
        return False


# -- losses and figures ----------------------------------------------------------------------


def box_losses(pred: Tensor, true: Tensor, kind: str) -> Tensor:
    """The loss of each pair of (cx, cy, w, h) boxes (..., 4) → (...): mse or smooth_l1 (β = SMOOTH_L1_BETA),
    averaged over the four coordinates, or giou (1 − GIoU)."""
    if kind == "mse":
        return (pred - true).square().mean(-1)
    if kind == "smooth_l1":
        return F.smooth_l1_loss(pred, true, beta=SMOOTH_L1_BETA, reduction="none").mean(-1)
    if kind == "giou":
        return 1 - generalized_box_iou(pred, true)
    raise VitkitError(f"unknown box loss {kind!r}: use one of {', '.join(BOX_LOSSES)}")


def box_loss(pred: Tensor, true: Tensor, kind: str) -> Tensor:
    """Mean box loss of (cx, cy, w, h) boxes (B, 4) (see `box_losses`)."""
    return box_losses(pred, true, kind).mean()


def dense_cell_loss(edges: Tensor, centres: Tensor, true: Tensor, kind: str) -> Tensor:
    """The dense head's per-cell loss: the box loss of each cell's own edges (B, cells, 4) (x1, y1, x2, y2) against
    its image's true box (B, 4) (cx, cy, w, h), averaged over every cell of the batch whose centre (cells, 2) lies
    inside its image's box (FCOS's positives; 0 if there are none, as for boxes smaller than a cell). Under torchrun
    the count is the whole global batch's, so that DDP's mean of the ranks' gradients is the gradient of one process
    (one collective per step). A mask, not indexing: no host synchronisation."""
    x1, y1, x2, y2 = cxcywh_to_xyxy(true)[:, None, :].unbind(-1)  # each (B, 1)
    cx, cy = centres[None].unbind(-1)  # each (1, cells)
    inside = ((cx > x1) & (cx < x2) & (cy > y1) & (cy < y2)).to(edges.dtype)
    losses = box_losses(xyxy_to_cxcywh(edges), true[:, None, :].expand_as(edges), kind)
    count = distributed.all_reduce_sum(inside.sum().detach())
    return (losses * inside).sum() * distributed.world()[1] / count.clamp(min=1)


def task_loss(logits: Tensor, pred: Tensor, labels: Tensor, boxes: Tensor, balance: float, kind: str,
              label_smoothing: float = 0.0) -> tuple[Tensor, Tensor, Tensor]:
    """(CE / balance + box loss, CE, box loss), in float32; the CE with `label_smoothing`."""
    ce = F.cross_entropy(logits.float(), labels, label_smoothing=label_smoothing)
    bl = box_loss(pred.float(), boxes.float(), kind)
    return ce / balance + bl, ce, bl


@torch.no_grad()
def measure_loss_balance(model: BoxModel, loader: BoxLoader, kind: str, batches: int, device: torch.device,
                         bf16: bool = False, label_smoothing: float = 0.0) -> float:
    """C = mean CE (with `label_smoothing`, as in training) / mean box loss over the first `batches` batches of epoch
    0, in eval mode (no dropout, no random draw): with it both loss terms start equal. The outputs are those the loss
    trains: one view (no mirror averaging), no box scale."""
    was_training, scale = model.training, model.box_scale
    model.eval()
    model.box_scale = 1.0
    loader.set_epoch(0)
    ce = bl = torch.zeros((), device=device)
    try:
        for _, (x, y, b) in zip(range(batches), loader):
            with autocast(device, bf16):
                logits, pred = model.single_view(x)
            _, c, l = task_loss(logits, pred, y, b, 1.0, kind, label_smoothing)
            ce, bl = ce + c, bl + l
    finally:
        model.train(was_training)
        model.box_scale = scale
    return (ce / bl.clamp(min=1e-12)).item()


@torch.inference_mode()
def predict_boxes(model: BoxModel, data: BoxDataset, mean, std, device: torch.device, batch_size: int = 256,
                  bf16: bool = False) -> tuple[Tensor, Tensor]:
    """Logits (N, classes) and boxes (N, 4) in float32 on the CPU, for every image of `data`, unaugmented, in order.
    Under torchrun every rank predicts its share and gets the whole result (so every rank must call it)."""
    was_training = model.training
    model.eval()
    logits, boxes = [], []
    part = data.subset(distributed.shard(len(data)))
    for x, _, _ in BoxLoader(part, batch_size, mean=mean, std=std, device=device):
        with autocast(device, bf16):
            out_logits, out_boxes = model(x)
        logits.append(out_logits.float())
        boxes.append(out_boxes.float())
    model.train(was_training)
    return distributed.gather_cat(torch.cat(logits)), distributed.gather_cat(torch.cat(boxes))


BOX_SCALES = torch.arange(0.8, 1.2 + 1e-9, 0.0025, dtype=torch.float64)  # the factors --box-scale auto tries
CROSS_FIT_FOLDS = 4


def fit_box_scale(pred: Tensor, true: Tensor) -> float:
    """The factor of BOX_SCALES on the predicted widths and heights that maximises the mean IoU with the true
    boxes (the smallest such factor on a tie)."""
    factors = BOX_SCALES.to(pred.dtype)
    scaled = scale_sizes(pred.unsqueeze(0).expand(len(factors), -1, -1), factors[:, None].expand(-1, len(pred)))
    mean_iou = box_iou(scaled.flatten(0, 1), true.repeat(len(factors), 1)).view(len(factors), -1).mean(1)
    return round(factors[mean_iou.argmax()].item(), 4)  # a grid point: 0.9475, not float32's 0.94749999


def cross_fitted_scales(pred: Tensor, true: Tensor, folds: int = CROSS_FIT_FOLDS, seed: int = 0) -> Tensor:
    """Per box (N,), the factor `fit_box_scale` finds on the other folds of a seeded random split in `folds`: figures
    of boxes scaled by these are out-of-sample estimates of what the factor fitted on all of them does elsewhere."""
    order = torch.randperm(len(pred), generator=torch.Generator().manual_seed(seed))
    scales = torch.empty(len(pred), dtype=pred.dtype)
    for fold in order.chunk(folds):  # a few folds: the loop is over them, not over boxes
        others = order[~torch.isin(order, fold)]
        scales[fold] = fit_box_scale(pred[others], true[others])
    return scales


def box_metrics(logits: Tensor, pred: Tensor, labels: Tensor, boxes: Tensor, balance: float, kind: str,
                prefix: str = "") -> dict[str, float]:
    """Flat figures (fractions): loss, ce, box_loss, accuracy, iou_mean and iou50/iou75/iou90, the share of images
    whose predicted box has at least that IoU with the true one (every image, whatever the predicted class)."""
    loss, ce, bl = task_loss(logits, pred, labels, boxes, balance, kind)
    iou = box_iou(pred.float(), boxes.float())
    figures = {
        "loss": loss.item(), "ce": ce.item(), "box_loss": bl.item(),
        "accuracy": (logits.argmax(1) == labels).float().mean().item(), "iou_mean": iou.mean().item(),
        **{f"iou{round(100 * t)}": (iou >= t).float().mean().item() for t in IOU_THRESHOLDS},
    }
    return {f"{prefix}{k}": v for k, v in figures.items()}


# -- data, model and checkpoints -------------------------------------------------------------


@dataclass
class BoxSplits:
    train: BoxDataset
    val: BoxDataset | None
    test: BoxDataset | None
    mean: tuple[float, ...]
    std: tuple[float, ...]


def prepare_box_data(cfg: BoxTrainConfig) -> BoxSplits:
    """Train, validation (the source's val/valid split, else --val-fraction of train) and test splits (where the
    source has one), and the normalisation."""
    size = cfg.source_size or cfg.image_size
    train = load_box_dataset(cfg.data, "train", size)
    splits = {}
    for split in ("val", "test"):
        try:
            splits[split] = load_box_dataset(cfg.data, split, size)
        except MissingSplit:
            splits[split] = None
    val = splits["val"]
    if val is None and cfg.val_fraction > 0:
        train, val = train_val_split(train, cfg.val_fraction, seed=cfg.seed)
        val.skipped = 0  # the source's skipped images are counted once, with train
    if cfg.normalize == "imagenet" or (cfg.normalize == "auto" and cfg.pretrained):
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    else:
        mean, std = channel_stats(train)
    return BoxSplits(train, val if val is not None and len(val) else None, splits["test"], mean, std)


def build_box_model(cfg: BoxTrainConfig, data: BoxDataset) -> BoxModel:
    """The backbone of `cfg` (pre-trained where asked, frozen blocks) with seed 001's two heads."""
    if cfg.backbone == "vit":
        backbone = vit_backbone(
            cfg.model, image_size=cfg.image_size, pretrained=cfg.pretrained, patch_size=cfg.patch_size,
            in_channels=data.channels, freeze=cfg.freeze_blocks, dim=cfg.dim, depth=cfg.depth, heads=cfg.heads,
            mlp_dim=cfg.mlp_dim, drop_path=cfg.drop_path,
        )
        dim = backbone.cfg.dim
    else:
        backbone, dim = resnet18_backbone(cfg.pretrained, data.channels, cfg.cifar_stem), RESNET18_FEATURES
    scale = 1.0 if cfg.box_scale == "auto" else float(cfg.box_scale)  # auto: fitted after training
    # The zoom's own backbone starts as a copy: the same pre-trained (or initial) weights and frozen blocks.
    zoom_backbone = copy.deepcopy(backbone) if cfg.zoom_backbone == "own" else None
    return BoxModel(backbone, dim, data.num_classes, cfg.hidden, cfg.head_dropout, cfg.sigmoid, cfg.box_head, scale,
                    cfg.flip_tta, cfg.region_pool, cfg.zoom, cfg.image_size, zoom_backbone)


def class_stage_config(flags: dict[str, Any]) -> BoxTrainConfig:
    """The configuration of a class stage on the run `flags["class_from"]` (see BoxTrainConfig.class_from): the
    run's own, with --epochs its --class-epochs (else its --epochs), --select-by last and the loss balance C it
    measured (so that its box loss and the stage's are on one scale); `flags` override any of them."""
    run = Path(flags["class_from"])
    if not (run / "summary.json").is_file() or not (run / "config.json").is_file():
        raise VitkitError(f"--class-from takes the folder of a finished `vitkit train-boxes` run, and {run} holds no "
                          "config.json and summary.json: pass such a folder (or finish the run with --resume)")
    saved = json.loads((run / "config.json").read_text())
    foreign = sorted(set(saved) - {f.name for f in fields(BoxTrainConfig)})
    if foreign:
        raise VitkitError(f"{run} is not a `vitkit train-boxes` run (its config has {', '.join(foreign[:3])}): pass "
                          "the folder of one")
    stage = {"epochs": saved["class_epochs"] or saved["epochs"], "class_epochs": None, "select_by": "last",
             "loss_balance": str(read_info(run / "best.safetensors")["loss_balance"])}
    return BoxTrainConfig(**{**saved, **stage, **flags})


def load_box_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[BoxModel, dict[str, Any]]:
    """The model of a box checkpoint (a .safetensors file or a run folder), in eval mode, with its metadata."""
    path = resolve_checkpoint(path)
    info = read_info(path)
    if info.get("task") != "boxes":
        raise VitkitError(f"{path} is not a box checkpoint (written by `vitkit train-boxes`): pass one")
    model = BoxModel.from_spec(info["box_model"])
    load_weights(model, load_file(str(path)), str(path))
    return model.to(device).eval(), info


def evaluate_box_model(model: BoxModel, info: dict[str, Any], data: BoxDataset, split: str, device: torch.device,
                       batch_size: int = 256, bf16: bool = False, picture: Path | None = None, samples: int = 32,
                       per_class: bool = False) -> dict[str, float]:
    """The figures of `split` (prefixed), with `per_class` also each class's accuracy (accuracy_NAME); with
    `picture`, a grid of `samples` images spread over the split, true and predicted boxes drawn, and the confusion
    matrix beside it (confusion.png), by rank 0. Under torchrun every rank must call it."""
    if data.classes != info["classes"]:
        raise VitkitError("the data's classes differ from the checkpoint's "
                          f"({class_difference(data.classes, info['classes'])}): use the data set the model was trained on")
    logits, pred = predict_boxes(model, data, info["mean"], info["std"], device, batch_size, bf16)
    prefix = f"{split}_" if split else ""
    metrics = box_metrics(logits, pred, data.labels, data.boxes, info["loss_balance"], info["box_loss"], prefix)
    if per_class:
        metrics.update({k: v for k, v in classification_metrics(logits, data.labels, data.classes, prefix).items()
                        if k.startswith(f"{prefix}accuracy_")})
    if picture is not None and samples > 0 and distributed.is_main():
        shown = torch.linspace(0, len(data) - 1, min(samples, len(data))).round().long().unique()
        plot_box_predictions(
            data.images[shown], data.boxes[shown], pred[shown], data.labels[shown].tolist(),
            logits[shown].argmax(1).tolist(), data.classes, picture, ious=box_iou(pred[shown], data.boxes[shown]).tolist(),
        )
        plot_confusion_matrix(confusion_matrix(data.labels, logits.argmax(1), data.num_classes), data.classes,
                              Path(picture).parent / "confusion.png")
    return metrics


# -- the loop --------------------------------------------------------------------------------


class BoxTrainer:
    """Owns a run folder; `fit()` trains (or resumes) to the last epoch and writes the summary.

    Under torchrun the ranks train one model with DistributedDataParallel, as `vitkit train` does: --batch-size is
    the global batch, evaluation is sharded, rank 0 alone writes the run folder."""

    def __init__(self, cfg: BoxTrainConfig, out_dir: str | Path, progress: bool = True):
        self.cfg = cfg
        self.out = Path(out_dir)
        self.progress = progress and distributed.is_main()
        self.device = distributed.setup(select_device(cfg.device))
        rank, world_size = distributed.world()
        local_batch = distributed.local_batch(cfg.batch_size)
        torch.manual_seed(cfg.seed)  # the same initial weights on every rank
        self.data = prepare_box_data(cfg)
        if cfg.batch_size > len(self.data.train):
            raise VitkitError(f"{len(self.data.train)} training images are fewer than one batch: lower --batch-size")
        if cfg.box_scale == "auto" and (self.data.val is None or len(self.data.val) < 2 * CROSS_FIT_FOLDS):
            raise VitkitError(f"--box-scale auto fits the factor on validation images, and this data has "
                              f"{len(self.data.val) if self.data.val else 0}: give it a val split (or "
                              f"--val-fraction 0.1), or pass a number such as 0.95")
        self.model = build_box_model(cfg, self.data.train).to(self.device)
        if cfg.class_from:  # the box is the run's, fixed: only the class's parameters reach the optimiser
            for name, p in self.model.named_parameters():
                if name.startswith(BOX_PARTS):
                    p.requires_grad_(False)
        # With --ema, `averaged` holds the average for evaluation and checkpoints; without, it is the model itself.
        self.ema = EMA(self.model, cfg.ema) if cfg.ema > 0 else None
        self.averaged = copy.deepcopy(self.model).requires_grad_(False) if self.ema else self.model
        # self.model stays the bare module (checkpoints, evaluation); training steps go through self.forward.
        self.forward = torch.nn.parallel.DistributedDataParallel(
            self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
        ) if world_size > 1 else self.model
        self.loader = self.train_loader(local_batch, rank, world_size)
        self.trainable_parameters = num_parameters(self.model, trainable_only=True)
        # With --class-epochs the class's parameters are groups of their own, on a schedule of that many epochs.
        self.optimizer = build_optimizer(self.model, cfg, self.device, CLASS_PARTS if cfg.class_epochs else ())
        # Per-step warmup (and cosine) from vitkit.train.optim; with `plateau` the per-step scheduler only warms up,
        # then ReduceLROnPlateau owns the rate (stepping both would let the first undo the second's drops).
        self.scheduler = build_scheduler(self.optimizer, len(self.loader), cfg, cfg.class_epochs)
        self.warmup_steps = round(cfg.warmup_epochs * len(self.loader))
        self.plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(
            self.optimizer, factor=cfg.plateau_factor, patience=cfg.plateau_patience,
        ) if cfg.schedule == "plateau" else None
        self.balance: float | None = None if cfg.loss_balance == "auto" else float(cfg.loss_balance)
        self.epoch = 0  # epochs completed
        self.best_score = (-1.0, -1.0)
        self.best_epoch = 0
        self.history: list[dict[str, Any]] = []

    def start_from_box_of(self, run: str | Path) -> None:
        """--class-from: the box (backbone and box head) of `run`'s best checkpoint into the model, and its backbone
        into the zoom's own as the class's starting point; the classifier keeps its fresh initialisation."""
        path = resolve_checkpoint(run)
        box = {k: v for k, v in load_file(str(path)).items() if k.startswith(BOX_PARTS)}
        state = self.model.state_dict()
        if box.keys() != {k for k in state if k.startswith(BOX_PARTS)} or any(
                v.shape != state[k].shape for k, v in box.items()):
            raise VitkitError(f"the backbone or box head of {path} differs from this run's: keep {run}'s backbone "
                              "and box options (--backbone, --pretrained, --patch-size, --image-size, --box-head, "
                              "--hidden)")
        state.update(box)
        state.update({"zoom_" + k: v for k, v in box.items() if k.startswith("backbone.")})
        self.model.load_state_dict(state)
        if self.ema:  # the average starts at the loaded weights
            self.ema = EMA(self.model, self.cfg.ema)
            self.averaged.load_state_dict(self.model.state_dict())

    def train_loader(self, batch_size: int, rank: int = 0, world_size: int = 1) -> BoxLoader:
        """This rank's share of the shuffled, augmented training batches."""
        return BoxLoader(
            self.data.train, batch_size, mean=self.data.mean, std=self.data.std, device=self.device, shuffle=True,
            drop_last=len(self.data.train) >= 2 * self.cfg.batch_size, augment=BoxAugment(self.cfg.augment_config()),
            seed=self.cfg.seed, rank=rank, world_size=world_size,
        )

    def model_info(self, metrics: dict[str, Any]) -> dict[str, Any]:
        """What a checkpoint needs to be used on its own."""
        spec = self.model.spec()
        return {
            "task": "boxes",
            # Not "vit"/"resnet18": commands that need a plain classifier refuse this checkpoint by its arch.
            "arch": f"box-{self.cfg.backbone}",
            "box_model": spec,
            "backbone": self.cfg.backbone,
            "in_channels": self.data.train.channels,
            "pretrained": self.cfg.pretrained,
            "classes": self.data.train.classes,
            "mean": list(self.data.mean),
            "std": list(self.data.std),
            "image_size": self.cfg.source_size or self.cfg.image_size,  # the size of the images the model takes
            "data": self.cfg.data,
            "box_loss": self.cfg.box_loss,
            "loss_balance": self.balance,
            # The run scores itself under bf16 autocast on CUDA (--bf16): `vitkit eval` and `predict` do the same,
            # so that they reproduce summary.json.
            "eval_bf16": self.cfg.bf16,
            "epoch": self.epoch,
            "metrics": metrics,
        }

    def save(self, metrics: dict[str, Any], is_best: bool) -> None:
        state = {
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "ema": self.ema.shadow if self.ema else None,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "plateau": self.plateau.state_dict() if self.plateau else None,
            "rng": rng_state(self.device),
            "balance": self.balance,
            "best_score": torch.tensor(self.best_score, dtype=torch.float64),
            "best_epoch": self.best_epoch,
            "history": json.dumps(self.history),
        }
        save_run(self.out, state, self.averaged.state_dict(), self.model_info(metrics), self.history, is_best)

    def restore(self) -> None:
        state = load_state(self.out / "state.pt")
        load_weights(self.model, state["model"], str(self.out / "state.pt"))
        if self.ema:
            self.ema.shadow = {k: v.to(self.device) for k, v in state["ema"].items()}
            self.averaged.load_state_dict(self.ema.shadow)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.plateau:
            self.plateau.load_state_dict(state["plateau"])
        restore_rng_state(state["rng"], self.device)
        self.balance = state["balance"]
        self.epoch = state["epoch"]
        self.best_score = tuple(state["best_score"].tolist())
        self.best_epoch = state["best_epoch"]
        self.history = json.loads(state["history"])

    def train_epoch(self) -> dict[str, float]:
        cfg, loader = self.cfg, self.loader
        loader.set_epoch(self.epoch)
        self.model.train()
        if cfg.class_from:  # the fixed box predicts as in evaluation: no dropout, no batch-norm statistics updated
            self.model.backbone.eval()
            self.model.regressor.eval()
        if cfg.class_epochs is not None and distributed.world()[1] == 1:
            # Past --class-epochs the class's groups have a rate of 0; without their gradients a step also skips the
            # second pass's backward. (Under torchrun they keep them: DDP expects the parameters it was built with.)
            learning = self.epoch < cfg.class_epochs
            for group in self.optimizer.param_groups:
                if group.get("apart"):
                    for p in group["params"]:
                        p.requires_grad_(learning)
        # loss, ce, box loss, cell loss, correct, IoU, images: summed on the device, no host synchronisation per step.
        sums = torch.zeros(7, device=self.device)
        start = time.perf_counter()
        bar = tqdm(loader, desc=f"epoch {self.epoch + 1}/{cfg.epochs}", disable=not self.progress, leave=False)
        for x, y, b in bar:
            with autocast(self.device, cfg.bf16, cpu=cfg.cpu_bf16):
                logits, pred, *cells = self.forward(x, cells=cfg.cell_loss > 0)
            loss, ce, bl = task_loss(logits, pred, y, b, self.balance, cfg.box_loss, cfg.label_smoothing)
            cl = dense_cell_loss(*cells, b, cfg.box_loss) if cells else torch.zeros((), device=self.device)
            loss = loss + cfg.cell_loss * cl
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            if self.ema:
                self.ema.update(self.model)
            if self.plateau is None or self.scheduler.last_epoch < self.warmup_steps:
                self.scheduler.step()
            with torch.no_grad():
                n = len(x)
                sums[:6] += torch.stack([loss * n, ce * n, bl * n, cl * n, (logits.argmax(1) == y).sum(),
                                         box_iou(pred, b).sum()])
                sums[6] += n
        # Summed over the ranks in one collective: the figures of the global batches.
        *totals, seen = distributed.all_reduce_sum(sums).tolist()
        loss, ce, bl, cl, correct, iou = (t / seen for t in totals)
        elapsed = time.perf_counter() - start
        if not torch.isfinite(torch.tensor(loss)):
            raise VitkitError(
                f"the training loss became {loss} in epoch {self.epoch + 1}: lower --lr or set --grad-clip 1.0, or "
                f"resume from the last good epoch ({self.epoch}) with `vitkit train-boxes --resume {self.out}`"
            )
        cell = {"train_cell_loss": cl} if cfg.cell_loss else {}
        apart = [g["lr"] for g in self.optimizer.param_groups if g.get("apart")]
        class_lr = {"class_lr": apart[0]} if apart else {}  # with --class-epochs: the class's peak rate; lr is the box's
        return {"train_loss": loss, "train_ce": ce, "train_box_loss": bl, **cell, "train_accuracy": correct,
                "train_iou_mean": iou, "lr": self.optimizer.param_groups[0]["lr"], **class_lr, "epoch_seconds": elapsed,
                "images_per_second": seen / elapsed}

    def evaluate(self, model: BoxModel, data: BoxDataset, split: str, picture: Path | None = None) -> dict[str, float]:
        return evaluate_box_model(model, self.model_info({}), data, split, self.device, self.cfg.eval_batch_size,
                                  self.cfg.bf16, picture)

    def fit(self, resume: bool = False) -> dict[str, Any]:
        """Trains to the last epoch (measuring the loss balance first where it is `auto`) and writes the summary."""
        if resume:
            self.restore()
        else:
            if self.cfg.class_from:
                self.start_from_box_of(self.cfg.class_from)
            if distributed.is_main():
                self.out.mkdir(parents=True, exist_ok=True)
                write_json(self.out / "config.json", self.cfg.to_dict())
        if self.balance is None:
            # Measured by every rank on the first global batches, so all ranks (and a single process) agree on C.
            self.balance = measure_loss_balance(self.model, self.train_loader(self.cfg.batch_size), self.cfg.box_loss,
                                                self.cfg.balance_batches, self.device, self.cfg.bf16,
                                                self.cfg.label_smoothing)
            if self.progress:
                tqdm.write(f"loss balance C = {self.balance:.4g}: CE/C equals the {self.cfg.box_loss} box loss at the start")
        started = time.perf_counter()
        while self.epoch < self.cfg.epochs:
            row = {"epoch": self.epoch + 1, **self.train_epoch()}
            if self.ema:
                self.averaged.load_state_dict(self.ema.shadow)
            if self.data.val is not None:
                keep = ("loss", "ce", "box_loss", "accuracy", "iou_mean", "iou50", "iou75", "iou90")
                row.update({f"val_{k}": v for k, v in self.evaluate(self.averaged, self.data.val, "").items() if k in keep})
            self.epoch += 1
            self.history.append(row)
            if self.plateau is not None and self.scheduler.last_epoch >= self.warmup_steps:
                self.plateau.step(row.get("val_loss", row["train_loss"]))
            # Best by validation accuracy then mean IoU (or the reverse, --select-by iou); with --select-by last or
            # without validation data the latest weights are the result.
            score = (row.get("val_accuracy", 0.0), row.get("val_iou_mean", 0.0))
            score = score[::-1] if self.cfg.select_by == "iou" else score
            is_best = self.data.val is None or self.cfg.select_by == "last" or score > self.best_score
            if is_best:
                self.best_score, self.best_epoch = score, self.epoch
            self.save({k: v for k, v in row.items() if k.startswith(("train_", "val_"))}, is_best)
            if self.progress:
                tqdm.write(f"epoch {self.epoch}/{self.cfg.epochs} " + " ".join(
                    f"{k}={v:.4g}" for k, v in row.items() if k != "epoch" and not k.endswith(("_ce", "box_loss"))))
        if distributed.is_main():
            plot_learning_curves(self.history, self.out / "curves.png", metrics=("loss", "accuracy", "iou_mean"))
        return self.finish(time.perf_counter() - started)

    def finish(self, seconds: float) -> dict[str, Any]:
        """Fits --box-scale auto, evaluates the best checkpoint on the validation and test data and writes
        summary.json, boxes.png and confusion.png."""
        model, info = load_box_model(self.out / "best.safetensors", self.device)
        cfg = self.cfg
        summary: dict[str, Any] = {
            "task": "boxes",
            "data": cfg.data,
            "backbone": cfg.backbone,
            "model": cfg.pretrained or (cfg.model if cfg.backbone == "vit" else "resnet18"),
            "parameters": num_parameters(model),
            "trainable_parameters": self.trainable_parameters,
            "image_size": cfg.image_size,
            "source_size": cfg.source_size or cfg.image_size,
            "box_loss": cfg.box_loss,
            "loss_balance": self.balance,
            "class_from": cfg.class_from,
            "device": str(self.device),
            "epochs": cfg.epochs,
            "best_epoch": self.best_epoch,
            "train_seconds_this_session": round(seconds, 2),
            "train_images_per_second": self.history[-1]["images_per_second"],
            "processes": distributed.world()[1],
        }
        if cfg.box_scale == "auto":
            summary.update(self.calibrate_box_scale(model, info))
        for split, data in (("val", self.data.val), ("test", self.data.test)):
            if data is not None:
                picture = self.out / "boxes.png" if split == "test" or self.data.test is None else None
                summary.update(self.evaluate(model, data, split, picture))
                summary[f"{split}_images"] = len(data)
        summary["skipped_images_without_box"] = self.data.train.skipped + sum(
            d.skipped for d in (self.data.val, self.data.test) if d is not None)
        summary["box_scale"] = model.box_scale
        summary["iou_measured_on"] = IOU_NOTE
        summary["checkpoint"] = str(self.out / "best.safetensors")
        if distributed.is_main():
            write_json(self.out / "summary.json", summary)
        return summary

    def calibrate_box_scale(self, model: BoxModel, info: dict[str, Any]) -> dict[str, float]:
        """--box-scale auto: the factor fitted on the validation images, set on `model` and written into
        best.safetensors; returns the cross-fitted validation figures."""
        model.box_scale = 1.0  # a resumed finished run's checkpoint holds the factor already: fit on raw sizes
        logits, pred = predict_boxes(model, self.data.val, info["mean"], info["std"], self.device,
                                     self.cfg.eval_batch_size, self.cfg.bf16)
        true = self.data.val.boxes
        model.box_scale = fit_box_scale(pred, true)
        crossed = scale_sizes(pred, cross_fitted_scales(pred, true, seed=self.cfg.seed))
        figures = box_metrics(logits, crossed, self.data.val.labels, true, self.balance, self.cfg.box_loss,
                              "val_cross_fitted_")
        if distributed.is_main():
            best = self.out / "best.safetensors"
            save_model(best, model.state_dict(), {**read_info(best), "box_model": model.spec()})
        distributed.barrier()
        return {k: v for k, v in figures.items() if "iou" in k}


def train_boxes(cfg: BoxTrainConfig, out_dir: str | Path, resume: bool = False, progress: bool = True) -> dict[str, Any]:
    """Trains `cfg` into `out_dir` (or resumes the run there) and returns the summary."""
    return BoxTrainer(cfg, out_dir, progress).fit(resume)
