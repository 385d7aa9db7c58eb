"""Pre-trained timm and Hugging Face ViT weights in vitkit's VisionTransformer.

Two layouts are read and recognised by their keys:
- timm's VisionTransformer, whose parameter names vitkit's follow; only the patch projection differs
  (timm: a P-strided convolution (D, C, P, P); vitkit: a linear map of the flattened C·P·P patch);
- Hugging Face's ViTModel / ViTForImageClassification (`vit.embeddings...`, `vit.encoder.layer.N...`,
  separate query/key/value), renamed to timm's names with query, key and value fused into qkv.

The model's shape is read off the tensors (timm's distilled DeiTs, with `dist_token` and `head_dist`, load
as a ViT with a distillation token). `load_pretrained` then adapts the weights: a new class count
(a new, zero-initialised head), another image size (position embeddings resampled) or another patch
size (the patch projection resampled as in FlexiViT, Beyer et al. 2023).
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

from vitkit.errors import VitkitError
from vitkit.models.pos_embed import resample_pos_embed
from vitkit.models.presets import PRESETS
from vitkit.models.vit import ViTConfig, VisionTransformer

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt")
HUB_FILES = ("model.safetensors", "pytorch_model.bin")  # in order of preference
# ViTConfig fields that change no tensor shape, so they may differ from the pre-trained model's.
FREE_OPTIONS = ("pool", "dropout", "attn_dropout", "drop_path")

# Hugging Face name (without its `vit.` prefix) → timm name; query/key/value are fused separately.
_HF_RENAMES = [
    (r"^embeddings\.cls_token$", "cls_token"),
    (r"^embeddings\.position_embeddings$", "pos_embed"),
    (r"^embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"^encoder\.layer\.(\d+)\.layernorm_before\.", r"blocks.\1.norm1."),
    (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"blocks.\1.attn.proj."),
    (r"^encoder\.layer\.(\d+)\.layernorm_after\.", r"blocks.\1.norm2."),
    (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"blocks.\1.mlp.fc1."),
    (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"blocks.\1.mlp.fc2."),
    (r"^layernorm\.", "norm."),
    (r"^classifier\.", "head."),
]
_HF_QKV = re.compile(r"^encoder\.layer\.(\d+)\.attention\.attention\.(query|key|value)\.(weight|bias)$")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a .safetensors file, or of a .bin/.pth/.pt state dict read with `weights_only=True`
    (tensors and plain containers only: nothing else is unpickled). A {"model": ...} or {"state_dict": ...}
    wrapper, as in DeiT's released files, is unwrapped."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # a damaged or foreign file is the user's, not our bug
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VitkitError(
            f"cannot read weights from {path} ({reason}): pass a .safetensors file or a state dict saved with torch.save"
        ) from None
    for wrapper in ("model", "state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise VitkitError(f"{path} does not hold a state dict (a mapping of names to tensors): pass model weights")
    return state


def download(name: str) -> Path:
    """The weights file of a Hugging Face hub model, cached by huggingface_hub: `timm/<name>` for a timm name
    (e.g. `vit_base_patch16_224.augreg_in21k`), else the named repository (e.g. `google/vit-base-patch16-224`),
    its model.safetensors or pytorch_model.bin, with its config.json beside it where it has one."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
    except ImportError:
        raise VitkitError(
            f"{name!r} is not a local file, and downloading it needs huggingface_hub: "
            "pip install huggingface_hub, or pass a local weights file"
        ) from None
    repo = name if "/" in name else f"timm/{name}"

    def fetch(filename: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo, filename))
        except LocalEntryNotFoundError:  # offline and not cached: a subclass of the one below, so caught first
            raise
        except EntryNotFoundError:
            return None

    try:
        weights = next((p for p in map(fetch, HUB_FILES) if p is not None), None)
        if weights is not None and "/" in name:
            fetch("config.json")  # Hugging Face models: the head count and norm epsilon live there
    except RepositoryNotFoundError:
        hint = " (timm's repositories carry the pretrained tag, e.g. deit_tiny_patch16_224.fb_in1k)" if "." not in name else ""
        raise VitkitError(
            f"the Hugging Face hub has no repository {repo}, or it is private or gated{hint}: "
            "check the name, or pass a local file"
        ) from None
    except Exception as e:  # no network, proxy, gated repository, rate limit, ...
        raise VitkitError(
            f"cannot download {name!r} from the Hugging Face hub ({type(e).__name__}: {e}): "
            "check the network, or pass a local .safetensors/.bin file"
        ) from None
    if weights is None:
        raise VitkitError(f"{repo} on the Hugging Face hub has neither {' nor '.join(HUB_FILES)}: pass a local file")
    return weights


def resolve_weights(source: str | Path) -> Path:
    """A weights file, a folder holding model.safetensors or pytorch_model.bin, or else a hub name, downloaded."""
    path = Path(source).expanduser()
    if path.is_dir():
        for name in HUB_FILES:
            if (path / name).is_file():
                return path / name
        raise VitkitError(f"folder {path} holds neither {' nor '.join(HUB_FILES)}: pass the weights file itself")
    if path.is_file():
        return path
    # A hub name is `model` or `org/model`; anything else that names no file is a mistyped path.
    text = str(source)
    if path.suffix in WEIGHT_SUFFIXES or text.startswith((".", "/", "~")) or text.count("/") > 1:
        raise VitkitError(f"weights file {path} does not exist: check the path, or pass a hub name")
    return download(text)


def timm_state_dict_from_hf(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """A Hugging Face ViTModel / ViTForImageClassification state dict under timm's names.

    query, key and value are concatenated in that order into qkv (timm's and vitkit's layout); the pooler
    (dense + tanh on the class token, unused by classification) is dropped; unknown keys keep their names,
    so that the shape check names them.
    """
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, Tensor]] = {}
    for key, value in state_dict.items():
        key = key.removeprefix("vit.")
        if key.startswith("pooler."):
            continue
        if m := _HF_QKV.match(key):
            qkv.setdefault(f"blocks.{m[1]}.attn.qkv.{m[3]}", {})[m[2]] = value
            continue
        for pattern, name in _HF_RENAMES:
            key, n = re.subn(pattern, name, key)
            if n:
                break
        out[key] = value
    for key, parts in qkv.items():
        if len(parts) != 3:
            raise VitkitError(f"the Hugging Face weights have only {sorted(parts)} for {key}: the file is incomplete")
        out[key] = torch.cat([parts["query"], parts["key"], parts["value"]])
    return out


def default_heads(dim: int, depth: int, mlp_dim: int) -> int:
    """Heads of a standard shape: the preset's where one matches (ViT-H has 16 heads of 80), else 64 wide."""
    for shape in PRESETS.values():
        if (shape["dim"], shape["depth"], shape["mlp_dim"]) == (dim, depth, mlp_dim):
            return shape["heads"]
    return max(1, dim // 64)


def infer_config(state: dict[str, Tensor], heads: int | None = None, norm_eps: float = 1e-6) -> ViTConfig:
    """The ViTConfig of a timm-layout state dict (4-D patch projection), read off its tensor shapes."""

    def get(key: str) -> Tensor:
        if key not in state:
            raise VitkitError(f"the ViT weights have no {key}: pass a complete timm or Hugging Face ViT checkpoint")
        return state[key]

    proj = get("patch_embed.proj.weight")
    if proj.ndim != 4 or proj.shape[-1] != proj.shape[-2]:
        raise VitkitError(
            f"patch_embed.proj.weight has shape {tuple(proj.shape)}, not (D, C, P, P) of square patches: pass timm or "
            "Hugging Face weights (a vitkit checkpoint, whose projection is flattened, loads with vitkit.train.load_model)"
        )
    dim, channels, patch = proj.shape[0], proj.shape[1], proj.shape[-1]
    depth = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
    mlp_dim = get("blocks.0.mlp.fc1.weight").shape[0]
    distill_token = "dist_token" in state
    n_prefix = 1 + distill_token
    n_patches = get("pos_embed").shape[1] - n_prefix  # the class (and distillation) token's rows first
    grid = math.isqrt(max(n_patches, 0))
    if grid * grid != n_patches:
        raise VitkitError(
            f"the position table has {n_patches + n_prefix} rows, not {n_prefix} prefix token(s) plus a square grid: "
            "only ViTs with a class token (and a distillation token) and one position per patch load (no register tokens)"
        )
    return ViTConfig(
        image_size=grid * patch, patch_size=patch, in_channels=channels,
        num_classes=state["head.weight"].shape[0] if "head.weight" in state else 0,
        dim=dim, depth=depth, heads=heads or default_heads(dim, depth, mlp_dim), mlp_dim=mlp_dim,
        qkv_bias="blocks.0.attn.qkv.bias" in state, norm_eps=norm_eps, distill_token=distill_token,
    )


def read_pretrained(source: str | Path, heads: int | None = None) -> tuple[dict[str, Tensor], ViTConfig]:
    """The weights of `source` (file, folder or hub name) as a state dict of `VisionTransformer(config)`, and
    that config. Heads: `heads`, else a Hugging Face config.json beside the file, else `default_heads`."""
    path = resolve_weights(source)
    state = {k: v.float() for k, v in read_state_dict(path).items()}
    if "patch_embed.proj.weight" in state:
        layout, norm_eps = "timm", 1e-6
    elif any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in state):
        layout = "Hugging Face"
        state = timm_state_dict_from_hf(state)
        hf = _read_json(path.parent / "config.json")
        heads = heads or hf.get("num_attention_heads")
        norm_eps = hf.get("layer_norm_eps", 1e-12)  # the default of transformers' ViTConfig
    else:
        keys = sorted(state)
        raise VitkitError(
            f"{path} holds neither timm nor Hugging Face ViT weights (keys {keys[:4]}{'...' if len(keys) > 4 else ''}): "
            "pass a timm VisionTransformer or Hugging Face ViTModel checkpoint"
        )
    cfg = infer_config(state, heads, norm_eps)
    state["patch_embed.proj.weight"] = state["patch_embed.proj.weight"].flatten(1)
    _check_fits(state, cfg, f"the {layout} weights in {path}")
    return state, cfg


def resample_patch_projection(weight: Tensor, patch_size: int) -> Tensor:
    """FlexiViT's resize of a (D, C, P, P) patch projection to (D, C, P', P').

    With B the (P'², P²) matrix of resizing a P×P patch to P'×P' (bilinear, antialiased as in FlexiViT; built
    by resizing the basis images), w' = pinv(Bᵀ) w, so that ⟨B x, w'⟩ = ⟨x, Bᵀ w'⟩ ≈ ⟨x, w⟩: a resized
    patch gives the token the original patch gave. Exact for every x when P' ≥ P; when P' < P, Bᵀ w' is
    the least-squares fit of w, and exact for patches in the range of Bᵀ (smooth ones).
    """
    old = weight.shape[-1]
    if old == patch_size:
        return weight.clone()
    basis = torch.eye(old * old, dtype=torch.float64).reshape(old * old, 1, old, old)
    resized = F.interpolate(basis, size=(patch_size, patch_size), mode="bilinear", align_corners=False, antialias=True)
    B = resized.reshape(old * old, patch_size * patch_size).T  # column j: the resized j-th basis image
    # Per row w of the weight (one output, one channel): w' = pinv(Bᵀ) w, i.e. w'ᵀ = wᵀ pinv(B).
    w = weight.double().reshape(-1, old * old) @ torch.linalg.pinv(B)
    return w.reshape(*weight.shape[:2], patch_size, patch_size).to(weight.dtype)


def load_pretrained(
    source: str | Path,
    *,
    num_classes: int | None = None,
    image_size: int | None = None,
    patch_size: int | None = None,
    heads: int | None = None,
    **options: Any,
) -> VisionTransformer:
    """A VisionTransformer with the pre-trained weights of `source`: a timm or Hugging Face ViT checkpoint
    (.safetensors, or .bin/.pth/.pt read with weights_only), a folder holding one, or a hub name
    (`deit_tiny_patch16_224.fb_in1k`, `google/vit-base-patch16-224`), downloaded and cached.

    num_classes: a new, zero-initialised head where it differs from the checkpoint's (or it has none).
    image_size: position embeddings resampled (bicubic) to the new grid. patch_size: the patch projection
    resampled (`resample_patch_projection`), and the grid with it. heads: where the default guess is wrong.
    options: ViTConfig fields that change no tensor shape (pool, dropout, attn_dropout, drop_path).
    shifted_patches / locality_attention (SPT, LSA) are refused: the weights are of a plain ViT.
    """
    small_data = [name for name in ("shifted_patches", "locality_attention") if options.pop(name, False)]
    if small_data:
        raise VitkitError(
            f"pre-trained timm/Hugging Face weights are of a plain ViT, without {' or '.join(small_data)} (SPT/LSA, "
            "Lee et al. 2021: a 5x wider patch projection with its LayerNorm, learned attention temperatures): "
            "train such a model from scratch, or load the weights without them"
        )
    unknown = sorted(set(options) - set(FREE_OPTIONS))
    if unknown:
        raise VitkitError(f"pre-trained weights fix the model's shape: {unknown} cannot change; free options: {FREE_OPTIONS}")
    state, cfg = read_pretrained(source, heads)
    new = ViTConfig.from_dict({
        **cfg.to_dict(),
        **options,
        "num_classes": cfg.num_classes if num_classes is None else num_classes,
        "image_size": image_size or cfg.image_size,
        "patch_size": patch_size or cfg.patch_size,
    })
    if new.patch_size != cfg.patch_size:
        weight = state["patch_embed.proj.weight"].reshape(cfg.dim, cfg.in_channels, cfg.patch_size, cfg.patch_size)
        state["patch_embed.proj.weight"] = resample_patch_projection(weight, new.patch_size).flatten(1)
    if new.grid_size != cfg.grid_size:
        state["pos_embed"] = resample_pos_embed(state["pos_embed"], new.grid_size, new.num_prefix_tokens)
    model = VisionTransformer(new)
    if new.num_classes != cfg.num_classes:  # the model's own heads: zero, so no class is favoured at the start
        heads = ("head.", "head_dist.")
        state = {k: v for k, v in state.items() if not k.startswith(heads)}
        state.update({k: v for k, v in model.state_dict().items() if k.startswith(heads)})
    model.load_state_dict(state)
    return model


def freeze_blocks(model: VisionTransformer, blocks: int) -> None:
    """Freezes the patch and position embeddings, the class (and distillation) token and the first `blocks`
    blocks (0: nothing), to fine-tune only the top of a pre-trained model; the optimiser skips frozen parameters."""
    if not 0 <= blocks <= len(model.blocks):
        raise VitkitError(f"cannot freeze {blocks} blocks of a {len(model.blocks)}-block model: use 0 to {len(model.blocks)}")
    if blocks == 0:
        return
    frozen = [*model.patch_embed.parameters(), model.cls_token, model.pos_embed]
    if model.dist_token is not None:
        frozen.append(model.dist_token)
    for block in model.blocks[:blocks]:
        frozen.extend(block.parameters())
    for p in frozen:
        p.requires_grad_(False)  # a sinusoidal pos_embed is a buffer: already fixed


def _check_fits(state: dict[str, Tensor], cfg: ViTConfig, what: str) -> None:
    # Compared with the names and shapes of the model the config builds (on the meta device: no memory).
    with torch.device("meta"):
        expected = VisionTransformer(cfg).state_dict()
    unexpected = sorted(set(state) - set(expected))
    missing = sorted(set(expected) - set(state))
    wrong = sorted(k for k in set(state) & set(expected) if state[k].shape != expected[k].shape)
    problems = [
        f"{label} {names[:3]}{'...' if len(names) > 3 else ''}"
        for label, names in (("unexpected", unexpected), ("missing", missing), ("wrong shape", wrong))
        if names
    ]
    if problems:
        raise VitkitError(
            f"{what} do not fit a plain ViT ({'; '.join(problems)}): vitkit loads ViTs with a class token (and "
            "a distillation token), pre-norm blocks and a linear head (no layer scale, register tokens, fc_norm)"
        )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise VitkitError(f"cannot read the model config {path} ({e}): fix or remove it") from None
    return config if isinstance(config, dict) else {}
