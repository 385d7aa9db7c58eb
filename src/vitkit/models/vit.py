"""The Vision Transformer of Dosovitskiy et al. (2021), written to be read top to bottom.

    z_0 = [x_class; x_p^1 E; ...; x_p^N E] + E_pos
    z'_l = MSA(LN(z_{l-1})) + z_{l-1}
    z_l  = MLP(LN(z'_l)) + z'_l
    y    = LN(z_L^0)            (or the mean of the patch tokens, `pool="mean"`)

Two capabilities beyond the plain forward, used by explanation and certification:
- `return_attention=True` also returns every layer's attention probabilities (B, heads, T, T);
- `keep` (B, K) runs on a subset of the patch tokens, each with its true position embedding, so
  fully masked patches are dropped from the sequence instead of being computed.

With `distill_token` the model is DeiT's (Touvron et al. 2021): a second learned token beside the
class token, with its own position embedding and head `head_dist`, trained towards a teacher's
predictions; the output is the mean of the two heads' logits.

Two options of Lee, Lee & Song (2021), "Vision Transformer for Small-Size Datasets", add the locality inductive
bias a ViT lacks, which is why it needs a large data set where a CNN does not:
- Shifted Patch Tokenization (`shifted_patches`): each patch is cut from the image concatenated along channels with
  its four diagonal shifts by half a patch, so a token sees a wider neighbourhood (5·C·P·P values, LayerNorm, then
  the linear projection);
- Locality Self-Attention (`locality_attention`): a learned temperature per head instead of the fixed 1/sqrt(d_k),
  and no token attends to itself (the diagonal of QK^T is masked), which sharpens attention towards other tokens.

Parameter names follow timm's VisionTransformer (`patch_embed.proj`, `blocks.N.attn.qkv`, ...), so
pre-trained weights map with few renames.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vitkit.errors import VitkitError
from vitkit.models.pos_embed import resample_pos_embed, sincos_1d, sincos_2d

POS_EMBED_KINDS = ("learned", "sincos1d", "sincos2d")
POOL_KINDS = ("cls", "mean")


@dataclass
class ViTConfig:
    """Everything that defines a ViT's shape; saved beside every checkpoint."""

    image_size: int = 224
    patch_size: int = 16
    in_channels: int = 3
    num_classes: int = 1000
    dim: int = 768
    depth: int = 12
    heads: int = 12
    mlp_dim: int = 3072
    qkv_bias: bool = True
    pos_embed: str = "learned"  # learned | sincos1d | sincos2d
    pool: str = "cls"  # cls | mean
    dropout: float = 0.0
    attn_dropout: float = 0.0
    drop_path: float = 0.0  # stochastic depth rate of the last block, linear from 0 at the first
    norm_eps: float = 1e-6
    distill_token: bool = False  # DeiT's distillation token and head (hard distillation, `vitkit train --distill hard`)
    shifted_patches: bool = False  # SPT (Lee et al. 2021): tokens of the image and its 4 diagonal half-patch shifts
    locality_attention: bool = False  # LSA (Lee et al. 2021): learned temperature per head, no attention to oneself

    def __post_init__(self) -> None:
        if self.image_size <= 0 or self.patch_size <= 0 or self.image_size % self.patch_size:
            raise VitkitError(
                f"image size {self.image_size} is not a multiple of patch size {self.patch_size}: "
                "choose a patch size that divides the image size (e.g. 32/4, 224/16)"
            )
        sizes = {"dim": self.dim, "depth": self.depth, "heads": self.heads, "mlp_dim": self.mlp_dim,
                 "in_channels": self.in_channels}
        for name, value in sizes.items():
            if value <= 0:
                raise VitkitError(f"{name} {value} must be positive: a ViT needs at least one of each")
        if self.num_classes < 0:
            raise VitkitError(f"num_classes {self.num_classes} is negative: pass the number of classes (0: no head)")
        for name in ("dropout", "attn_dropout", "drop_path"):
            if not 0 <= getattr(self, name) < 1:
                raise VitkitError(f"{name} {getattr(self, name)} is a rate and must lie in [0, 1), e.g. 0.1")
        if self.dim % self.heads:
            raise VitkitError(f"width {self.dim} is not divisible by {self.heads} heads: change dim or heads")
        if self.pos_embed not in POS_EMBED_KINDS:
            raise VitkitError(f"unknown position embedding {self.pos_embed!r}: use one of {', '.join(POS_EMBED_KINDS)}")
        if self.pool not in POOL_KINDS:
            raise VitkitError(f"unknown pooling {self.pool!r}: use one of {', '.join(POOL_KINDS)}")
        if self.shifted_patches and self.patch_size < 2:
            raise VitkitError(
                "shifted patch tokenization shifts by half a patch, nothing for 1-pixel patches: "
                "use a patch size of at least 2, or drop shifted_patches (--spt)"
            )

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: the class token, and the distillation token where there is one."""
        return 1 + self.distill_token

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ViTConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise VitkitError(f"unknown model config keys {sorted(unknown)}: known keys are {sorted(known)}")
        return cls(**d)


def shift_and_stack(x: Tensor, shift: int) -> Tensor:
    """(B, C, H, W) → (B, 5C, H, W): the image, then its four diagonal shifts by `shift` pixels, zero where
    shifted in. As the authors' code, crops of the image zero-padded by `shift` on every side, taken at its
    top-left, top-right, bottom-left and bottom-right corners, in that order: channel block k ≥ 1 at pixel (i, j)
    holds x[i + dy, j + dx] (0 outside the image) with (dy, dx) = (-s, -s), (-s, +s), (+s, -s), (+s, +s)."""
    H, W = x.shape[-2:]
    padded = F.pad(x, (shift, shift, shift, shift))
    corners = ((0, 0), (0, 2 * shift), (2 * shift, 0), (2 * shift, 2 * shift))
    return torch.cat([x, *(padded[..., r : r + H, c : c + W] for r, c in corners)], dim=1)


class PatchEmbed(nn.Module):
    """Cuts the image into P×P patches, flattens each to P·P·C values (channel-major, as timm's
    convolution weight) and projects it linearly to the model width.

    With `shifted` (Shifted Patch Tokenization, Lee et al. 2021) the image is first stacked with its four diagonal
    shifts by P//2 pixels (`shift_and_stack`), so each patch has 5·C·P·P values (the image's C channels first,
    then each shift's), which are layer-normalised (`norm`) before the projection."""

    def __init__(self, patch_size: int, in_channels: int, dim: int, shifted: bool = False, norm_eps: float = 1e-6):
        super().__init__()
        self.patch_size = patch_size
        self.shifted = shifted
        width = (5 if shifted else 1) * in_channels * patch_size * patch_size
        self.norm = nn.LayerNorm(width, eps=norm_eps) if shifted else None
        self.proj = nn.Linear(width, dim)

    def patchify(self, x: Tensor) -> Tensor:
        """(B, C, H, W) → (B, N, C·P·P), patches in row-major grid order; a view + one copy, no loop."""
        B, C, H, W = x.shape
        P = self.patch_size
        if H % P or W % P:
            raise VitkitError(f"input of {H}×{W} pixels is not a multiple of the patch size {P}: resize the images")
        x = x.reshape(B, C, H // P, P, W // P, P).permute(0, 2, 4, 1, 3, 5)
        return x.reshape(B, (H // P) * (W // P), C * P * P)

    def forward(self, x: Tensor, keep: Tensor | None = None) -> Tensor:
        if self.shifted:
            x = shift_and_stack(x, self.patch_size // 2)
        patches = self.patchify(x)
        if keep is not None:  # project only the patches that stay: dropped tokens cost nothing
            patches = torch.gather(patches, 1, keep[..., None].expand(-1, -1, patches.shape[-1]))
        if self.norm is not None:
            patches = self.norm(patches)
        return self.proj(patches)


class Attention(nn.Module):
    """Multi-head self-attention: softmax(QK^T/sqrt(d_k))V per head, heads concatenated, projected by W^O.

    With `locality` (Locality Self-Attention, Lee et al. 2021): softmax(M(QK^T·τ))V, where τ (`temperature`,
    one learned value per head as in the authors' code, the paper's single τ per layer generalised; initialised
    to 1/sqrt(d_k), so the model starts as the plain one but for the mask) replaces the fixed scale, and M sets
    each token's score for itself to -inf: a token attends only to the others."""

    def __init__(
        self, dim: int, heads: int, qkv_bias: bool = True, attn_dropout: float = 0.0, dropout: float = 0.0,
        locality: bool = False,
    ):
        super().__init__()
        self.heads = heads
        self.head_dim = dim // heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_dropout = attn_dropout
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(dropout)
        self.temperature = nn.Parameter(torch.full((heads,), self.head_dim**-0.5)) if locality else None

    def forward(self, x: Tensor, return_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        B, T, D = x.shape
        q, k, v = self.qkv(x).reshape(B, T, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        dropout_p = self.attn_dropout if self.training else 0.0
        mask = None
        if self.temperature is not None:
            # q is scaled by τ·sqrt(d_k), so that the kernels' 1/sqrt(d_k) below leaves the learned τ per head;
            # the mask is built for this T (token subsets change it), True where a token may attend: not itself.
            q = q * (self.temperature.view(-1, 1, 1) * self.head_dim**0.5)
            mask = ~torch.eye(T, dtype=torch.bool, device=x.device)
        if return_attention:
            # The explicit form, so the probabilities can be returned; the fused kernel below does not expose them.
            attn = (q * self.head_dim**-0.5) @ k.transpose(-2, -1)
            if mask is not None:
                attn = attn.masked_fill(~mask, float("-inf"))
            attn = attn.softmax(dim=-1)
            out = F.dropout(attn, dropout_p, self.training) @ v
        else:
            attn = None
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
        out = out.transpose(1, 2).reshape(B, T, D)
        return self.proj_drop(self.proj(out)), attn


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.fc2(self.drop(F.gelu(self.fc1(x)))))


class DropPath(nn.Module):
    """Stochastic depth: drops the whole residual branch for a random subset of samples."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: Tensor) -> Tensor:
        if not self.training or self.p == 0.0:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty(x.shape[0], *([1] * (x.ndim - 1))).bernoulli_(keep)
        return x * mask / keep


class Block(nn.Module):
    """Pre-norm encoder block: z' = MSA(LN(z)) + z; z = MLP(LN(z')) + z'."""

    def __init__(self, cfg: ViTConfig, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg.dim, cfg.heads, cfg.qkv_bias, cfg.attn_dropout, cfg.dropout, cfg.locality_attention)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = Mlp(cfg.dim, cfg.mlp_dim, cfg.dropout)
        self.drop_path = DropPath(drop_path)

    def forward(self, x: Tensor, return_attention: bool = False) -> tuple[Tensor, Tensor | None]:
        y, attn = self.attn(self.norm1(x), return_attention)
        x = x + self.drop_path(y)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, attn


class VisionTransformer(nn.Module):
    """ViT with a class token (and optionally a distillation token), learned or sinusoidal position embeddings
    and a linear head."""

    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg.patch_size, cfg.in_channels, cfg.dim, cfg.shifted_patches, cfg.norm_eps)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.distill_token else None
        n_tokens = cfg.num_prefix_tokens + cfg.num_patches
        if cfg.pos_embed == "learned":
            self.pos_embed = nn.Parameter(torch.zeros(1, n_tokens, cfg.dim))
        else:
            # Fixed encodings are buffers: saved with the weights (so a checkpoint is self-contained) but not trained.
            table = sincos_1d(n_tokens, cfg.dim) if cfg.pos_embed == "sincos1d" else _sincos_2d_with_cls(cfg)
            self.register_buffer("pos_embed", table[None], persistent=True)
        self.pos_drop = nn.Dropout(cfg.dropout)
        rates = [cfg.drop_path * i / max(cfg.depth - 1, 1) for i in range(cfg.depth)]
        self.blocks = nn.ModuleList(Block(cfg, r) for r in rates)
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.head = nn.Linear(cfg.dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()
        self.head_dist = (
            (nn.Linear(cfg.dim, cfg.num_classes) if cfg.num_classes > 0 else nn.Identity()) if cfg.distill_token else None
        )
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """timm's initialisation: truncated normal (std 0.02) for linear layers and embeddings, zero heads."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, Attention) and m.temperature is not None:
                nn.init.constant_(m.temperature, m.head_dim**-0.5)
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        if self.dist_token is not None:
            nn.init.trunc_normal_(self.dist_token, std=0.02)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for head in (self.head, self.head_dist):
            if isinstance(head, nn.Linear):
                nn.init.zeros_(head.weight)
                nn.init.zeros_(head.bias)

    def forward_features(
        self, x: Tensor, keep: Tensor | None = None, return_attention: bool = False
    ) -> tuple[Tensor, list[Tensor]]:
        """Normalised tokens (B, prefix + K, D), the class token first (then the distillation token, if any),
        and the attention maps (empty unless asked).

        keep: (B, K) int64 indices of the patches to keep (row-major over the grid, 0..N-1); every image
        in the batch keeps the same number K. None keeps all N.
        """
        if x.shape[1] != self.cfg.in_channels:
            raise VitkitError(
                f"the model expects {self.cfg.in_channels}-channel images but got {x.shape[1]} channels: "
                "use data with the right number of channels or a model configured for it"
            )
        tokens = self.patch_embed(x, keep)
        n_patches = (x.shape[-2] // self.cfg.patch_size) * (x.shape[-1] // self.cfg.patch_size)
        pos, n_prefix = self.pos_embed, self.cfg.num_prefix_tokens
        if pos.shape[1] != n_prefix + n_patches:
            raise VitkitError(
                f"input of {x.shape[-2]}×{x.shape[-1]} pixels gives {n_patches} patches but the model was built "
                f"for {pos.shape[1] - n_prefix}: resize the images to {self.cfg.image_size} or resample the position "
                "embeddings (vitkit.models.resample_pos_embed)"
            )
        patch_pos = pos[:, n_prefix:]
        if keep is None:
            tokens = tokens + patch_pos
        else:
            tokens = tokens + patch_pos.expand(x.shape[0], -1, -1).gather(1, keep[..., None].expand(-1, -1, pos.shape[-1]))
        prefix = self.cls_token if self.dist_token is None else torch.cat([self.cls_token, self.dist_token], dim=1)
        prefix = (prefix + pos[:, :n_prefix]).expand(x.shape[0], -1, -1)
        z = self.pos_drop(torch.cat([prefix, tokens], dim=1))
        attentions = []
        for block in self.blocks:
            z, attn = block(z, return_attention)
            if return_attention:
                attentions.append(attn)
        return self.norm(z), attentions

    def pool(self, z: Tensor) -> Tensor:
        """The class head's input: the class token, or the mean of the patch tokens."""
        return z[:, 0] if self.cfg.pool == "cls" else z[:, self.cfg.num_prefix_tokens :].mean(dim=1)

    def forward(
        self, x: Tensor, keep: Tensor | None = None, return_attention: bool = False, both_heads: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """Logits (B, classes); with `return_attention`, also the list of (B, heads, T, T) attention maps.

        With a distillation token the logits are the mean of the class head's and the distillation head's
        (DeiT's prediction); `both_heads` returns them stacked instead, (B, 2, classes), class head first,
        for training each towards its own target.
        """
        z, attentions = self.forward_features(x, keep, return_attention)
        logits = self.head(self.pool(z))
        if self.head_dist is not None:
            heads = torch.stack([logits, self.head_dist(z[:, 1])], dim=1)
            logits = heads if both_heads else heads.mean(dim=1)
        elif both_heads:
            raise VitkitError("both_heads needs a model with a distillation token (ViTConfig(distill_token=True))")
        return (logits, attentions) if return_attention else logits

    def resize(self, image_size: int) -> None:
        """Adapts the model to another image size by resampling the position embeddings (same patch size)."""
        cfg = ViTConfig.from_dict({**self.cfg.to_dict(), "image_size": image_size})
        if isinstance(self.pos_embed, nn.Parameter):
            self.pos_embed = nn.Parameter(resample_pos_embed(self.pos_embed.data, cfg.grid_size, cfg.num_prefix_tokens))
        else:
            n_tokens = cfg.num_prefix_tokens + cfg.num_patches
            table = sincos_1d(n_tokens, cfg.dim) if cfg.pos_embed == "sincos1d" else _sincos_2d_with_cls(cfg)
            self.pos_embed = table[None].to(self.pos_embed)
        self.cfg = cfg


def _sincos_2d_with_cls(cfg: ViTConfig) -> Tensor:
    # The class (and distillation) token has no place on the grid: it gets a zero encoding (as in MAE).
    return torch.cat([torch.zeros(cfg.num_prefix_tokens, cfg.dim), sincos_2d(cfg.grid_size, cfg.dim)], dim=0)


def num_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)

