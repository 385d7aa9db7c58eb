"""Certificates from vote counts, and certification of a whole data set.

An m×m patch touches at most Δ(m) ablations, so it can take at most Δ votes from the predicted class c
and give at most Δ to any other class c'. The prediction cannot change if

    salman:        n_c > max_{c'≠c} n_c' + 2Δ                                    (strict)
    levine_feizi:  n_c ≥ n_c' + 2Δ + [c' < c]  for every c' ≠ c                   (ties go to the smaller index)

Vote counts do not depend on m, so one pass over the ablations certifies every patch size at once.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm

from vitkit.data import ImageDataset
from vitkit.errors import VitkitError
from vitkit.smoothing.ablation import Ablation
from vitkit.smoothing.smoothed import SmoothedClassifier

TIE_RULES = ("salman", "levine_feizi")


def certify(counts: Tensor, delta: int | Tensor, tie_rule: str = "salman") -> tuple[Tensor, Tensor]:
    """Smoothed prediction (B,) and whether it is certified, (B,) for an int Δ or (B, M) for Δ of shape (M,)."""
    if tie_rule not in TIE_RULES:
        raise VitkitError(f"unknown certification rule {tie_rule!r}: use one of {', '.join(TIE_RULES)}")
    counts = counts.long()
    pred = counts.argmax(1)  # first of equal maxima: ties to the smallest class index
    n_pred = counts.gather(1, pred[:, None])  # (B, 1)
    classes = torch.arange(counts.shape[1], device=counts.device)
    # Each rival's count plus the tie-break: a rival with a smaller index also wins an exact tie.
    tie_break = (classes[None] < pred[:, None]).long() if tie_rule == "levine_feizi" else torch.ones_like(counts)
    rivals = (counts + tie_break).masked_fill(classes[None] == pred[:, None], -(2**40))
    margin = n_pred - rivals.amax(1, keepdim=True)  # certified iff margin ≥ 2Δ
    delta = torch.as_tensor(delta, device=counts.device)
    certified = margin >= 2 * delta.reshape(1, -1)
    return pred, certified if delta.ndim else certified[:, 0]


def parse_patch_sizes(text: str) -> list[int]:
    """"1-10", "2,5,8" or "5" → sorted patch sizes."""
    sizes: set[int] = set()
    try:
        for part in text.split(","):
            if "-" in part:
                lo, hi = part.split("-")
                sizes.update(range(int(lo), int(hi) + 1))
            elif part.strip():
                sizes.add(int(part))
    except ValueError:
        raise VitkitError(f"cannot read patch sizes {text!r}: write e.g. 1-10, 2,5,8 or 5") from None
    if not sizes or min(sizes) < 1:
        raise VitkitError(f"patch sizes {text!r} must be positive integers: write e.g. 1-10")
    return sorted(sizes)


@dataclass
class Votes:
    """What certification measured per image; everything else is derived from it without the model."""

    counts: Tensor  # (N, classes) int64 votes of the smoothed classifier
    labels: Tensor  # (N,) true classes
    base_predictions: Tensor  # (N,) the base model on the clean image
    ablation: Ablation
    info: dict[str, Any]  # classes, checkpoint, rule, threshold, ...

    def save(self, path: str | Path) -> None:
        from vitkit.train.checkpoint import atomic_write

        tensors = {"counts": self.counts.int().contiguous(), "labels": self.labels.long().contiguous(),
                   "base_predictions": self.base_predictions.long().contiguous()}
        meta = {"vitkit_votes": json.dumps({"ablation": self.ablation.to_dict(), **self.info})}
        atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))

    @classmethod
    def load(cls, path: str | Path) -> Votes:
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {})["vitkit_votes"])
                tensors = {k: f.get_tensor(k) for k in ("counts", "labels", "base_predictions")}
            ablation = Ablation.from_dict(meta.pop("ablation"))
        except (SafetensorError, OSError, KeyError, ValueError, TypeError) as e:
            raise VitkitError(f"{path} is not a votes file written by `vitkit certify` ({e!r}): pass its votes.safetensors") from None
        return cls(tensors["counts"].long(), tensors["labels"], tensors["base_predictions"], ablation, meta)


def certification_report(votes: Votes, patch_sizes: list[int], main_size: int, tie_rule: str = "salman") -> dict[str, Any]:
    """Flat figures: standard, smoothed and certified accuracy (fractions), per patch size too."""
    if main_size not in patch_sizes:
        patch_sizes = sorted({*patch_sizes, main_size})
    deltas = torch.tensor([votes.ablation.delta(m) for m in patch_sizes])
    pred, certified = certify(votes.counts, deltas, tie_rule)
    correct = pred == votes.labels
    num_ablations = votes.ablation.num_ablations
    report: dict[str, Any] = {
        "images": len(votes.labels),
        "ablations_per_image": num_ablations,
        "standard_accuracy": (votes.base_predictions == votes.labels).float().mean().item(),
        "smoothed_accuracy": correct.float().mean().item(),
        "certified_accuracy": (correct & certified[:, patch_sizes.index(main_size)]).float().mean().item(),
        "patch_size": main_size,
        "delta": votes.ablation.delta(main_size),
        "correct_vote_fraction": (votes.counts.gather(1, votes.labels[:, None]).float() / num_ablations).mean().item(),
        "tie_rule": tie_rule,
    }
    for m, column in zip(patch_sizes, certified.T):
        report[f"certified_accuracy_{m}x{m}"] = (correct & column).float().mean().item()
    return report


def largest_certified_patch(votes: Votes, max_size: int, tie_rule: str = "salman") -> Tensor:
    """(N,) the largest m ≤ max_size certified per image (0: none). Δ grows with m, so certified sets nest."""
    deltas = torch.tensor([votes.ablation.delta(m) for m in range(1, max_size + 1)])
    _, certified = certify(votes.counts, deltas, tie_rule)
    return certified.long().sum(1)


@torch.no_grad()
def collect_votes(
    smoothed: SmoothedClassifier, data: ImageDataset, device: torch.device, batch_size: int = 256,
    progress: bool = True, info: dict[str, Any] | None = None, bf16: bool = False,
) -> Votes:
    """Votes of `smoothed` on every image of `data`, plus the base model's clean prediction.
    `bf16`: bfloat16 autocast on CUDA and on the CPU (fast where it has native bfloat16, e.g. AVX512-BF16 or
    AMX; emulated, and slow, where not). A certificate holds for the votes of the
    computation that produced them: bf16, like any change of kernels, can flip an ablation whose top
    two logits nearly tie. Under torchrun every rank certifies its share and gets all the votes."""
    from vitkit import distributed
    from vitkit.train.evaluate import autocast

    if batch_size < 1:
        raise VitkitError(f"batch size {batch_size} is not positive: pass e.g. --batch-size 256")
    counts, base = [], []
    part = data.subset(distributed.shard(len(data)))
    was_training = smoothed.base.training
    smoothed.base.eval()
    try:
        with tqdm(total=len(part), desc="certify", unit="img", disable=not progress, leave=False) as bar:
            for start in range(0, len(part), batch_size):
                x = part.images[start : start + batch_size].to(device).float().div_(255)
                with autocast(device, bf16, cpu=True):
                    counts.append(smoothed.votes(x).cpu())
                    base.append(smoothed.clean_logits(x).argmax(1).cpu())
                bar.update(len(x))
    finally:
        smoothed.base.train(was_training)
    threshold = smoothed.threshold if smoothed.rule == "threshold" else None
    counts, base = distributed.gather_cat(torch.cat(counts)), distributed.gather_cat(torch.cat(base))
    return Votes(counts, data.labels.clone(), base, smoothed.ablation,
                 {"classes": list(data.classes), "rule": smoothed.rule, "threshold": threshold, **(info or {})})



def empirical_patch_robustness(
    smoothed: SmoothedClassifier, images: Tensor, labels: Tensor, size: int, *, num_positions: int = 16,
    steps: int = 20, step_size: float = 0.1, batch_size: int = 32, seed: int = 0,
) -> Tensor:
    """(N,) bool: the smoothed vote is still right after a patch attack on it (masked PGD on the soft vote
    at `num_positions` random places per image). An upper bound to certified accuracy, and a check of it:
    an image certified at this size that the attack flips would be a bug."""
    from vitkit.attacks import patch_attack

    right = []
    for start in range(0, len(images), batch_size):
        x = images[start : start + batch_size]
        y = labels[start : start + batch_size]
        adversarial, _ = patch_attack(smoothed, x, y, size, num_positions=num_positions, steps=steps,
                                      step_size=step_size, generator=torch.Generator().manual_seed(seed))
        right.append((smoothed.predict(adversarial) == y) & (smoothed.predict(x) == y))
    return torch.cat(right)
