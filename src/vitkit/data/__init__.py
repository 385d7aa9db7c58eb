"""Data: in-memory uint8 data sets, batched on-device augmentation and the device-resident loader."""

from vitkit.data.augment import Augment, AugmentConfig
from vitkit.data.datasets import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    ImageDataset,
    channel_stats,
    load_dataset,
    load_images,
    stratified_split,
    train_val_split,
)
from vitkit.data.loader import DeviceLoader

__all__ = [
    "Augment",
    "AugmentConfig",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DeviceLoader",
    "ImageDataset",
    "channel_stats",
    "load_dataset",
    "load_images",
    "stratified_split",
    "train_val_split",
]
