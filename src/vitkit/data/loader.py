"""A data loader that holds the whole data set on the training device (as airbench does).

Batches are index lookups into one uint8 tensor, augmented and normalised on the device: no worker
processes, no per-image Python work, no host-to-device copy per step.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import Tensor

from vitkit.data.augment import Augment
from vitkit.data.datasets import ImageDataset
from vitkit.errors import VitkitError


def stream_seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers, so nearby (seed, epoch, rank) tuples get unrelated streams."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1, np.uint64)[0] >> np.uint64(1))


class DeviceLoader:
    """Iterates (images, labels) batches: images float32 normalised (B, C, H, W) on `device`, labels on `device`
    (int64 (B,), or soft targets (B, classes) when the augmentation mixes).

    Shuffling and augmentation are a pure function of (seed, epoch, rank): call `set_epoch` before each
    epoch. With `world_size` > 1 the epoch's order is shared by all ranks and dealt out round-robin, padded
    by repeating its start so that every rank gets the same number of samples (as DistributedSampler).
    """

    def __init__(
        self,
        dataset: ImageDataset,
        batch_size: int,
        *,
        mean: Sequence[float],
        std: Sequence[float],
        device: torch.device | str = "cpu",
        shuffle: bool = False,
        drop_last: bool = False,
        augment: Augment | None = None,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ):
        if batch_size < 1:
            raise VitkitError(f"batch size {batch_size} is not positive: pass e.g. 128")
        if len(mean) != dataset.channels or len(std) != dataset.channels:
            raise VitkitError(
                f"mean/std have {len(mean)}/{len(std)} values but the images have {dataset.channels} channels: "
                "pass one per channel"
            )
        if not 0 <= rank < world_size:
            raise VitkitError(f"rank {rank} is outside 0..{world_size - 1}: check the distributed launch")
        self.device = torch.device(device)
        self.images = dataset.images.to(self.device)
        self.labels = dataset.labels.to(self.device)
        self.classes = dataset.classes
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.drop_last = drop_last
        self.augment = augment
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device)[:, None, None]
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device)[:, None, None]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def set_epoch(self, epoch: int) -> None:
        """Selects the epoch whose order and augmentation the next iteration reproduces."""
        self.epoch = epoch

    def _per_rank(self) -> int:
        return -(-len(self.labels) // self.world_size)

    def __len__(self) -> int:
        n = self._per_rank()
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _order(self) -> Tensor:
        """This rank's sample indices for the epoch, on the device."""
        n = len(self.labels)
        if self.shuffle:
            # Drawn on the CPU from a rank-independent seed: every rank shares one permutation.
            order = torch.randperm(n, generator=torch.Generator().manual_seed(stream_seed(self.seed, self.epoch)))
        else:
            order = torch.arange(n)
        if self.world_size > 1:
            total = self._per_rank() * self.world_size
            order = order.repeat(-(-total // max(n, 1)))[:total][self.rank :: self.world_size]
        return order.to(self.device)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        order = self._order()
        g = torch.Generator(device=self.device)
        g.manual_seed(stream_seed(self.seed, self.epoch, self.rank, 1))  # the augmentation's own stream
        host_rng = np.random.default_rng(stream_seed(self.seed, self.epoch, self.rank, 2))  # its per-batch draws
        for i in range(len(self)):
            idx = order[i * self.batch_size : (i + 1) * self.batch_size]
            x = self.images[idx].float().div_(255)
            y = self.labels[idx]
            if self.augment is not None:
                x, y = self.augment(x, y, g, host_rng)
            yield (x - self.mean) / self.std, y
