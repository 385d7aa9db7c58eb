"""Size, cost and memory of a ViT, computed from its config alone (no model is built).

Counts, with T = 1 + K tokens (K kept patches, N by default; 2 + K with a distillation token), width D,
MLP width M, h heads and patches of C·P·P values:

    parameters  patch projection C·P·P·D + D, class token D, learned position table (1 + N)·D,
                per block 2 LayerNorms 4D, qkv 3D² (+3D bias), proj D² + D, fc1 D·M + M, fc2 M·D + D,
                final LayerNorm 2D, head D·classes + classes; a distillation token adds D, a
                position row D and a second head
    MACs        patch projection K·C·P·P·D, per block qkv 3·T·D², QKᵀ T²·D, AV T²·D, proj T·D²,
                fc1 T·D·M, fc2 T·M·D, head D·classes

Shifted Patch Tokenization (`shifted_patches`) makes each patch 5·C·P·P values and adds their LayerNorm
(2·5·C·P·P parameters, no MACs); Locality Self-Attention (`locality_attention`) adds h temperatures per block and
no MACs (the diagonal mask and the scaling of q are elementwise).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

from vitkit.errors import VitkitError
from vitkit.models.vit import ViTConfig

FLOAT32_BYTES = 4


class LayerRow(NamedTuple):
    """One line of the summary table; `macs` is per image."""

    name: str
    output_shape: tuple[int, ...]
    parameters: int
    macs: int


@dataclass
class ModelSummary:
    """Totals for one model shape. MACs and activation bytes are per image; `layers` use `batch_size`."""

    config: ViTConfig
    batch_size: int
    parameters: int
    trainable_parameters: int
    tokens: int
    macs_per_image: int
    activation_bytes_per_image: int
    layers: list[LayerRow] = field(default_factory=list)


def _block_activation_floats(tokens: int, dim: int, mlp_dim: int, heads: int, locality: bool = False) -> int:
    """Floats one block keeps for backward, per image, with the fused attention kernel used in training:

        norm1 input T·D, qkv input T·D, q/k/v 3·T·D, attention output T·D (kept by the kernel) and its
        head-merged copy fed to proj T·D, norm2 input T·D, fc1 input T·D, GELU input T·M, fc2 input T·M,
        plus per-token statistics: 2 LayerNorms × (mean, rstd) 4·T and the softmax log-sum-exp h·T.

    That is T·(8D + 2M + 4 + h). The fused kernel recomputes the T×T attention matrix in backward,
    so nothing quadratic in T is stored; dropout masks (when dropout > 0) are not counted.
    Locality Self-Attention keeps q scaled by its temperatures beside q itself: T·D more.
    """
    return tokens * (8 * dim + 2 * mlp_dim + 4 + heads + (dim if locality else 0))


def summarize(cfg: ViTConfig, batch_size: int = 1, keep_tokens: int | None = None) -> ModelSummary:
    """Parameters, MACs and training-activation memory of `cfg` on `batch_size` images.

    MACs count the multiply-accumulates of matrix products only (projections, attention products,
    head); LayerNorm, softmax, GELU, additions and pooling are left out, as is usual (FLOPs ≈ 2·MACs).
    Activation bytes estimate the float32 tensors autograd keeps for backward during training: the
    patch pixels, every block's saved tensors (see `_block_activation_floats`), the final LayerNorm
    input; not parameters, gradients, optimizer state or allocator slack.

    keep_tokens: number of patches kept per image (as with `forward(keep=...)`); None keeps all.
    """
    if batch_size < 1:
        raise VitkitError(f"batch size must be at least 1, got {batch_size}")
    n = cfg.num_patches
    kept = n if keep_tokens is None else keep_tokens
    if not 1 <= kept <= n:
        raise VitkitError(f"keep_tokens={keep_tokens} is out of range: keep between 1 and {n} patches")
    prefix = cfg.num_prefix_tokens
    B, T, D, M = batch_size, prefix + kept, cfg.dim, cfg.mlp_dim
    patch_dim = (5 if cfg.shifted_patches else 1) * cfg.in_channels * cfg.patch_size**2

    qkv_bias = 3 * D if cfg.qkv_bias else 0
    block_params = 4 * D + (3 * D * D + qkv_bias) + (D * D + D) + (D * M + M) + (M * D + D)
    block_params += cfg.heads if cfg.locality_attention else 0  # LSA's temperatures
    block_macs = 3 * T * D * D + 2 * T * T * D + T * D * D + 2 * T * D * M
    # The fixed sinusoidal tables are buffers, not parameters.
    embed_params = prefix * D + ((prefix + n) * D if cfg.pos_embed == "learned" else 0)
    head_params = D * cfg.num_classes + cfg.num_classes
    layers = [
        LayerRow("patch_embed (shifted)" if cfg.shifted_patches else "patch_embed", (B, kept, D),
                 patch_dim * D + D + (2 * patch_dim if cfg.shifted_patches else 0), kept * patch_dim * D),
        LayerRow("cls_token + pos_embed" if prefix == 1 else "cls/dist_token + pos_embed", (B, T, D), embed_params, 0),
        *(LayerRow(f"blocks.{i}", (B, T, D), block_params, block_macs) for i in range(cfg.depth)),
        LayerRow("norm", (B, T, D), 2 * D, 0),
        LayerRow(f"pool ({cfg.pool})", (B, D), 0, 0),
    ]
    if cfg.num_classes > 0:  # num_classes=0 builds a feature extractor without a head
        layers.append(LayerRow("head", (B, cfg.num_classes), head_params, D * cfg.num_classes))
        if cfg.distill_token:
            layers.append(LayerRow("head_dist", (B, cfg.num_classes), head_params, D * cfg.num_classes))
    parameters = sum(row.parameters for row in layers)

    # The projection's input; with SPT also the LayerNorm's input and its per-patch mean and rstd.
    patch_floats = kept * patch_dim + (kept * (patch_dim + 2) if cfg.shifted_patches else 0)
    floats = patch_floats + cfg.depth * _block_activation_floats(T, D, M, cfg.heads, cfg.locality_attention) + T * D
    return ModelSummary(
        config=cfg,
        batch_size=batch_size,
        parameters=parameters,
        trainable_parameters=parameters,  # everything that is a parameter is trained
        tokens=T,
        macs_per_image=sum(row.macs for row in layers),
        activation_bytes_per_image=floats * FLOAT32_BYTES,
        layers=layers,
    )


def _count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def format_summary(s: ModelSummary) -> str:
    """A plain-text table of the layers followed by the totals in human units (M params, GMACs, MB)."""
    header = ("Layer", "Output shape", "Params", "MACs/image")
    rows = [(r.name, "×".join(map(str, r.output_shape)), _count(r.parameters), _count(r.macs)) for r in s.layers]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(4)]

    def line(row: tuple[str, ...]) -> str:
        return "  ".join(cell.ljust(w) if i < 2 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))

    rule = "-" * len(line(header))
    act_mb = s.activation_bytes_per_image / 1e6
    cfg = s.config
    totals = [
        f"Input: {cfg.in_channels}×{cfg.image_size}×{cfg.image_size}, patch {cfg.patch_size}, {s.tokens} tokens"
        + "".join(f", {name}" for name, on in (("SPT", cfg.shifted_patches), ("LSA", cfg.locality_attention)) if on),
        f"Parameters: {s.parameters / 1e6:.2f}M ({s.parameters:,}), trainable {s.trainable_parameters / 1e6:.2f}M",
        f"Compute: {s.macs_per_image / 1e9:.3f} GMACs per image (matmuls only; ≈ {2 * s.macs_per_image / 1e9:.3f} GFLOPs)",
        f"Training activations (float32): {act_mb:.2f} MB per image, "
        f"{act_mb * s.batch_size:.1f} MB for a batch of {s.batch_size}",
    ]
    return "\n".join([line(header), rule, *map(line, rows), rule, *totals])
