"""Explanations of a box model: each pass of its ViT backbone, explained as a plain ViT's would be."""

import copy

import pytest
import torch
import torch.nn.functional as F

from vitkit.data.boxes import scale_sizes, square_crops
from vitkit.errors import VitkitError
from vitkit.explain import explain_box_model, patch_relevance
from vitkit.models.box_head import RESNET18_FEATURES, BoxModel, resnet18_backbone, vit_backbone


def tiny_box_vit(**head) -> BoxModel:
    torch.manual_seed(0)
    vit = vit_backbone("vit_tiny", image_size=16, patch_size=4, dim=16, depth=2, heads=2, mlp_dim=32)
    return BoxModel(vit, vit.cfg.dim, num_classes=5, hidden=8, box_head="dense", **head)


@pytest.mark.parametrize("method,options", [("rollout", {"discard_ratio": 0.5}), ("attention", {"layer": 0})])
def test_each_pass_is_explained_on_the_images_it_sees(method, options):
    model = tiny_box_vit(zoom=1.2, view_size=16, box_scale=0.9, flip_tta=True).train()
    x = torch.randn(3, 3, 32, 32)  # 32-pixel images: the first pass sees them at 16
    explained = explain_box_model(model, x, method, **options)
    # The model is as it was: in training, averaging mirrors, with its box scale.
    assert model.training and model.flip_tta and model.box_scale == 0.9
    model.eval()
    model.flip_tta = False
    logits, boxes = model(x)
    torch.testing.assert_close(explained.logits, logits)
    torch.testing.assert_close(explained.boxes, boxes)  # as the model gives them, scaled
    view = F.interpolate(x, size=(16, 16), mode="bilinear", antialias=True, align_corners=False)
    torch.testing.assert_close(explained.relevance, patch_relevance(model.backbone, view, method, **options))
    # The crops are the squares the class is read from: around the box before its scale, cut from the 32-px images.
    crops = square_crops(x, scale_sizes(boxes, 1 / 0.9), 1.2, 16)
    torch.testing.assert_close(explained.crops, crops)
    torch.testing.assert_close(logits, model.classifier(model.features(crops)[0]))
    torch.testing.assert_close(explained.crop_relevance, patch_relevance(model.backbone, crops, method, **options))
    assert explained.relevance.shape == explained.crop_relevance.shape == (3, 16)


def test_the_crops_are_explained_on_the_zoom_backbone_of_its_own():
    model = tiny_box_vit(zoom=1.2).eval()
    model.zoom_backbone = copy.deepcopy(model.backbone)
    with torch.no_grad():  # another backbone than the first pass's
        for p in model.zoom_backbone.parameters():
            p.add_(0.5 * torch.randn_like(p))
    x = torch.randn(2, 3, 16, 16)
    explained = explain_box_model(model, x)
    torch.testing.assert_close(explained.relevance, patch_relevance(model.backbone, x, "rollout"))
    own = patch_relevance(model.zoom_backbone, explained.crops, "rollout")
    torch.testing.assert_close(explained.crop_relevance, own)
    assert not torch.allclose(own, patch_relevance(model.backbone, explained.crops, "rollout"))


def test_without_zoom_only_the_image_is_explained():
    model = tiny_box_vit()
    x = torch.randn(2, 3, 16, 16)
    explained = explain_box_model(model, x)
    assert explained.crops is None and explained.crop_relevance is None
    torch.testing.assert_close(explained.relevance, patch_relevance(model.backbone, x, "rollout"))


def test_what_cannot_be_explained_is_a_clear_error():
    resnet = BoxModel(resnet18_backbone(cifar_stem=True), RESNET18_FEATURES, num_classes=3, hidden=8)
    with pytest.raises(VitkitError, match="ResNet backbone has none"):
        explain_box_model(resnet, torch.randn(1, 3, 32, 32))
    with pytest.raises(VitkitError, match="--method grad_rollout is not built for box models"):
        explain_box_model(tiny_box_vit(), torch.randn(1, 3, 16, 16), "grad_rollout")
