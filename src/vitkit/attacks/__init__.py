"""Adversarial robustness in pixel space: FGSM, PGD and Auto-PGD (ℓ∞, ℓ2), patch attacks; black-box attacks that
read only the model's scores (Square) or its predicted class (RayS), and transfer attacks; robust accuracy over
a data set, and adversarial training (Madry et al.'s and TRADES).

Attacks take any module that maps images in [0, 1] (B, C, H, W) to logits; `PixelModel` wraps a ViT
with its normalisation. A transfer attack is `robust_accuracy(target, ..., surrogate=surrogate)`.
"""

from vitkit.attacks.apgd import apgd, dlr_loss
from vitkit.attacks.evaluate import Attack, Robustness, attack_outcomes, robust_accuracy, worst_case
from vitkit.attacks.noise import image_keys
from vitkit.attacks.patch import patch_attack, patch_mask
from vitkit.attacks.pgd import NORMS, fgsm, pgd, project
from vitkit.attacks.pixel import PixelModel, eval_mode, input_gradient, load_pixel_model, margin
from vitkit.attacks.rays import rays
from vitkit.attacks.square import square
from vitkit.attacks.training import ATTACKS, Adversary, Trades, kl_divergence, trades_example

__all__ = [
    "ATTACKS",
    "Adversary",
    "Attack",
    "NORMS",
    "PixelModel",
    "Robustness",
    "Trades",
    "apgd",
    "attack_outcomes",
    "dlr_loss",
    "eval_mode",
    "fgsm",
    "image_keys",
    "input_gradient",
    "kl_divergence",
    "load_pixel_model",
    "margin",
    "patch_attack",
    "patch_mask",
    "pgd",
    "project",
    "rays",
    "robust_accuracy",
    "square",
    "trades_example",
    "worst_case",
]
