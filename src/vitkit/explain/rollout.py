"""Attention rollout (Abnar & Zuidema 2020; seed 003) and gradient-weighted rollout (Chefer et al. 2021).

Both turn the per-layer attention maps of a ViT into one relevance score per patch token: how much
the output token (the class token, or the mean of the patch tokens for mean-pooled models; for a
distilled ViT also its distillation token, whose head's logits are averaged in) draws on each input
patch through all the layers. Everything is batched: no loop over images or tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.errors import VitkitError

HEAD_FUSIONS = ("mean", "max", "min")
RESIDUALS = ("normalized", "seed")


def fuse_heads(attention: Tensor, how: str = "mean") -> Tensor:
    """(B, heads, T, T) → (B, T, T) by the mean, max or min over heads."""
    if how == "mean":
        return attention.mean(1)
    if how == "max":
        return attention.amax(1)
    if how == "min":
        return attention.amin(1)
    raise VitkitError(f"unknown head fusion {how!r}: use one of {', '.join(HEAD_FUSIONS)}")


def discard_lowest(a: Tensor, ratio: float, prefix: int = 1) -> Tensor:
    """Zeroes the `ratio` lowest entries of each image's (T, T) map, never the rows and columns of the
    `prefix` tokens (the class token, as in Gildenblat's reference implementation, and a distillation
    token); the threshold is per image."""
    if ratio <= 0:
        return a
    B, T, _ = a.shape
    protect = torch.zeros(T, T, dtype=torch.bool, device=a.device)
    protect[:prefix, :] = protect[:, :prefix] = True
    candidates = a.masked_fill(protect, float("inf")).flatten(1)
    k = int(ratio * (T - prefix) ** 2)  # of the entries that may be discarded
    if k == 0:
        return a
    threshold = candidates.kthvalue(k, dim=1).values[:, None, None]
    return a.masked_fill((a <= threshold) & ~protect, 0.0)


def attention_rollout(
    attentions: list[Tensor],
    head_fusion: str = "mean",
    discard_ratio: float = 0.0,
    start_layer: int = 0,
    residual: str = "normalized",
    prefix: int = 1,
) -> Tensor:
    """The rollout matrix R (B, T, T): R[b, i, j] is how much output token i draws on input token j.

    residual="normalized" (default, Abnar & Zuidema): Â_l = rows-normalised (A_l + I), R = Â_L ··· Â_s.
    residual="seed": seed 003's un-normalised product R = A_s (A_{s+1} + I) ··· (A_L + I).
    prefix: the tokens before the patches (`discard_lowest` spares them): 1, or 2 with a distillation token.
    """
    if residual not in RESIDUALS:
        raise VitkitError(f"unknown residual rule {residual!r}: use one of {', '.join(RESIDUALS)}")
    if not 0 <= start_layer < len(attentions):
        raise VitkitError(f"start layer {start_layer} is outside the model's {len(attentions)} layers")
    maps = [discard_lowest(fuse_heads(a.float(), head_fusion), discard_ratio, prefix) for a in attentions[start_layer:]]
    eye = torch.eye(maps[0].shape[-1], device=maps[0].device)
    if residual == "seed":
        rollout = maps[0]
        for a in maps[1:]:
            rollout = rollout @ (a + eye)
        return rollout
    rollout = None
    for a in maps:
        a = a + eye
        a = a / a.sum(-1, keepdim=True)
        rollout = a if rollout is None else a @ rollout
    return rollout


def output_relevance(rollout: Tensor, pool: str = "cls", prefix: int = 1) -> Tensor:
    """Relevance of each patch token (B, K) for the model's output token: the class token's row, or the
    mean of the patch tokens' rows for mean-pooled models. With a distillation token (prefix 2) the
    output is the mean of two heads' logits: the mean of that row and the distillation token's."""
    rows = rollout[:, 0] if pool == "cls" else rollout[:, prefix:].mean(1)
    if prefix == 2:
        rows = (rows + rollout[:, 1]) / 2
    return rows[:, prefix:]


def gradient_rollout(model: nn.Module, x: Tensor, target: Tensor | None = None, keep: Tensor | None = None) -> Tensor:
    """Chefer et al.'s gradient-weighted rollout: R ← R + mean_h((∇A ⊙ A)⁺) R, from R = I; (B, K) relevance.

    target: the class per image to explain (default: the predicted class).
    """
    was_training = model.training
    model.eval()
    with torch.enable_grad():
        logits, attentions = model(x, keep=keep, return_attention=True)
        if target is None:
            target = logits.argmax(1)
        score = logits.gather(1, target[:, None]).sum()
        grads = torch.autograd.grad(score, attentions)
    model.train(was_training)
    B, _, T, _ = attentions[0].shape
    rollout = torch.eye(T, device=x.device).expand(B, T, T)
    for a, g in zip(attentions, grads):
        weighted = (g * a).clamp_min(0).mean(1).detach()
        rollout = rollout + weighted @ rollout
    return output_relevance(rollout, model.cfg.pool, model.cfg.num_prefix_tokens)


def relevance_to_image(relevance: Tensor, grid: tuple[int, int], size: tuple[int, int]) -> Tensor:
    """(B, gh·gw) patch relevance → (B, H, W) bicubic-upsampled map, min-max normalised per image to [0, 1]."""
    maps = relevance.reshape(-1, 1, *grid)
    up = F.interpolate(maps, size=size, mode="bicubic", align_corners=False)[:, 0]
    lo = up.flatten(1).amin(1)[:, None, None]
    hi = up.flatten(1).amax(1)[:, None, None]
    return ((up - lo) / (hi - lo).clamp_min(1e-12)).clamp(0, 1)
