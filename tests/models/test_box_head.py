"""The two-headed box model on a ViT and a ResNet-18 backbone: outputs, features, specs, pre-trained weights."""

import pytest
import torch
from conftest import WEIGHTS, requires_weights
from safetensors.torch import save_file

from vitkit.errors import VitkitError
from vitkit.models.box_head import RESNET18_FEATURES, BoxModel, resnet18_backbone, vit_backbone
from vitkit.models.resnet import resnet18


def tiny_box_vit(**head) -> BoxModel:
    torch.manual_seed(0)
    vit = vit_backbone("vit_tiny", image_size=16, patch_size=4, dim=16, depth=2, heads=2, mlp_dim=32)
    return BoxModel(vit, vit.cfg.dim, num_classes=5, hidden=8, **head).eval()


def test_vit_box_model_outputs_logits_and_boxes_from_the_class_token():
    model = tiny_box_vit()
    x = torch.randn(3, 3, 16, 16)
    logits, boxes = model(x)
    assert logits.shape == (3, 5) and boxes.shape == (3, 4)
    assert ((boxes > 0) & (boxes < 1)).all()  # sigmoid
    z, _ = model.backbone.forward_features(x)
    assert torch.equal(model.features(x), z[:, 0])  # the class token after the final norm
    assert torch.allclose(boxes, model.regressor(z[:, 0]).sigmoid())
    raw = tiny_box_vit(sigmoid=False)
    assert torch.allclose(raw(x)[1], model.regressor(z[:, 0]))


def test_heads_stay_float32_under_bf16_autocast():
    model = tiny_box_vit()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, boxes = model(torch.randn(2, 3, 16, 16))
    assert logits.dtype == boxes.dtype == torch.float32


@pytest.mark.parametrize("backbone", ["vit", "resnet18"])
def test_spec_rebuilds_the_same_architecture(backbone):
    if backbone == "vit":
        model = tiny_box_vit(dropout=0.1)
    else:
        model = BoxModel(resnet18_backbone(cifar_stem=True), RESNET18_FEATURES, num_classes=3, hidden=16)
    rebuilt = BoxModel.from_spec(model.spec())
    own, other = model.state_dict(), rebuilt.state_dict()
    assert own.keys() == other.keys() and all(own[k].shape == other[k].shape for k in own)
    assert rebuilt.spec() == model.spec()


def test_resnet18_backbone_loads_a_local_torchvision_state_dict(tmp_path):
    torch.manual_seed(1)
    reference = resnet18(num_classes=1000)
    state = {k: v for k, v in reference.state_dict().items() if not k.endswith("num_batches_tracked")}
    torch.save(state, tmp_path / "resnet18.pth")  # torchvision's released files have no batch-norm counters
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "resnet18.safetensors"))
    x = torch.randn(2, 3, 64, 64)
    reference.fc = torch.nn.Identity()
    expected = reference.eval()(x)
    for name in ("resnet18.pth", "resnet18.safetensors"):
        net = resnet18_backbone(tmp_path / name).eval()
        assert torch.allclose(net(x), expected, atol=1e-5) and expected.shape == (2, RESNET18_FEATURES)
    with pytest.raises(VitkitError, match="not a local file"):
        resnet18_backbone(tmp_path / "missing.pth")
    torch.save({"conv1.weight": torch.zeros(1)}, tmp_path / "wrong.pth")
    with pytest.raises(VitkitError, match="do not fit"):
        resnet18_backbone(tmp_path / "wrong.pth")


@requires_weights
def test_pretrained_vit_backbone_at_a_small_size_with_frozen_blocks():
    vit = vit_backbone(pretrained=WEIGHTS, image_size=32, freeze=6)
    assert vit.cfg.image_size == 32 and vit.cfg.dim == 192 and vit.cfg.num_classes == 0
    assert not vit.cls_token.requires_grad and not vit.pos_embed.requires_grad
    assert all(not p.requires_grad for b in vit.blocks[:6] for p in b.parameters())
    assert all(p.requires_grad for b in vit.blocks[6:] for p in b.parameters())
    model = BoxModel(vit, 192, num_classes=26)
    logits, boxes = model.eval()(torch.randn(1, 3, 32, 32))
    assert logits.shape == (1, 26) and boxes.shape == (1, 4)


def test_bad_head_settings_are_user_errors():
    with pytest.raises(VitkitError, match="dropout"):
        tiny_box_vit(dropout=1.0)
