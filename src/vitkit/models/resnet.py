"""ResNet-18 (He et al. 2016), torchvision's, as a convolutional baseline and distillation teacher.

On small images the ImageNet stem (7×7 stride-2 convolution, then a stride-2 max-pool) shrinks a 32×32
image to 8×8 before the first block; the usual CIFAR variant replaces it by a 3×3 stride-1 convolution
and no pooling, so the four stages see 32, 16, 8 and 4 pixels. The trainer picks that stem for images
of at most `CIFAR_STEM_MAX_SIZE` pixels.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from vitkit.errors import VitkitError

if TYPE_CHECKING:
    from torchvision.models import ResNet

CIFAR_STEM_MAX_SIZE = 64  # images up to this side get the CIFAR stem (CIFAR, Tiny ImageNet); larger the ImageNet one


def resnet18(num_classes: int, in_channels: int = 3, cifar_stem: bool = False) -> ResNet:
    """A freshly initialised torchvision ResNet-18 with `num_classes` outputs and `in_channels` input channels;
    `cifar_stem`: conv1 3×3 stride 1 and no max-pool (for images of about 32×32)."""
    if num_classes < 1 or in_channels < 1:
        raise VitkitError(f"a ResNet-18 needs at least one class and one channel, got {num_classes} and {in_channels}")
    # Imported here: torchvision takes about a second to import, which every ViT-only command would pay.
    from torchvision.models import resnet18 as torchvision_resnet18

    model = torchvision_resnet18(weights=None, num_classes=num_classes)
    if cifar_stem or in_channels != 3:
        kernel, stride, padding = (3, 1, 1) if cifar_stem else (7, 2, 3)
        model.conv1 = nn.Conv2d(in_channels, 64, kernel, stride, padding, bias=False)
        nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # torchvision's init
    if cifar_stem:
        model.maxpool = nn.Identity()
    return model
