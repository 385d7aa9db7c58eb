"""Several processes under torchrun: one per GPU (NCCL) or per CPU process group member (Gloo).

torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; without them, or with WORLD_SIZE 1, nothing here starts a
process group and every helper is the single-process identity. Data-parallel work shards the images
contiguously by rank (`shard`) and puts the pieces back together in rank order (`gather_cat`), so a
result is in the data set's order and equal to the single-process one.
"""

from __future__ import annotations

import gc
import os

import torch
import torch.distributed as dist
from torch import Tensor

from vitkit.errors import VitkitError


def world() -> tuple[int, int]:
    """(rank, world size): (0, 1) for a single process."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes files and prints: rank 0, or the only process."""
    return world()[0] == 0


def launched() -> bool:
    """Whether torchrun started several processes."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def setup(device: torch.device) -> torch.device:
    """Joins the process group of a torchrun launch (NCCL for CUDA, Gloo for the CPU) and returns this rank's
    device: cuda:LOCAL_RANK for CUDA. Without torchrun, or once joined, `device` unchanged (or re-indexed)."""
    if not launched():
        return device
    if device.type == "mps":
        raise VitkitError("torchrun with MPS is not supported: use --device cpu or run a single process")
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)  # NCCL and all_gather_object use the current device
    if not dist.is_initialized():
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
    return device


def shutdown() -> None:
    """Waits for every rank (rank 0 may still be writing files) and leaves the process group."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        # Free what still holds the group (a DDP module and its reducer in a reference cycle) while the interpreter
        # is alive: released during its finalisation instead, Gloo's threads can abort the process (SIGABRT).
        gc.collect()
        dist.destroy_process_group()


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()


def all_reduce_sum(tensor: Tensor) -> Tensor:
    """The sum over ranks, in place (and returned)."""
    if world()[1] > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def local_batch(batch_size: int) -> int:
    """This rank's share of a global batch, which must divide evenly among the processes."""
    size = world()[1]
    if batch_size % size:
        raise VitkitError(f"--batch-size {batch_size} is the global batch and does not divide evenly among "
                          f"{size} processes: pass a multiple of {size}")
    return batch_size // size


def shard(n: int) -> slice:
    """This rank's contiguous share of n items; shares differ by at most one item and none is repeated."""
    rank, size = world()
    if n < size:
        raise VitkitError(f"{n} images are fewer than the {size} processes: launch fewer processes or pass more images")
    return slice(rank * n // size, (rank + 1) * n // size)


def gather_cat(tensor: Tensor) -> Tensor:
    """Every rank's piece (along dim 0; sizes may differ) concatenated in rank order, on every rank, on the CPU."""
    if world()[1] == 1:
        return tensor.cpu()
    pieces: list[Tensor | None] = [None] * world()[1]
    dist.all_gather_object(pieces, tensor.cpu())
    return torch.cat(pieces)
