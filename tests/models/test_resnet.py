"""ResNet-18: torchvision's network, with the CIFAR stem for small images."""

import pytest
import torch
from torch import nn

from vitkit.errors import VitkitError
from vitkit.models import resnet18


def test_cifar_stem_keeps_the_resolution_for_the_first_stage():
    model = resnet18(10, cifar_stem=True).eval()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.stride == (1, 1) and model.conv1.padding == (1, 1)
    assert isinstance(model.maxpool, nn.Identity)
    x = torch.randn(2, 3, 32, 32)
    assert model(x).shape == (2, 10)
    with torch.no_grad():
        stem = model.relu(model.bn1(model.conv1(x)))
    assert stem.shape == (2, 64, 32, 32)  # the ImageNet stem would leave 8×8


def test_imagenet_stem_and_other_channel_counts():
    model = resnet18(5, in_channels=1).eval()
    assert model.conv1.kernel_size == (7, 7) and model.conv1.in_channels == 1
    assert isinstance(model.maxpool, nn.MaxPool2d)
    assert model(torch.randn(1, 1, 64, 64)).shape == (1, 5)
    with pytest.raises(VitkitError, match="at least one class"):
        resnet18(0)
