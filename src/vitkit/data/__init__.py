"""Data: in-memory uint8 data sets (also with one bounding box per image), batched on-device augmentation
and the device-resident loader."""

from vitkit.data.augment import Augment, AugmentConfig
from vitkit.data.box_augment import BoxAugment, BoxAugmentConfig, BoxLoader
from vitkit.data.boxes import BoxDataset, box_iou, generalized_box_iou, load_box_dataset, scale_sizes, square_crops
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
    "BoxAugment",
    "BoxAugmentConfig",
    "BoxDataset",
    "BoxLoader",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DeviceLoader",
    "ImageDataset",
    "box_iou",
    "channel_stats",
    "generalized_box_iou",
    "load_box_dataset",
    "scale_sizes",
    "square_crops",
    "load_dataset",
    "load_images",
    "stratified_split",
    "train_val_split",
]
