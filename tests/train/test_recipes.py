"""Every named recipe is a valid configuration whose model builds, and the recipes say what their comments say."""

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

from conftest import WEIGHTS, requires_weights
from vitkit.models import VisionTransformer
from vitkit.train.config import RECIPES, build_config
from vitkit.train.trainer import build_model


def data_like(size: int, channels: int) -> SimpleNamespace:
    """What build_model reads of a data set: ten classes of square images."""
    return SimpleNamespace(num_classes=10, channels=channels, image_size=(size, size))


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_every_recipe_builds_its_model(name):
    flags = {"teacher": "teacher-run"} if RECIPES[name].get("distill") else {}
    if RECIPES[name].get("pretrained"):  # a hub name: tests read the local copy instead of downloading
        if not WEIGHTS.is_file():
            pytest.skip(f"{name} starts from DeiT-Ti weights, not at {WEIGHTS} (see ../shared/weights/README.md)")
        flags["pretrained"] = str(WEIGHTS)
    cfg = build_config(name, None, flags)
    size, channels = (8, 1) if name == "digits" else (cfg.image_size or 32, 3)  # data are resized to image_size
    model = build_model(cfg, data_like(size, channels)).eval()
    assert isinstance(model, VisionTransformer) == (cfg.model != "resnet18")
    if isinstance(model, VisionTransformer):
        assert model.cfg.distill_token == (cfg.distill == "hard")
        assert (model.cfg.shifted_patches, model.cfg.locality_attention) == (cfg.spt, cfg.lsa)
    with torch.no_grad():
        logits = model(torch.randn(2, channels, size, size))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


def test_the_cpu_recipe_is_the_fast_recipe_scaled_down():
    fast, cpu = build_config("cifar10-fast"), build_config("cifar10-cpu")
    model = build_model(cpu, data_like(32, 3))
    assert 0.8e6 < sum(p.numel() for p in model.parameters()) < 0.9e6  # "0.84M parameters"
    assert model.cfg.shifted_patches and model.cfg.locality_attention and model.cfg.patch_size == 4
    same = ("lr", "weight_decay", "label_smoothing", "drop_path", "trivial_augment", "tta_flip", "val_fraction")
    assert all(getattr(cpu, k) == getattr(fast, k) for k in same)
    assert not cpu.compile and cpu.batch_size == 128 and cpu.patch_dropout == 0.5


@requires_weights
def test_the_pretrained_smoothing_recipe_keeps_seed_000s_setting_at_32_pixels():
    """DeiT-Ti on CIFAR's own 32×32 images: 4×4 patches (an 8×8 grid), column ablations of width 4, the
    pre-trained weights in every block (a resampled patch projection, not a fresh one)."""
    from vitkit.models import load_pretrained

    cfg = build_config("cifar10-smoothing-deit", None, {"pretrained": str(WEIGHTS)})
    assert RECIPES["cifar10-smoothing-deit"]["pretrained"] == "deit_tiny_patch16_224.fb_in1k"
    assert (cfg.ablation, cfg.ablation_size, cfg.image_size) == ("column", 4, None)
    model = build_model(cfg, data_like(32, 3))
    assert (model.cfg.image_size, model.cfg.patch_size, model.cfg.grid_size, model.cfg.dim) == (32, 4, 8, 192)
    reference = load_pretrained(WEIGHTS, num_classes=10, image_size=32, patch_size=4).state_dict()
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key


@requires_weights
def test_the_224_pixel_smoothing_recipe_is_seed_000s_setting_scaled_by_7():
    """The paper's set-up: 224-px images, DeiT-Ti's own 16×16 patches and position embeddings taken unchanged,
    the ablation width and crop padding of the 32-px recipe times 224/32."""
    from vitkit.models import load_pretrained

    small = build_config("cifar10-smoothing-deit", None, {"pretrained": str(WEIGHTS)})
    cfg = build_config("cifar10-smoothing-deit224", None, {"pretrained": str(WEIGHTS)})
    scale = cfg.image_size // 32
    assert (cfg.image_size, scale) == (224, 7) and cfg.ablation == small.ablation == "column"
    assert (cfg.ablation_size, cfg.crop_padding) == (small.ablation_size * scale, small.crop_padding * scale)
    model = build_model(cfg, data_like(224, 3))
    assert (model.cfg.patch_size, model.cfg.grid_size) == (16, 14)
    reference = load_pretrained(WEIGHTS, num_classes=10, image_size=224, patch_size=16).state_dict()
    raw = load_file(str(WEIGHTS))
    assert torch.equal(model.state_dict()["pos_embed"], raw["pos_embed"])  # not resampled
    for key, value in model.state_dict().items():
        assert torch.equal(value, reference[key]), key
