"""Shared fixtures: a private cache for every test session, and the paths of the shared real data."""

from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1] / ".." / "shared"
CIFAR_JPG = SHARED / "datasets" / "cifar10-jpg.tar.gz"
WEIGHTS = SHARED / "weights" / "deit_tiny_patch16_224.safetensors"


@pytest.fixture(autouse=True, scope="session")
def private_cache(tmp_path_factory):
    """Tests never read or write the user's ~/.cache/vitkit."""
    mp = pytest.MonkeyPatch()
    mp.setenv("VITKIT_CACHE", str(tmp_path_factory.mktemp("vitkit-cache")))
    yield
    mp.undo()


requires_cifar = pytest.mark.skipif(
    not CIFAR_JPG.is_file(), reason=f"the CIFAR-10 copy is not at {CIFAR_JPG} (see ../shared/datasets/README.md)"
)
requires_weights = pytest.mark.skipif(
    not WEIGHTS.is_file(), reason=f"the DeiT-Tiny weights are not at {WEIGHTS} (see ../shared/weights/README.md)"
)


def tiny_vit(seed: int = 0, **overrides):
    """A seeded, very small ViT in eval mode with a non-zero head (the default zero head would make
    every output constant and many checks vacuous)."""
    import torch

    from vitkit.models import ViTConfig, VisionTransformer

    torch.manual_seed(seed)
    shape = dict(image_size=8, patch_size=2, num_classes=4, dim=16, depth=2, heads=2, mlp_dim=32)
    model = VisionTransformer(ViTConfig(**{**shape, **overrides}))
    torch.nn.init.normal_(model.head.weight)
    return model.eval()


@pytest.fixture(scope="session")
def digits_teacher(tmp_path_factory):
    """A run folder holding a small ViT trained for a few seconds on the digits: a distillation teacher."""
    from vitkit.train import TrainConfig, train

    out = tmp_path_factory.mktemp("teacher")
    cfg = TrainConfig(data="digits", model="vit_digits", dim=32, depth=1, heads=2, mlp_dim=64, epochs=6, batch_size=64,
                      lr=1e-2, warmup_epochs=0, device="cpu")  # about 55% test accuracy: well above chance
    train(cfg, out, progress=False)
    return out
