"""Shifted Patch Tokenization and Locality Self-Attention (Lee, Lee & Song 2021) against plain references."""

import math

import pytest
import torch
import torch.nn.functional as F

from vitkit.data.datasets import ImageDataset
from vitkit.errors import VitkitError
from vitkit.models import ViTConfig, VisionTransformer, load_pretrained, num_parameters
from vitkit.models.summary import summarize
from vitkit.train import TrainConfig
from vitkit.train.checkpoint import load_model, save_model
from vitkit.train.config import build_config
from vitkit.train.trainer import build_model


def small_model(seed: int = 0, **overrides) -> VisionTransformer:
    torch.manual_seed(seed)
    cfg = dict(image_size=12, patch_size=3, in_channels=2, num_classes=5, dim=24, depth=2, heads=3, mlp_dim=32)
    model = VisionTransformer(ViTConfig(**{**cfg, **overrides})).eval()
    torch.nn.init.normal_(model.head.weight, std=0.5)  # a zero head would make every output the same
    torch.nn.init.normal_(model.pos_embed, std=0.5)
    if model.patch_embed.norm is not None:  # a non-trivial LayerNorm affine map
        torch.nn.init.normal_(model.patch_embed.norm.weight, 1.0, 0.3)
        torch.nn.init.normal_(model.patch_embed.norm.bias, std=0.3)
    return model


def reference_spt_patches(x: torch.Tensor, P: int) -> torch.Tensor:
    """(B, N, 5·C·P·P) by explicit pixel indexing: per patch, the C channels of the image, then of the image read
    at (i + dy, j + dx) for (dy, dx) = (-s, -s), (-s, +s), (+s, -s), (+s, +s), s = P // 2, zero outside."""
    B, C, H, W = x.shape
    s = P // 2
    offsets = [(0, 0), (-s, -s), (-s, s), (s, -s), (s, s)]
    out = torch.zeros(B, (H // P) * (W // P), 5 * C * P * P)
    for gi in range(H // P):
        for gj in range(W // P):
            values = []
            for dy, dx in offsets:
                for c in range(C):
                    for i in range(gi * P, gi * P + P):
                        for j in range(gj * P, gj * P + P):
                            inside = 0 <= i + dy < H and 0 <= j + dx < W
                            values.append(x[:, c, i + dy, j + dx] if inside else torch.zeros(B))
            out[:, gi * (W // P) + gj] = torch.stack(values, dim=1)
    return out


@pytest.mark.parametrize("P", [2, 3, 4, 5])
def test_spt_tokens_equal_explicit_shifted_patches(P):
    torch.manual_seed(P)
    model = small_model(image_size=4 * P if P < 5 else 10, patch_size=P, shifted_patches=True)
    embed = model.patch_embed
    assert embed.proj.in_features == 5 * 2 * P * P and embed.norm.normalized_shape == (5 * 2 * P * P,)
    x = torch.randn(2, 2, model.cfg.image_size, model.cfg.image_size)
    patches = reference_spt_patches(x, P)
    mean, var = patches.mean(-1, keepdim=True), patches.var(-1, unbiased=False, keepdim=True)
    normed = (patches - mean) / torch.sqrt(var + model.cfg.norm_eps) * embed.norm.weight + embed.norm.bias
    expected = normed @ embed.proj.weight.T + embed.proj.bias
    torch.testing.assert_close(embed(x), expected, atol=1e-5, rtol=1e-5)


def test_spt_shifts_are_the_papers_diagonal_half_patch_shifts():
    # One bright pixel: its copies in the shifted channel blocks move diagonally by P // 2 = 2 pixels.
    from vitkit.models.vit import shift_and_stack

    x = torch.zeros(1, 1, 8, 8)
    x[0, 0, 4, 4] = 1.0
    stacked = shift_and_stack(x, 2)
    assert stacked.shape == (1, 5, 8, 8)
    where = [tuple(torch.nonzero(stacked[0, k])[0].tolist()) for k in range(5)]
    # block k holds x[i + dy, j + dx]: the pixel shows up at (4 - dy, 4 - dx)
    assert where == [(4, 4), (6, 6), (6, 2), (2, 6), (2, 2)]
    # Zero-filled where shifted in: a constant image keeps a zero border of 2 pixels in each shifted block.
    ones = shift_and_stack(torch.ones(1, 1, 8, 8), 2)
    assert ones[0, 1, :2].eq(0).all() and ones[0, 1, :, :2].eq(0).all() and ones[0, 1, 2:, 2:].eq(1).all()
    assert ones[0, 4, 6:].eq(0).all() and ones[0, 4, :, 6:].eq(0).all() and ones[0, 4, :6, :6].eq(1).all()


def test_spt_needs_patches_of_two_pixels_or_more():
    with pytest.raises(VitkitError, match="at least 2"):
        ViTConfig(image_size=8, patch_size=1, shifted_patches=True)


@pytest.mark.parametrize("lsa", [False, True])
def test_spt_with_kept_tokens_gathers_the_full_embedding(lsa):
    model = small_model(shifted_patches=True, locality_attention=lsa)
    x = torch.randn(3, 2, 12, 12)
    keep = torch.stack([torch.randperm(16)[:7] for _ in range(3)])
    full = model.patch_embed(x)
    torch.testing.assert_close(model.patch_embed(x, keep), full.gather(1, keep[..., None].expand(-1, -1, 24)))
    every = torch.arange(16).expand(3, -1)
    torch.testing.assert_close(model(x, keep=every), model(x), atol=1e-5, rtol=1e-5)
    logits, maps = model(x, keep=keep, return_attention=True)
    torch.testing.assert_close(logits, model(x, keep=keep), atol=1e-5, rtol=1e-5)
    assert maps[0].shape == (3, 3, 8, 8)


def reference_lsa(attn, z):
    """softmax(QKᵀ·τ_h with -inf on the diagonal)V per head, heads concatenated and projected; and the maps."""
    B, T, D = z.shape
    d = D // attn.heads
    q, k, v = attn.qkv(z).split(D, dim=-1)
    outs, maps = [], []
    for h in range(attn.heads):
        s = slice(h * d, (h + 1) * d)
        scores = q[..., s] @ k[..., s].transpose(1, 2) * attn.temperature[h]
        scores = scores + torch.diag(torch.full((T,), float("-inf")))
        p = torch.softmax(scores, dim=-1)
        maps.append(p)
        outs.append(p @ v[..., s])
    return attn.proj(torch.cat(outs, dim=-1)), torch.stack(maps, dim=1)


def test_lsa_fused_and_explicit_paths_equal_the_formula():
    model = small_model(locality_attention=True)
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.temperature.copy_(torch.tensor([0.1, 0.5, 1.3]))  # distinct per head, away from the init
    z = torch.randn(2, 6, 24)
    expected_out, expected_maps = reference_lsa(attn, z)
    fused, none = attn(z)
    assert none is None
    explicit, maps = attn(z, return_attention=True)
    torch.testing.assert_close(fused, expected_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(explicit, expected_out, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(maps, expected_maps)
    assert maps.diagonal(dim1=-2, dim2=-1).eq(0).all()
    torch.testing.assert_close(maps.sum(-1), torch.ones(2, 3, 6))


def test_lsa_model_attention_maps_have_a_zero_diagonal_and_match_the_fused_forward():
    model = small_model(locality_attention=True)
    x = torch.randn(2, 2, 12, 12)
    logits, maps = model(x, return_attention=True)
    for a in maps:
        assert a.shape == (2, 3, 17, 17)
        assert a.diagonal(dim1=-2, dim2=-1).eq(0).all()
        torch.testing.assert_close(a.sum(-1), torch.ones(2, 3, 17))
    torch.testing.assert_close(logits, model(x), atol=1e-5, rtol=1e-5)


def test_lsa_temperature_starts_at_the_plain_scale_and_learns():
    model = small_model(locality_attention=True)
    for block in model.blocks:
        t = block.attn.temperature
        assert t.requires_grad and t.shape == (3,)
        torch.testing.assert_close(t.detach(), torch.full((3,), 1 / math.sqrt(8)))
    # Without its mask the LSA block at initialisation is the plain block: the temperature is 1/sqrt(d).
    plain = small_model()
    plain.load_state_dict({k: v for k, v in model.state_dict().items() if "temperature" not in k})
    z = torch.randn(2, 6, 24)
    attn, plain_attn = model.blocks[0].attn, plain.blocks[0].attn
    q, k, v = attn.qkv(z).reshape(2, 6, 3, 3, 8).permute(2, 0, 3, 1, 4)
    unmasked = F.softmax(q @ k.transpose(-2, -1) * attn.temperature.view(-1, 1, 1), dim=-1)
    torch.testing.assert_close(unmasked, plain_attn(z, return_attention=True)[1])
    # reset_parameters restores it after training moved it
    with torch.no_grad():
        attn.temperature.fill_(2.0)
    model.reset_parameters()
    torch.testing.assert_close(attn.temperature.detach(), torch.full((3,), 1 / math.sqrt(8)))
    # It receives gradient through the fused path.
    model.train()
    model.forward_features(torch.randn(2, 2, 12, 12))[0][:, 0].square().sum().backward()  # the head is zero now
    assert all(b.attn.temperature.grad is not None and b.attn.temperature.grad.abs().sum() > 0 for b in model.blocks)


def test_a_model_with_both_options_learns_random_labels():
    model = small_model(shifted_patches=True, locality_attention=True).train()
    torch.manual_seed(1)
    x, y = torch.randn(16, 2, 12, 12), torch.randint(0, 5, (16,))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        if not losses:
            assert model.patch_embed.norm.weight.grad.abs().sum() > 0
            assert model.patch_embed.norm.bias.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_checkpoint_round_trip_with_both_options(tmp_path):
    model = small_model(shifted_patches=True, locality_attention=True)
    with torch.no_grad():
        for block in model.blocks:
            block.attn.temperature.uniform_(0.1, 1.0)
    info = {"model": model.cfg.to_dict(), "classes": list("abcde"), "mean": [0.5, 0.5], "std": [0.25, 0.25]}
    save_model(tmp_path / "m.safetensors", model.state_dict(), info)
    loaded, saved = load_model(tmp_path / "m.safetensors")
    assert loaded.cfg.shifted_patches and loaded.cfg.locality_attention
    for k, v in model.state_dict().items():
        assert torch.equal(v, loaded.state_dict()[k]), k
    x = torch.randn(2, 2, 12, 12)
    assert torch.equal(model(x), loaded(x))


def test_configs_saved_before_these_options_load_as_plain_vits():
    old = ViTConfig(image_size=8, patch_size=2).to_dict()
    del old["shifted_patches"], old["locality_attention"]
    cfg = ViTConfig.from_dict(old)
    assert not cfg.shifted_patches and not cfg.locality_attention


def test_summary_counts_the_real_spt_lsa_model():
    from torch.utils.flop_counter import FlopCounterMode

    model = small_model(shifted_patches=True, locality_attention=True)
    s = summarize(model.cfg)
    assert s.parameters == num_parameters(model)
    plain = summarize(small_model().cfg)
    assert s.parameters - plain.parameters == 4 * 2 * 9 * 24 + 2 * 5 * 2 * 9 + 2 * 3
    x = torch.randn(2, 2, 12, 12)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, return_attention=True)  # explicit attention: its matmuls are counted
    assert s.macs_per_image == counter.get_total_flops() // (2 * 2)
    assert s.macs_per_image - plain.macs_per_image == 16 * 4 * 2 * 9 * 24  # only the wider projection

    # Activation estimate against the distinct storages autograd keeps in a training forward.
    model.train()
    weights = {t.untyped_storage().data_ptr() for t in model.parameters()}
    storages = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    batch = 8
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(torch.randn(batch, 2, 12, 12))
    assert s.activation_bytes_per_image == pytest.approx(sum(storages.values()) / batch, rel=0.05)


def digits_like(n: int = 20) -> ImageDataset:
    return ImageDataset(torch.zeros(n, 1, 8, 8, dtype=torch.uint8), torch.arange(n) % 10, [str(i) for i in range(10)],
                        "digits")


def test_train_config_options_reach_the_model():
    cfg = build_config(flag_values={"model": "vit_digits", "spt": True, "lsa": True})
    model = build_model(cfg, digits_like())
    assert model.cfg.shifted_patches and model.cfg.locality_attention
    plain = build_model(TrainConfig(), digits_like())
    assert not plain.cfg.shifted_patches and not plain.cfg.locality_attention


@pytest.mark.parametrize("flag", ["spt", "lsa"])
def test_spt_and_lsa_are_vit_options(flag):
    with pytest.raises(VitkitError, match=f"--{flag} only apply to ViTs"):
        TrainConfig(model="resnet18", **{flag: True})
    TrainConfig(model="resnet18", **{flag: False})  # off is not "given"
    with pytest.raises(VitkitError, match="from scratch"):
        TrainConfig(pretrained="deit_tiny_patch16_224.fb_in1k", **{flag: True})


@pytest.mark.parametrize("option", ["shifted_patches", "locality_attention"])
def test_pretrained_weights_refuse_spt_and_lsa(option, tmp_path):
    # Refused before any file is read: the weights would never fit.
    with pytest.raises(VitkitError, match=f"without {option}.*from scratch"):
        load_pretrained(tmp_path / "missing.safetensors", **{option: True})
