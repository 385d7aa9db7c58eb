"""Explaining what a ViT looks at: attention rollout and gradient-weighted rollout; for box models (seed 001's heads
on a ViT), where the backbone looks on the image and, with --zoom, on the crop it classifies."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from vitkit.data.boxes import scale_sizes
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
from vitkit.models.box_head import BoxModel

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


@dataclass
class BoxExplanation:
    """One pass of a box model over images, explained. `relevance` is on the first pass, over the image at the
    backbone's size (where the box comes from, and without zoom the class); with zoom, `crop_relevance` is on the
    second, over `crops` (the normalised squares around the box that the class is read from)."""

    logits: Tensor  # (B, classes)
    boxes: Tensor  # (B, 4) (cx, cy, w, h) in [0, 1], with the model's box scale
    relevance: Tensor  # (B, patches)
    crops: Tensor | None = None  # (B, C, size, size)
    crop_relevance: Tensor | None = None  # (B, patches)


@torch.no_grad()
def explain_box_model(model: BoxModel, x: Tensor, method: str = "rollout", **options) -> BoxExplanation:
    """`patch_relevance` of a box model's ViT backbone, on each pass of one forward over normalised images `x`, in
    eval mode and without flip averaging (a map explains one pass over the image as given). Gradient methods follow
    a ViT's own head, which a box model does not use: "rollout" or "attention"."""
    if not isinstance(model.backbone, VisionTransformer):
        raise VitkitError(f"explanations read a ViT's attention; this box model's {type(model.backbone).__name__} "
                          "backbone has none: explain a box model trained with --backbone vit")
    if method not in ("rollout", "attention"):
        raise VitkitError(f"--method {method} is not built for box models (their classes come from their own "
                          "heads, not the ViT's): use --method rollout or attention")
    saved = model.training, model.flip_tta, model.box_scale
    model.eval()
    model.flip_tta, model.box_scale = False, 1.0  # the crops are cut around the box before its scale
    try:
        logits, boxes = model(x)
        relevance = patch_relevance(model.backbone, model.first_view(x), method, **options)
        crops = crop_relevance = None
        if model.zoom:
            crops = model.zoom_crops(x, boxes)
            crop_relevance = patch_relevance(model.zoom_pass_backbone, crops, method, **options)
    finally:
        model.train(saved[0])
        model.flip_tta, model.box_scale = saved[1], saved[2]
    return BoxExplanation(logits, scale_sizes(boxes, model.box_scale), relevance, crops, crop_relevance)


__all__ = [
    "METHODS",
    "BoxExplanation",
    "explain_box_model",
    "attention_rollout",
    "discard_lowest",
    "fuse_heads",
    "gradient_rollout",
    "layer_attentions",
    "output_relevance",
    "patch_relevance",
    "relevance_to_image",
]
