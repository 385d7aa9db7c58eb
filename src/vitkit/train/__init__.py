"""Training: configuration and recipes, the loop, checkpoints and evaluation."""

from vitkit.train.checkpoint import load_model, read_info, resolve_checkpoint
from vitkit.train.config import RECIPES, TrainConfig, build_config
from vitkit.train.trainer import Trainer, select_device, train

__all__ = [
    "RECIPES",
    "TrainConfig",
    "Trainer",
    "build_config",
    "load_model",
    "read_info",
    "resolve_checkpoint",
    "select_device",
    "train",
]
