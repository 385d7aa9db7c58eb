"""PatchDropout (Liu et al. 2022, "PatchDropout: Economizing Vision Transformers Using Patch Dropout").

During training each image keeps a uniform random subset of K of its N patch tokens (the class token, and the
distillation token where there is one, always stay), K = max(1, round((1 − p)·N)); a step then costs roughly K/N of
a whole one and the dropping regularises. Evaluation (validation, test, `vitkit attack`, ...) uses every token:
the trainer evaluates the bare model, never this wrapper.

Like `RandomlyAblated` for ablation training, `PatchDropped` wraps the training forward and calls the ViT with
`keep=` (B, K) indices, each token with its true position embedding. K is the same for every batch, so shapes stay
static under torch.compile. The indices of a row are sorted ascending (row-major over the grid, the order of
`vitkit.smoothing`'s kept tokens): attention and both poolings ignore token order, so this only fixes a canonical
order, for a negligible (B, K) sort on the device.

Randomness: a private generator on the training device, seeded at the start of every epoch from (seed, epoch,
rank) as the data loader's augmentation stream is (`DeviceLoader`, `stream_seed`), then drawn once per step. So `--resume`
(which restarts at an epoch boundary) repeats the same masks, DDP ranks draw different ones, and no draw needs a
host synchronisation.

One draw serves every forward of a step (`resample` once per batch): under TRADES the clean and the adversarial
forward see the same tokens, so the KL compares like with like. What sees whole images: a `--teacher` (the
student sees the kept tokens, the teacher the whole image: its predictions are then the better target) and the
attacks of adversarial training, which craft their examples against the whole-image model, as `vitkit attack`
evaluates it; the training step then sees the kept tokens of those examples.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from vitkit.data.loader import stream_seed
from vitkit.errors import VitkitError

STREAM = 3  # the loader's augmentation streams are 1 and 2


def kept_count(num_patches: int, drop: float) -> int:
    """K, the patch tokens each training image keeps when a share `drop` is dropped: max(1, round((1 − p)·N))."""
    if not 0 <= drop < 1:
        raise VitkitError(f"--patch-dropout {drop} must lie in [0, 1): the share of patch tokens dropped")
    return max(1, round((1 - drop) * num_patches))


def random_keep(batch: int, num_patches: int, count: int, generator: torch.Generator | None = None,
                device: torch.device | str = "cpu") -> Tensor:
    """(batch, count) int64: per row a uniform random subset of 0..num_patches-1 without repeats, ascending."""
    scores = torch.rand(batch, num_patches, generator=generator, device=device)
    return scores.argsort(dim=1)[:, :count].sort(dim=1).values


class PatchDropped(nn.Module):
    """`forward` (a ViT, possibly compiled or DDP-wrapped) on a random subset of each image's patch tokens.

    Call `set_epoch` before each epoch and `resample(batch_size)` before each step; every call in between
    (with the same batch size) uses that step's indices. Other keyword arguments (e.g. `both_heads`) pass through.
    """

    def __init__(self, forward: Callable[..., Tensor], num_patches: int, drop: float, *, seed: int = 0, rank: int = 0,
                 device: torch.device | str = "cpu"):
        super().__init__()
        self.model = forward
        self.num_patches = num_patches
        self.count = kept_count(num_patches, drop)
        self.seed, self.rank = seed, rank
        self.device = torch.device(device)
        self.generator = torch.Generator(device=self.device)
        self.keep: Tensor | None = None
        self.set_epoch(0)

    def set_epoch(self, epoch: int) -> None:
        """Restarts the stream of masks at epoch `epoch` (a pure function of seed, epoch and rank)."""
        self.generator.manual_seed(stream_seed(self.seed, epoch, self.rank, STREAM))
        self.keep = None

    def resample(self, batch_size: int) -> Tensor:
        """Draws the next step's kept indices (batch_size, K) and returns them."""
        self.keep = random_keep(batch_size, self.num_patches, self.count, self.generator, self.device)
        return self.keep

    def forward(self, x: Tensor, **kwargs) -> Tensor:
        if self.keep is None or len(self.keep) != len(x):
            raise RuntimeError("PatchDropped: call resample(len(x)) before each training step")
        return self.model(x, keep=self.keep, **kwargs)
