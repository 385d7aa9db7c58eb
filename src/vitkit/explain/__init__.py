"""Explaining what a ViT looks at: attention rollout and gradient-weighted rollout."""

from __future__ import annotations

import torch
from torch import Tensor

from vitkit.errors import VitkitError
from vitkit.explain.rollout import (
    attention_rollout,
    discard_lowest,
    fuse_heads,
    gradient_rollout,
    output_relevance,
    relevance_to_image,
)
from vitkit.models import VisionTransformer

METHODS = ("rollout", "grad_rollout")


@torch.no_grad()
def _rollout_relevance(model: VisionTransformer, x: Tensor, keep: Tensor | None, **options) -> Tensor:
    was_training = model.training
    model.eval()
    _, attentions = model(x, keep=keep, return_attention=True)
    model.train(was_training)
    return output_relevance(attention_rollout(attentions, **options), model.cfg.pool)


def patch_relevance(
    model: VisionTransformer, x: Tensor, method: str = "rollout", keep: Tensor | None = None,
    target: Tensor | None = None, **options,
) -> Tensor:
    """Relevance of every patch (B, N) on the model's grid; patches dropped by `keep` get 0.

    options go to `attention_rollout` (head_fusion, discard_ratio, start_layer, residual);
    `target` (the class to explain) is used by grad_rollout.
    """
    if method == "rollout":
        kept = _rollout_relevance(model, x, keep, **options)
    elif method == "grad_rollout":
        kept = gradient_rollout(model, x, target, keep)
    else:
        raise VitkitError(f"unknown explanation method {method!r}: use one of {', '.join(METHODS)}")
    if keep is None:
        return kept
    full = kept.new_zeros(x.shape[0], model.cfg.num_patches)
    return full.scatter_(1, keep, kept)


__all__ = [
    "METHODS",
    "attention_rollout",
    "discard_lowest",
    "fuse_heads",
    "gradient_rollout",
    "output_relevance",
    "patch_relevance",
    "relevance_to_image",
]
