"""Knowledge distillation: the student learns from the labels and from a trained teacher's outputs.

soft (Hinton et al. 2015):  loss = (1 − α)·CE(student, labels) + α·T²·KL(softmax(teacher/T) ‖ softmax(student/T));
    T² keeps the term's gradient on the scale of the label loss's whatever the temperature.
hard (DeiT, Touvron et al. 2021): the student ViT has a distillation token with its own head; the class head
    learns the labels, the distillation head the teacher's top class:
    loss = (1 − α)·CE(class head, labels) + α·CE(distillation head, argmax teacher)    (DeiT: α = ½);
    the prediction is the mean of the two heads' logits.

The teacher is any vitkit checkpoint (a ViT or a ResNet), frozen in eval mode. It sees the student's batch,
augmented and mixed (whole images where the student trains on ablations), re-normalised with its own
statistics where they differ from the student's.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.attacks.pixel import PixelModel
from vitkit.errors import VitkitError
from vitkit.train.checkpoint import load_model

KINDS = ("soft", "hard")


def soft_distillation_loss(student: Tensor, teacher: Tensor, temperature: float) -> Tensor:
    """T²·KL(softmax(teacher/T) ‖ softmax(student/T)), averaged over the batch, in float32."""
    T = temperature
    log_p_student = F.log_softmax(student.float() / T, dim=1)
    log_p_teacher = F.log_softmax(teacher.float() / T, dim=1)
    return T * T * F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)


def hard_distillation_loss(student: Tensor, teacher: Tensor) -> Tensor:
    """CE(student, argmax teacher): the teacher's top class as the label, in float32."""
    return F.cross_entropy(student.float(), teacher.argmax(1))


def load_teacher(
    path: str | Path, device: torch.device, classes: Sequence[str], image_size: int, channels: int
) -> tuple[nn.Module, dict[str, Any]]:
    """The teacher checkpoint's model, frozen in eval mode on `device`, and its metadata; it must predict the
    student's `classes` from images of the student's size and channels."""
    try:
        teacher, info = load_model(path, device)
    except VitkitError as e:
        raise VitkitError(f"--teacher: {e}") from None
    if list(info["classes"]) != list(classes):
        raise VitkitError(
            f"the teacher {path} predicts {len(info['classes'])} classes {info['classes'][:3]}... but the data has "
            f"{len(classes)} {list(classes)[:3]}...: use a teacher trained on the same data set"
        )
    shape = (info["model"]["image_size"], info["model"]["in_channels"])
    if shape != (image_size, channels):
        raise VitkitError(
            f"the teacher {path} was trained on {shape[1]}-channel {shape[0]}-pixel images but the student's are "
            f"{channels}-channel {image_size}-pixel ones: use a teacher trained on the same images"
        )
    return teacher.requires_grad_(False), info


class Distiller:
    """Owns the teacher and gives the training loss of a batch (see the module docstring).

    student_model: the model being trained (for its normalisation, as `Trades`); teacher: a frozen model
    in eval mode, possibly compiled, with its own normalisation statistics.
    """

    def __init__(
        self, student_model: nn.Module, mean: Sequence[float], std: Sequence[float], teacher: nn.Module,
        teacher_mean: Sequence[float], teacher_std: Sequence[float], *, kind: str = "soft", alpha: float = 0.5,
        temperature: float = 3.0, label_smoothing: float = 0.0,
    ):
        if kind not in KINDS:
            raise VitkitError(f"unknown distillation {kind!r}: use one of {', '.join(KINDS)}")
        self.student = PixelModel(student_model, mean, std)
        self.teacher = PixelModel(teacher, teacher_mean, teacher_std)
        self.same_input = list(mean) == list(teacher_mean) and list(std) == list(teacher_std)
        self.kind, self.alpha, self.temperature, self.label_smoothing = kind, alpha, temperature, label_smoothing

    @torch.no_grad()
    def teacher_logits(self, x: Tensor) -> Tensor:
        """The teacher on the student's normalised batch x (under the caller's autocast)."""
        if not self.same_input:
            x = self.teacher.normalize(self.student.to_pixels(x))
        return self.teacher.model(x)

    def __call__(self, forward: Callable[..., Tensor], x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """(loss, logits) of the student `forward` on the normalised batch x with labels or soft targets y;
        the logits are the student's prediction (for hard distillation, the mean of its two heads)."""
        target = self.teacher_logits(x)
        if self.kind == "hard":
            heads = forward(x, both_heads=True)
            student, distilled = heads.unbind(1)
            term = hard_distillation_loss(distilled, target)
            logits = heads.mean(1)
        else:
            student = logits = forward(x)
            term = soft_distillation_loss(student, target, self.temperature)
        label = F.cross_entropy(student.float(), y, label_smoothing=self.label_smoothing)
        return (1 - self.alpha) * label + self.alpha * term, logits
