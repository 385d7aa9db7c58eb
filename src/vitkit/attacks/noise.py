"""Random numbers keyed by image, so that an attack on an image does not depend on its batch.

A `torch.Generator` hands out numbers in sequence: image i of a batch would get the i-th slice of a
draw, and so a different random start when attacked alone, in another batch or at another position.
Here every number is a hash (splitmix64, in wrapping int64 tensor arithmetic) of a seed, the image's
pixels, a stream number and the element's index: batched, the same on every device, and the same
for an image wherever it stands. The one thing drawn from a generator is the seed.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

# splitmix64's constants as signed int64 (torch has no uint64 arithmetic; int64 wraps the same way).
GOLDEN = 0x9E3779B97F4A7C15 - 2**64
MUL1 = 0xBF58476D1CE4E5B9 - 2**64
MUL2 = 0x94D049BB133111EB - 2**64


def _shift_right(z: Tensor, bits: int) -> Tensor:
    """Logical right shift: torch's >> on int64 is arithmetic (copies the sign bit)."""
    return (z >> bits) & ((1 << (64 - bits)) - 1)


def mix(z: Tensor) -> Tensor:
    """splitmix64's finaliser on an int64 tensor: a bijection that scrambles every bit."""
    z = (z ^ _shift_right(z, 30)) * MUL1
    z = (z ^ _shift_right(z, 27)) * MUL2
    return z ^ _shift_right(z, 31)


def draw_seed(generator: torch.Generator | None = None) -> int:
    """One seed from `generator` (default: torch's global generator, so torch.manual_seed applies)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**62, (), generator=generator, device=device))


def image_keys(images: Tensor, seed: int) -> Tensor:
    """(B,) int64 keys: a hash of each image's pixels, read on the 8-bit grid, and of the seed."""
    levels = (images.detach().flatten(1) * 255).round().long()
    weights = mix(torch.arange(levels.shape[1], device=levels.device) * GOLDEN) & 0xFFFFFFFF
    # 8-bit levels times 32-bit weights: the sum cannot overflow below 2**23 values per image.
    return mix(mix((levels * weights).sum(1)) + seed)


def uniform(keys: Tensor, stream: int | Tensor, shape: tuple[int, ...]) -> Tensor:
    """(B, *shape) float32 on [0, 1), a pure function of (key, stream, element index).

    stream: an int, or one per image (B,); different streams give independent numbers.
    """
    state = mix(keys + stream)
    counter = torch.arange(1, math.prod(shape) + 1, device=keys.device) * GOLDEN
    bits = _shift_right(mix(state[:, None] + counter), 40)  # the top 24 bits: exact in float32
    return (bits.float() * 2.0**-24).reshape(len(keys), *shape)


def normal(keys: Tensor, stream: int, shape: tuple[int, ...]) -> Tensor:
    """(B, *shape) standard normal numbers (Box-Muller on two uniforms of the stream)."""
    u = uniform(keys, stream, (2, *shape))
    return (-2 * torch.log1p(-u[:, 0])).sqrt() * torch.cos(2 * math.pi * u[:, 1])
