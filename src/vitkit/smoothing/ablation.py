"""Structured ablations for derandomized smoothing (Levine & Feizi 2020; Salman et al. 2022).

An ablation keeps one band of the image and masks the rest:
- column: b adjacent columns starting at column p, wrapping around the right edge (all rows kept);
- row:    b adjacent rows starting at row p, wrapping around the bottom edge;
- block:  a b×b square at (r, p), wrapping on both axes.
With stride s only every s-th start position is used. Ablation a keeps pixel (i, j) iff
(i − r_a) mod H < b_rows and (j − c_a) mod W < b_cols, so every mask is one comparison.

Δ(m), the number of ablations an m×m patch can touch, is computed exactly by counting along each axis;
it equals the papers' ⌈(m+b−1)/s⌉ (columns, rows) and its square (blocks) whenever s divides the image
side, and stays correct (larger) when it does not, where the formula would undercount at the wrap.

For a ViT the patch tokens an ablation masks entirely carry no information: `ablated_logits` drops them
from the sequence (keeping the true position embeddings of the rest), which is what makes smoothing a
ViT cheap. Partly covered tokens stay, with their masked pixels set to the fill value.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

import torch
from torch import Tensor, nn

from vitkit.errors import VitkitError

KINDS = ("column", "row", "block")


@dataclass(frozen=True)
class Ablation:
    """A family of ablations of (H, W) images: `kind` column | row | block, band width `size` (b),
    start positions every `stride` (s) pixels."""

    kind: str
    size: int
    image_size: tuple[int, int]
    stride: int = 1

    def __post_init__(self) -> None:
        object.__setattr__(self, "image_size", tuple(int(v) for v in self.image_size))  # lists compare unequal
        H, W = self.image_size
        if self.kind not in KINDS:
            raise VitkitError(f"unknown ablation {self.kind!r}: use one of {', '.join(KINDS)}")
        side = {"column": W, "row": H, "block": min(H, W)}[self.kind]
        if not 1 <= self.size <= side:
            raise VitkitError(f"ablation size {self.size} must lie in 1..{side} for {H}×{W} images: pass e.g. --ablation-size 4")
        if not 1 <= self.stride <= side:
            raise VitkitError(f"ablation stride {self.stride} must lie in 1..{side}: pass e.g. --ablation-stride 1")

    # -- which ablations --------------------------------------------------------------------

    def _axes(self) -> tuple[tuple[int, int, int], tuple[int, int, int]]:
        """(length, band, stride) of the row axis and the column axis; an unablated axis is one full band."""
        H, W = self.image_size
        b, s = self.size, self.stride
        rows = (H, b, s) if self.kind in ("row", "block") else (H, H, H)
        cols = (W, b, s) if self.kind in ("column", "block") else (W, W, W)
        return rows, cols

    def positions(self, device: torch.device | str = "cpu") -> Tensor:
        """(A, 2) top-left (row, column) of every ablation; blocks in row-major order."""
        (H, _, sr), (W, _, sc) = self._axes()
        r = torch.arange(0, H, sr, device=device)
        c = torch.arange(0, W, sc, device=device)
        return torch.cartesian_prod(r, c).reshape(-1, 2)

    @property
    def num_ablations(self) -> int:
        (H, _, sr), (W, _, sc) = self._axes()
        return -(-H // sr) * -(-W // sc)

    def random_positions(self, n: int, generator: torch.Generator | None = None, device="cpu") -> Tensor:
        """(n, 2) positions drawn uniformly from `positions()` (for training on ablations)."""
        all_positions = self.positions(device)
        pick = torch.randint(len(all_positions), (n,), generator=generator)  # on the CPU: cheap, and one stream
        return all_positions[pick.to(device)]

    def masks(self, positions: Tensor) -> Tensor:
        """(A, H, W) bool, True where ablation a keeps the pixel."""
        (H, br, _), (W, bc, _) = self._axes()
        rows = (torch.arange(H, device=positions.device) - positions[:, :1]) % H < br  # (A, H)
        cols = (torch.arange(W, device=positions.device) - positions[:, 1:]) % W < bc  # (A, W)
        return rows[:, :, None] & cols[:, None, :]

    # -- what a patch can touch -------------------------------------------------------------

    def delta(self, patch_size: int) -> int:
        """Δ: the largest number of ablations one m×m patch (anywhere inside the image) intersects."""
        (H, br, sr), (W, bc, sc) = self._axes()
        if not 1 <= patch_size <= min(H, W):
            raise VitkitError(f"patch size {patch_size} must lie in 1..{min(H, W)} for {H}×{W} images")
        return _max_touched(H, br, sr, patch_size) * _max_touched(W, bc, sc, patch_size)

    def to_dict(self) -> dict:
        return {**asdict(self), "image_size": list(self.image_size)}

    @classmethod
    def from_dict(cls, d: dict) -> Ablation:
        return cls(d["kind"], int(d["size"]), tuple(d["image_size"]), int(d.get("stride", 1)))


def _max_touched(length: int, band: int, stride: int, m: int) -> int:
    """Along one axis: the most cyclic bands [p, p+band) (p = 0, stride, ...) that one segment [j, j+m),
    0 ≤ j ≤ length−m, meets. They meet iff j lies in the band or p lies in the segment."""
    p = torch.arange(0, length, stride)[None, :]
    j = torch.arange(0, length - m + 1)[:, None]
    meets = ((j - p) % length < band) | ((p - j) % length < m)
    return int(meets.sum(1).max())


# -- applying ablations ---------------------------------------------------------------------


def token_masks(pixel_masks: Tensor, patch_size: int) -> Tensor:
    """(A, N) bool: the patch tokens an ablation keeps at least one pixel of (row-major over the grid)."""
    A, H, W = pixel_masks.shape
    P = patch_size
    if H % P or W % P:
        raise VitkitError(f"{H}×{W} images do not split into {P}×{P} patches: use the model's image size")
    return pixel_masks.reshape(A, H // P, P, W // P, P).any(dim=(2, 4)).reshape(A, -1)


def ablated_logits(
    model: nn.Module | Callable[..., Tensor],
    x: Tensor,
    masks: Tensor,
    *,
    fill: float = 0.0,
    patch_size: int | None = None,
) -> Tensor:
    """Logits of `model` on x (B, C, H, W), each image ablated by its own mask (B, H, W).

    Masked pixels are set to `fill`. With `patch_size` (a vitkit ViT) the tokens that are masked
    entirely are dropped from the sequence: images are grouped by how many tokens they keep (a forward
    needs one length), each group runs once with `keep=`, and the logits come back in input order.
    Without it the model sees the full masked image (any base model, e.g. a CNN).
    """
    x = torch.where(masks[:, None], x, torch.as_tensor(fill, dtype=x.dtype, device=x.device))
    if patch_size is None:
        return model(x)
    tokens = token_masks(masks, patch_size)
    counts = tokens.sum(1)
    lengths = counts.unique()
    if len(lengths) == 1:  # the common case in certification: one group, no scatter
        keep = tokens.nonzero()[:, 1].view(len(x), int(lengths))
        return model(x, keep=keep)
    out = None
    for k in lengths.tolist():
        rows = (counts == k).nonzero().flatten()
        keep = tokens[rows].nonzero()[:, 1].view(len(rows), k)  # nonzero is row-major: ascending per row
        logits = model(x[rows], keep=keep)
        if out is None:
            out = logits.new_empty(len(x), logits.shape[1])
        out[rows] = logits
    return out


class RandomlyAblated(nn.Module):
    """`model` on one random ablation of each image (positions uniform over the family): what training on
    ablations optimises, and how it is validated. Takes normalised images; masked pixels get `fill`.

    With a `seed` the positions come from a private generator (a validation that is the same every
    epoch); without one from torch's global generator, which the trainer saves and restores on resume.
    """

    def __init__(self, model: nn.Module, ablation: Ablation, *, patch_size: int | None, fill: float = 0.0,
                 seed: int | None = None):
        super().__init__()
        self.model = model
        self.ablation = ablation
        self.patch_size = patch_size
        self.fill = fill
        self.generator = torch.Generator().manual_seed(seed) if seed is not None else None

    def forward(self, x: Tensor) -> Tensor:
        positions = self.ablation.random_positions(len(x), self.generator, device=x.device)
        return ablated_logits(self.model, x, self.ablation.masks(positions), fill=self.fill, patch_size=self.patch_size)
