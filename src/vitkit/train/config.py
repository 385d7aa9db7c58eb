"""The training configuration: one dataclass, named recipes, and the merge order
defaults < recipe < config file < command-line flags."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from vitkit.errors import VitkitError


def option(default: Any, help: str) -> Any:
    """A dataclass field with its command-line help text."""
    return field(default=default, metadata={"help": help})


def shared_checks(cfg: Any) -> list[tuple[bool, str]]:
    """(condition, message) checks of the options TrainConfig and BoxTrainConfig share, named as flags."""
    shape = [n for n in ("patch_size", "dim", "depth", "heads", "mlp_dim") if getattr(cfg, n) is not None
             and getattr(cfg, n) <= 0]
    return [
        (cfg.epochs > 0, "--epochs must be positive"),
        (cfg.image_size is None or cfg.image_size > 0, "--image-size must be positive"),
        (cfg.batch_size > 0, "--batch-size must be positive"),
        (cfg.eval_batch_size > 0, "--eval-batch-size must be positive"),
        (cfg.lr > 0, "--lr must be positive"),
        (cfg.weight_decay >= 0, "--weight-decay must be 0 (off) or positive"),
        (cfg.warmup_epochs >= 0, "--warmup-epochs must be 0 (no warmup) or positive"),
        (cfg.grad_clip >= 0, "--grad-clip must be 0 (off) or a positive gradient norm"),
        (0 <= cfg.momentum < 1, "--momentum must lie in [0, 1), e.g. 0.9"),
        (0 <= cfg.label_smoothing < 1, "--label-smoothing must lie in [0, 1), e.g. 0.1"),
        (0 <= cfg.val_fraction < 1, "--val-fraction must lie in [0, 1)"),
        (cfg.optimizer in ("adamw", "sgd"), f"unknown optimizer {cfg.optimizer!r}: use adamw or sgd"),
        (0 < cfg.layer_decay <= 1, "--layer-decay must lie in (0, 1] (1: off)"),
        (cfg.freeze_blocks >= 0, "--freeze-blocks must be 0 (none) or a positive number of blocks"),
        (0 <= (cfg.drop_path or 0) < 1, "--drop-path must lie in [0, 1), e.g. 0.1"),
        (cfg.bf16 or not cfg.cpu_bf16, "--cpu-bf16 extends --bf16 to the CPU: drop --no-bf16 or --cpu-bf16"),
        (not shape, f"{', '.join('--' + n.replace('_', '-') for n in shape)} must be positive"),
    ]


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as config.json in the run folder."""

    # data
    data: str = option("digits", "data set: digits, cifar10, cifar100, an ImageFolder directory or a .tar.gz of one")
    data_root: str | None = option(None, "where CIFAR archives live (default ~/.cache/vitkit/datasets or $VITKIT_DATA)")
    download: bool = option(False, "download CIFAR when it is missing (checksum verified)")
    image_size: int | None = option(None, "resize ImageFolder images to this size (default: the model's; resnet18: "
                                        "their own)")
    val_fraction: float = option(0.1, "share of the training split held out for validation (seed 003: 0.1)")
    # model
    model: str = option("vit_digits", "model preset (see `vitkit info --presets`), or resnet18 (torchvision's CNN, with "
                                    "the CIFAR stem on images of at most 64 pixels; the ViT shape options do not apply)")
    patch_size: int | None = option(None, "override the preset's patch size")
    dim: int | None = option(None, "override the preset's width")
    depth: int | None = option(None, "override the preset's number of blocks")
    heads: int | None = option(None, "override the preset's attention heads")
    mlp_dim: int | None = option(None, "override the preset's MLP hidden width")
    pos_embed: str | None = option(None, "position embeddings: learned, sincos1d, sincos2d")
    pool: str | None = option(None, "head input: cls (class token) or mean (mean of patch tokens)")
    dropout: float | None = option(None, "dropout rate")
    drop_path: float | None = option(None, "stochastic depth rate of the last block")
    pretrained: str | None = option(None, "timm/HF weights: a local file or a hub name (e.g. "
                                        "deit_tiny_patch16_224.fb_in1k); the weights' shape overrides the "
                                        "preset's, which then only gives defaults")
    spt: bool = option(False, "Shifted Patch Tokenization (Lee et al. 2021): each patch also sees the image shifted by "
                              "half a patch in the 4 diagonal directions (5x wider patch projection); from scratch only")
    lsa: bool = option(False, "Locality Self-Attention (Lee et al. 2021): a learned softmax temperature per head and no "
                              "attention of a token to itself; from scratch only")
    freeze_blocks: int = option(0, "with --pretrained: freeze the patch/position embeddings, class token and the "
                                 "first N blocks (seed 001: 6; 0: none)")
    # optimisation
    epochs: int = option(60, "training epochs")
    batch_size: int = option(128, "batch size")
    optimizer: str = option("adamw", "adamw or sgd")
    lr: float = option(1e-3, "peak learning rate")
    weight_decay: float = option(0.05, "weight decay (not applied to norms, biases and embeddings)")
    momentum: float = option(0.9, "SGD momentum (Nesterov)")
    schedule: str = option("cosine", "cosine (after warmup), step, multistep or constant")
    warmup_epochs: float = option(5.0, "linear warmup length in epochs")
    step_size: int = option(10, "step schedule: epochs between decays (seed 000: 10)")
    milestones: list[int] = option((100, 150), "multistep schedule: epochs of decay (seed 003: 100,150)")
    gamma: float = option(0.1, "decay factor of the step and multistep schedules")
    label_smoothing: float = option(0.0, "label smoothing of the cross-entropy")
    grad_clip: float = option(0.0, "clip the gradient norm to this value (0: off)")
    layer_decay: float = option(1.0, "layer-wise learning-rate decay: block i (from 0) of L learns at lr·decay^(L-i), "
                                   "the embeddings at lr·decay^(L+1) (1: off; e.g. 0.65 for fine-tuning)")
    ema: float = option(0.0, "decay of an exponential moving average of the weights (0: off; e.g. 0.999)")
    bf16: bool = option(True, "bfloat16 autocast on CUDA (ignored on CPU)")
    cpu_bf16: bool = option(False, "bfloat16 autocast of the training steps on the CPU too: on one with native "
                                   "bfloat16 (AVX512-BF16, AMX) cifar10-smoothing-deit's epochs run 1.4x faster, a "
                                   "width-128 ViT's steps 1.2x, tiny models' slower; evaluation stays float32")
    compile: bool = option(False, "torch.compile the model")
    tta_flip: bool = option(False, "validation and test accuracy of the mean logits of each image and its mirror image")
    # augmentation (batched on the device)
    hflip: float = option(0.0, "horizontal flip probability")
    crop_padding: int = option(0, "random crop with this padding (0: off)")
    resized_crop_scale: list[float] | None = option(None, "RandomResizedCrop area range, e.g. 0.8,1.0")
    resized_crop_ratio: list[float] = option((0.75, 4 / 3), "RandomResizedCrop aspect-ratio range (seed 003: 0.9,1.1)")
    trivial_augment: bool = option(False, "TrivialAugment: one random op of random strength per image")
    random_erasing: float = option(0.0, "random erasing probability")
    mixup: float = option(0.0, "mixup alpha (0: off)")
    cutmix: float = option(0.0, "cutmix alpha (0: off)")
    patch_dropout: float = option(0.0, "PatchDropout (Liu et al. 2022): share of the patch tokens each training "
                                       "image drops, a random subset per image (class token kept; "
                                       "evaluation sees all; steps cost about 1 − p; 0: off; e.g. "
                                       "0.25-0.5; ViTs only, not with --ablation)")
    # training on ablations (the base model of a smoothed classifier, `vitkit certify`)
    ablation: str | None = option(None, "train on one random ablation per image: column, row or block (default: off)")
    ablation_size: int = option(4, "ablation band width b in pixels (columns/rows kept, or the block side)")
    ablation_stride: int = option(1, "ablation start positions every s pixels")
    # adversarial training (Madry et al. 2018, TRADES); `vitkit attack` measures the robustness it buys
    adv: str | None = option(None, "adversarial training: pgd or fgsm examples in the batch (Madry et al.), or trades "
                                 "(clean batch + β·KL to the prediction on a PGD example; Zhang et al. 2019)")
    eps: float = option(8 / 255, "adversarial training budget, for pixels in [0, 1] (e.g. 8/255)")
    adv_norm: str = option("linf", "adversarial training budget norm: linf or l2")
    adv_steps: int = option(7, "PGD steps per batch")
    adv_step_size: float = option(2 / 255, "PGD step size, for pixels in [0, 1] (e.g. 2/255)")
    adv_mix: float = option(0.5, "pgd, fgsm: share of each batch kept clean (seed 002's half-half: 0.5; Madry et al.: 0); "
                               "left at its default by trades, which trains on whole clean batches")
    trades_beta: float = option(6.0, "trades: weight β of the KL term (Zhang et al.: 6; a higher β gives up clean "
                                   "accuracy for robustness)")
    fat_tau: int | None = option(None, "pgd: Friendly Adversarial Training (Zhang et al. 2020): an image's PGD stops "
                                       "where it is misclassified for the (τ+1)-th time (the paper: 0 to 3), which "
                                       "keeps more clean accuracy (default: every step)")
    # distillation from a trained teacher (Hinton et al. 2015; DeiT, Touvron et al. 2021); see vitkit.train.distill
    teacher: str | None = option(None, "distil from this vitkit checkpoint or run folder (a ViT or a ResNet trained on the "
                                     "same classes and image size)")
    distill: str | None = option(None, "soft: T²·KL to the teacher's softened output; hard: DeiT's distillation token, "
                                     "trained on the teacher's top class (default with --teacher: soft)")
    distill_alpha: float = option(0.5, "weight α of the distillation term: (1 − α)·CE(labels) + α·term (DeiT hard: 0.5)")
    distill_temperature: float = option(3.0, "soft: temperature T of both softmaxes (DeiT: 3)")
    # run
    seed: int = option(0, "random seed (data order, augmentation, initialisation)")
    device: str = option("auto", "cuda, mps, cpu or auto")
    eval_batch_size: int = option(512, "batch size for validation and test")
    log_every: int = option(0, "progress-bar refresh in steps (0: automatic)")

    def __post_init__(self) -> None:
        self.milestones = [int(m) for m in self.milestones]
        self.resized_crop_ratio = [float(r) for r in self.resized_crop_ratio]
        if self.resized_crop_scale is not None:
            self.resized_crop_scale = [float(s) for s in self.resized_crop_scale]
        if self.teacher and self.distill is None:
            self.distill = "soft"
        # None (and False for the on/off options): not given.
        given = [n for n in VIT_OPTIONS if getattr(self, n) is not None and getattr(self, n) is not False]
        vit_only = [f"--{n.replace('_', '-')}" for n in given]
        checks = shared_checks(self) + [
            (self.schedule in SCHEDULES, f"unknown schedule {self.schedule!r}: use one of {', '.join(SCHEDULES)}"),
            (self.step_size > 0 and self.gamma > 0, "--step-size and --gamma must be positive"),
            (self.resized_crop_scale is None or len(self.resized_crop_scale) == 2,
             "--resized-crop-scale takes two values, lo,hi: e.g. 0.8,1.0"),
            (len(self.resized_crop_ratio) == 2, "--resized-crop-ratio takes two values, lo,hi: e.g. 0.9,1.1"),
            (0 <= (self.dropout or 0) < 1, "--dropout must lie in [0, 1), e.g. 0.1"),
            (0 <= self.ema < 1, "--ema must lie in [0, 1)"),
            (self.log_every >= 0, "--log-every must be 0 (automatic) or a positive number of steps"),
            (not self.pretrained or not (self.spt or self.lsa),
             "--spt and --lsa change the patch embedding and attention of a plain ViT, which timm/Hugging Face weights "
             "do not have: train from scratch (drop --pretrained), or drop --spt/--lsa"),
            (self.pretrained or not self.freeze_blocks,
             "--freeze-blocks keeps pre-trained blocks fixed: give --pretrained weights, or drop it"),
            (self.ablation in (None, "column", "row", "block"),
             f"unknown ablation {self.ablation!r}: use column, row or block"),
            (self.adv in (None, "pgd", "fgsm", "trades"),
             f"unknown adversarial attack {self.adv!r}: use pgd, fgsm or trades"),
            (self.adv_norm in ("linf", "l2"), f"unknown --adv-norm {self.adv_norm!r}: use linf or l2"),
            (self.eps > 0 and self.adv_steps > 0 and self.adv_step_size > 0,
             "--eps, --adv-steps and --adv-step-size must be positive"),
            (0 <= self.adv_mix < 1, "--adv-mix (the share of each batch kept clean) must lie in [0, 1)"),
            # The default cannot be told from an explicit 0.5, which is therefore ignored (see the help).
            (self.adv != "trades" or self.adv_mix == 0.5,
             "--adv-mix does not apply to --adv trades (it trains on whole clean batches): leave it out, "
             "or use --adv pgd for a clean/adversarial mix"),
            (0 <= self.trades_beta < float("inf"), "--trades-beta must be a finite non-negative weight, e.g. 6"),
            (self.fat_tau is None or (self.adv == "pgd" and self.fat_tau >= 0),
             "--fat-tau stops the PGD of --adv pgd early: give a τ ≥ 0 with --adv pgd, or drop it"),
            (self.model != "resnet18" or not vit_only,
             f"{', '.join(vit_only)} only apply to ViTs, not to --model resnet18: drop them"),
            (self.model != "resnet18" or self.layer_decay == 1,
             "--layer-decay is layer-wise decay over a ViT's blocks, not --model resnet18: drop it"),
            (self.distill in (None, "soft", "hard"), f"unknown --distill {self.distill!r}: use soft or hard"),
            (self.distill is None or self.teacher,
             f"--distill {self.distill} learns from a teacher: pass --teacher CHECKPOINT (a vitkit run folder or "
             ".safetensors, e.g. of the cifar10-resnet18-teacher recipe)"),
            (self.distill != "hard" or self.model != "resnet18",
             "--distill hard trains a ViT's distillation token, which a ResNet has not: use --distill soft"),
            (self.distill != "hard" or not self.ablation,
             "--distill hard does not combine with --ablation (the ablated forward has one head): use --distill soft"),
            (0 <= self.distill_alpha <= 1, "--distill-alpha must lie in [0, 1] (the weight of the distillation term)"),
            (0 < self.distill_temperature < float("inf"), "--distill-temperature must be positive, e.g. 3"),
            (0 <= self.patch_dropout < 1,
             "--patch-dropout (the share of patch tokens dropped per training image) must lie in [0, 1), e.g. 0.5"),
            (self.model != "resnet18" or not self.patch_dropout,
             "--patch-dropout drops a ViT's patch tokens, which --model resnet18 has not: drop it"),
            (not (self.patch_dropout and self.ablation),
             "--patch-dropout does not combine with --ablation (training on ablations already drops the masked "
             "tokens): use one of them"),
        ]
        for ok, message in checks:
            if not ok:
                raise VitkitError(message)

    def to_dict(self) -> dict:
        return asdict(self)


SCHEDULES = ("cosine", "step", "multistep", "constant")
# Options that shape a ViT and mean nothing for --model resnet18.
VIT_OPTIONS = ("patch_size", "dim", "depth", "heads", "mlp_dim", "pos_embed", "pool", "dropout", "drop_path", "pretrained",
               "spt", "lsa")

# Named recipes: documented sets of overrides of the defaults above.
RECIPES: dict[str, dict[str, Any]] = {
    # The embedded default: scikit-learn's 8×8 digits, under a minute on a 2-core CPU. Measured choices:
    # mixup beats pixel shifts here (a 1-pixel crop moves an 8-pixel digit by 12%), lr 5e-4 beats 2e-3.
    "digits": dict(
        data="digits", model="vit_digits", epochs=80, batch_size=64, lr=5e-4, weight_decay=0.1,
        warmup_epochs=3, mixup=0.2, label_smoothing=0.1, val_fraction=0.1,
    ),
    # Seed 003's set-up: CIFAR-10, flip + RandomResizedCrop(0.8-1.0, 0.9-1.1), MultiStepLR(100, 150).
    "cifar10-seed003": dict(
        data="cifar10", model="vit_tiny_32", epochs=200, batch_size=128, optimizer="adamw", lr=1e-3,
        weight_decay=0.0, schedule="multistep", milestones=[100, 150], gamma=0.1, warmup_epochs=0,
        hflip=0.5, resized_crop_scale=[0.8, 1.0], resized_crop_ratio=[0.9, 1.1],
    ),
    # The fast plain-ViT recipe (issue 7): Lee et al.'s 9-block width-192 ViT on 4×4 patches, no convolution,
    # trained on all 50,000 images (no validation split: the last epoch is the result) in batches of 512 with bf16
    # and torch.compile on a GPU; TrivialAugment, flip, 4-pixel crops, label smoothing, stochastic depth, and the
    # mean of each test image and its mirror image. Measured on an H100 (README): Lee et al.'s heavier set
    # (+ mixup 0.8, cutmix 1.0, random erasing 0.25) over 100 epochs reached only 72.2% in 249 s, against 77.0% for
    # this one in 50 epochs: in a few thousand steps the extra regularisation costs more than it gives.
    "cifar10-fast": dict(
        data="cifar10", model="vit_lite_32", val_fraction=0.0, epochs=50, batch_size=512, lr=2e-3,
        weight_decay=0.05, warmup_epochs=5, label_smoothing=0.1, drop_path=0.1, hflip=0.5, crop_padding=4,
        trivial_augment=True, compile=True, tta_flip=True, eval_batch_size=1024,
    ),
    # A fast CNN teacher: ResNet-18 with the CIFAR stem, SGD (Nesterov) at lr 0.1 per 128 images scaled to the
    # batch of 512, wd 5e-4, label smoothing 0.1, flip + 4-pixel crop, cosine after a 2-epoch warmup, bf16 and
    # torch.compile on a GPU; all 50,000 images (the last epoch is the result). Aims at ≥ 94% on CIFAR-10 in 30
    # epochs; `--epochs 12` measured 87.6% in 61 s on an H100 (README).
    "cifar10-resnet18-teacher": dict(
        data="cifar10", model="resnet18", val_fraction=0.0, epochs=30, batch_size=512, optimizer="sgd", lr=0.4,
        momentum=0.9, weight_decay=5e-4, warmup_epochs=2, label_smoothing=0.1, hflip=0.5, crop_padding=4,
        compile=True, eval_batch_size=1024,
    ),
    # The base model of a smoothed ViT, from scratch at 32×32: one random column ablation of width 4 per image
    # (seed 000's certificate setting), fully masked tokens dropped (about 4.5× cheaper steps than whole images).
    # Certify with `vitkit certify RUN --patch-size 5`. Measured on CPU scaled down (README); GPU figures pending.
    "cifar10-smoothing": dict(
        data="cifar10", model="vit_lite_32", epochs=100, batch_size=512, lr=2e-3, weight_decay=0.05,
        warmup_epochs=5, hflip=0.5, crop_padding=4, label_smoothing=0.1, ablation="column", ablation_size=4,
    ),
    # The base model of a smoothed ViT from ImageNet weights at CIFAR's own 32×32 (issue 3): DeiT-Ti with its
    # 16×16 patch projection resampled to 4×4 patches (an 8×8 grid, position embeddings resampled), fine-tuned on
    # one random column ablation of width 4 per image with layer-wise lr decay, no stochastic depth (one column is
    # regularisation enough: the model underfits). Where the paper upsamples to 224 px
    # (b = 28 of 224), this keeps seed 000's b = 4 of 32 and a step sees 9 or 17 tokens instead of 29-43: about
    # 2.5 min per epoch on a 2-core CPU. The weights come from the hub when online, or `--pretrained FILE`.
    # Layer decay 0.9: the lower layers, trained on whole 224-px images, must adapt most to single 4-pixel columns.
    # Measured on the 2-core CPU (JPEG copy, 15 epochs, 37-39 min of training): standard / smoothed / certified 5×5
    # accuracy 79.4 / 76.1 / 45.4% (--cpu-bf16), against 80.5 / 74.3 / 43.1% with layer decay 0.75 (float32; 30 epochs:
    # 81.8 / 77.0 / 45.6%) and 53.9 / 59.8 / 31.3% for a ViT from scratch after 71 min (README). On a CPU with native
    # bfloat16, --cpu-bf16 makes an epoch 1.4x faster.
    "cifar10-smoothing-deit": dict(
        data="cifar10", pretrained="deit_tiny_patch16_224.fb_in1k", patch_size=4, epochs=15, batch_size=128,
        lr=6e-4, layer_decay=0.9, drop_path=0.0, warmup_epochs=1, weight_decay=0.05, hflip=0.5, crop_padding=4,
        label_smoothing=0.1, val_fraction=0.02, ablation="column", ablation_size=4,
    ),
    # Seed 000's smoothing recipe for the base model: SGD lr 0.01, wd 5e-4, x0.1 every 10 epochs, batch 128.
    "cifar10-seed000": dict(
        data="cifar10", model="vit_tiny_32", epochs=30, batch_size=128, optimizer="sgd", lr=0.01,
        weight_decay=5e-4, schedule="step", step_size=10, gamma=0.1, warmup_epochs=0, hflip=0.5, crop_padding=4,
    ),
}

# cifar10-fast sized for a 2-core CPU and a 30-minute budget: a 0.84M-parameter ViT (width 128, 6 blocks, 4×4
# patches) with Lee et al.'s shifted-patch tokens and locality self-attention (+4.7 points over the plain ViT in
# 8 CPU epochs, README), batches of 128, no torch.compile (its compile time is minutes of a 30-minute CPU budget),
# and PatchDropout 0.5: each training image keeps half its patch tokens, so a step costs half and 24 epochs fit
# where 12 did (measured on the CPU at equal time: 63.9% with all tokens for 12 epochs, 70.3% with half for 24).
RECIPES["cifar10-cpu"] = {
    **RECIPES["cifar10-fast"], "dim": 128, "depth": 6, "heads": 4, "mlp_dim": 256, "spt": True, "lsa": True,
    "patch_dropout": 0.5, "epochs": 24, "batch_size": 128, "warmup_epochs": 2, "compile": False,
    "eval_batch_size": 512,
}

# The paper's set-up for the same base model (Salman et al.): CIFAR-10 upsampled to 224 px, DeiT-Ti's own 16×16
# patches and position embeddings (nothing resampled), seed 000's setting scaled ×7: columns of b = 28, crops padded
# by 28; certify with `vitkit certify RUN --patch-size 35` (5×5 scaled ×7). A GPU recipe: a step sees 29-43 tokens.
# Measured on an H200 (JPEG copy, README): 20 epochs in 291 s of training, standard / smoothed / certified 35×35
# accuracy 86.0 / 81.3 / 48.2% (4 epochs on an H100: 80.9 / 75.1 / 41.2%). Layer decay 0.9, as at 32 px, was ahead
# of this 0.75 at every epoch from the 7th (48.6% certified after 13 of 18 epochs): the lever for the next GPU run.
RECIPES["cifar10-smoothing-deit224"] = {
    **RECIPES["cifar10-smoothing-deit"], "image_size": 224, "patch_size": 16, "ablation_size": 28, "crop_padding": 28,
    "epochs": 20, "batch_size": 256, "lr": 5e-4, "layer_decay": 0.75,
}

# cifar10-fast with DeiT's hard distillation (better than soft in DeiT): a distillation token trained on the
# teacher's top class beside the class token trained on the labels, the prediction the mean of their heads. The
# teacher (e.g. a cifar10-resnet18-teacher run) is the user's: `--teacher RUN_DIR`. Each step adds the teacher's
# forward. Measured on an H100 with a 12-epoch teacher (87.6%): 80.4% after 45 of 50 epochs, against 76.9%
# for cifar10-fast at the same epoch (README).
RECIPES["cifar10-fast-distilled"] = {**RECIPES["cifar10-fast"], "distill": "hard"}


def config_fields() -> list:
    return list(fields(TrainConfig))


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A YAML or JSON mapping of TrainConfig fields (dashes or underscores)."""
    path = Path(path)
    if not path.is_file():
        raise VitkitError(f"config file {path} does not exist: check the path given to --config")
    text = path.read_text()
    try:
        if path.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            import yaml

            data = yaml.safe_load(text)
    except Exception as e:  # a parse error is the user's file, not our bug
        raise VitkitError(f"cannot parse config file {path}: {e}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise VitkitError(f"config file {path} must hold a mapping of option names to values")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def build_config(recipe: str | None = None, file_values: dict | None = None, flag_values: dict | None = None) -> TrainConfig:
    """defaults < recipe < config file < flags; unknown keys are an error naming the known ones."""
    values: dict[str, Any] = {}
    if recipe is not None:
        if recipe not in RECIPES:
            raise VitkitError(f"unknown recipe {recipe!r}: choose one of {', '.join(RECIPES)}")
        values.update(RECIPES[recipe])
    for source in (file_values or {}, flag_values or {}):
        known = {f.name for f in fields(TrainConfig)}
        unknown = sorted(set(source) - known - {"recipe"})
        if unknown:
            raise VitkitError(f"unknown training option(s) {unknown}: see `vitkit train --help`")
        values.update({k: v for k, v in source.items() if k != "recipe"})
    return TrainConfig(**values)
