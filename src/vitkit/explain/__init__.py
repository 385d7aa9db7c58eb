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

METHODS = ("rollout", "grad_rollout", "attention")


@torch.no_grad()
def layer_attentions(model: VisionTransformer, x: Tensor, keep: Tensor | None = None) -> list[Tensor]:
    """Every layer's attention probabilities (B, heads, T, T), computed in eval mode."""
    was_training = model.training
    model.eval()
    _, attentions = model(x, keep=keep, return_attention=True)
    model.train(was_training)
    return attentions


def patch_relevance(
    model: VisionTransformer, x: Tensor, method: str = "rollout", keep: Tensor | None = None,
    target: Tensor | None = None, **options,
) -> Tensor:
    """Relevance of every patch (B, N) on the model's grid; patches dropped by `keep` get 0.

    methods: "rollout" (options go to `attention_rollout`: head_fusion, discard_ratio, start_layer,
    residual), "grad_rollout" (explains `target`, default the predicted class) and "attention", the
    raw attention of one layer (options: layer, default the last; head_fusion).
    """
    if not isinstance(model, VisionTransformer):
        raise VitkitError(f"explanations read a ViT's attention; a {type(model).__name__} has none: pass a ViT")
    pool, prefix = model.cfg.pool, model.cfg.num_prefix_tokens
    if method == "rollout":
        kept = output_relevance(attention_rollout(layer_attentions(model, x, keep), prefix=prefix, **options), pool, prefix)
    elif method == "attention":
        attentions = layer_attentions(model, x, keep)
        layer = options.get("layer", len(attentions) - 1)
        if not -len(attentions) <= layer < len(attentions):
            raise VitkitError(f"layer {layer} is outside the model's {len(attentions)} layers")
        kept = output_relevance(fuse_heads(attentions[layer], options.get("head_fusion", "mean")), pool, prefix)
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
    "layer_attentions",
    "output_relevance",
    "patch_relevance",
    "relevance_to_image",
]
