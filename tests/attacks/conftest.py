"""A tiny ViT seen through its normalisation, and a batch of pixels for it."""

import pytest
import torch

from conftest import tiny_vit
from vitkit.attacks import PixelModel

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


@pytest.fixture
def model():
    return PixelModel(tiny_vit(), MEAN, STD)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(1)
    return torch.rand(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)

