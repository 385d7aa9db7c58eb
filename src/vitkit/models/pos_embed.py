"""Position embeddings: the fixed sinusoidal encodings and resampling of a learned table."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from vitkit.errors import VitkitError


def sincos_1d(n_positions: int, dim: int) -> Tensor:
    """PE(pos, 2i) = sin(pos / 10000^(2i/D)), PE(pos, 2i+1) = cos(pos / 10000^(2i/D)) (seed 002); (n, D)."""
    if dim % 2:
        raise VitkitError(f"sinusoidal position embeddings need an even width, got {dim}")
    pos = torch.arange(n_positions, dtype=torch.float64)[:, None]
    freq = torch.exp(-math.log(10000.0) * torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    table = torch.empty(n_positions, dim, dtype=torch.float64)
    table[:, 0::2] = torch.sin(pos * freq)
    table[:, 1::2] = torch.cos(pos * freq)
    return table.float()


def sincos_2d(grid_size: int, dim: int) -> Tensor:
    """2-D variant: the first half of the width encodes the row, the second half the column; (grid², D)."""
    if dim % 4:
        raise VitkitError(f"2-D sinusoidal position embeddings need a width divisible by 4, got {dim}")
    axis = sincos_1d(grid_size, dim // 2)
    rows = axis[:, None, :].expand(grid_size, grid_size, -1)
    cols = axis[None, :, :].expand(grid_size, grid_size, -1)
    return torch.cat([rows, cols], dim=-1).reshape(grid_size * grid_size, dim)


def resample_pos_embed(pos_embed: Tensor, new_grid: int, num_prefix_tokens: int = 1) -> Tensor:
    """Bicubic resampling of a (1, prefix + g², D) table to (1, prefix + new_grid², D).

    The prefix (class token) rows are kept as they are; the grid part is treated as a g×g image.
    """
    prefix, grid = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    old = math.isqrt(grid.shape[1])
    if old * old != grid.shape[1]:
        raise VitkitError(f"position table with {grid.shape[1]} patch rows is not a square grid")
    if old == new_grid:
        return pos_embed.clone()
    dim = grid.shape[-1]
    img = grid.reshape(1, old, old, dim).permute(0, 3, 1, 2).float()
    img = F.interpolate(img, size=(new_grid, new_grid), mode="bicubic", align_corners=False, antialias=new_grid < old)
    grid = img.permute(0, 2, 3, 1).reshape(1, new_grid * new_grid, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid], dim=1)
