"""The ViT against the seed equations, written out plainly."""

import math

import pytest
import torch
import torch.nn.functional as F

from vitkit.errors import VitkitError
from vitkit.models import PRESETS, ViTConfig, VisionTransformer, create_model, num_parameters, preset_config
from vitkit.models.pos_embed import resample_pos_embed, sincos_1d, sincos_2d


def small_model(**overrides) -> VisionTransformer:
    torch.manual_seed(0)
    cfg = dict(image_size=16, patch_size=4, in_channels=3, num_classes=7, dim=32, depth=3, heads=4, mlp_dim=64)
    model = VisionTransformer(ViTConfig(**{**cfg, **overrides})).eval()
    # Non-zero heads and position table, so the tests see them at work.
    torch.nn.init.normal_(model.head.weight, std=0.5)
    if model.head_dist is not None:
        torch.nn.init.normal_(model.head_dist.weight, std=0.5)
    if isinstance(model.pos_embed, torch.nn.Parameter):
        torch.nn.init.normal_(model.pos_embed, std=0.5)
    return model


def test_patch_embedding_equals_explicit_flatten_and_linear():
    model = small_model()
    x = torch.randn(2, 3, 16, 16)
    P = 4
    rows = []
    for b in range(2):
        patches = [x[b, :, i * P : (i + 1) * P, j * P : (j + 1) * P].flatten() for i in range(4) for j in range(4)]
        rows.append(torch.stack(patches) @ model.patch_embed.proj.weight.T + model.patch_embed.proj.bias)
    torch.testing.assert_close(model.patch_embed(x), torch.stack(rows))


def test_patch_embedding_equals_strided_convolution():
    # timm stores the projection as a P-strided convolution; the flattening order must match it.
    proj = small_model().patch_embed.proj
    x = torch.randn(2, 3, 16, 16)
    conv = F.conv2d(x, proj.weight.reshape(32, 3, 4, 4), proj.bias, stride=4).flatten(2).transpose(1, 2)
    torch.testing.assert_close(small_model().patch_embed(x), conv)


def test_attention_rows_sum_to_one_and_match_fused_path():
    model = small_model()
    x = torch.randn(3, 3, 16, 16)
    logits, attentions = model(x, return_attention=True)
    assert len(attentions) == 3
    for a in attentions:
        assert a.shape == (3, 4, 17, 17)
        torch.testing.assert_close(a.sum(-1), torch.ones(3, 4, 17))
    torch.testing.assert_close(logits, model(x), atol=1e-5, rtol=1e-5)


def test_attention_equals_softmax_formula():
    torch.manual_seed(1)
    model = small_model()
    attn = model.blocks[0].attn
    z = torch.randn(2, 5, 32)
    out, probs = attn(z, return_attention=True)
    q, k, v = attn.qkv(z).split(32, dim=-1)
    heads = []
    for h in range(4):
        s = slice(h * 8, (h + 1) * 8)
        p = torch.softmax(q[..., s] @ k[..., s].transpose(1, 2) / math.sqrt(8), dim=-1)
        torch.testing.assert_close(probs[:, h], p)
        heads.append(p @ v[..., s])
    torch.testing.assert_close(out, attn.proj(torch.cat(heads, dim=-1)))


def test_sincos_1d_equals_seed_formula():
    n, d = 11, 16
    table = sincos_1d(n, d)
    for pos in range(n):
        for i in range(d // 2):
            angle = pos / 10000 ** (2 * i / d)
            assert table[pos, 2 * i].item() == pytest.approx(math.sin(angle), abs=1e-6)
            assert table[pos, 2 * i + 1].item() == pytest.approx(math.cos(angle), abs=1e-6)


def test_sincos_2d_encodes_row_then_column():
    g, d = 4, 16
    table = sincos_2d(g, d).reshape(g, g, d)
    axis = sincos_1d(g, d // 2)
    for r in range(g):
        for c in range(g):
            torch.testing.assert_close(table[r, c], torch.cat([axis[r], axis[c]]))


@pytest.mark.parametrize("pos_embed", ["learned", "sincos1d", "sincos2d"])
@pytest.mark.parametrize("pool", ["cls", "mean"])
@pytest.mark.parametrize("distill_token", [False, True], ids=["plain", "distilled"])
def test_token_subset_equals_masked_full_forward(pos_embed, pool, distill_token):
    """Dropping tokens = keeping them in the sequence but hiding them from every attention."""
    model = small_model(pos_embed=pos_embed, pool=pool, distill_token=distill_token)
    x = torch.randn(3, 3, 16, 16)
    keep = torch.stack([torch.randperm(16)[:6].sort().values for _ in range(3)])

    # Reference: the full sequence, with an attention mask that lets no token see the dropped ones.
    P = 1 + distill_token  # the class token, and the distillation token
    T = P + 16
    visible = torch.zeros(3, T, dtype=torch.bool)
    visible[:, :P] = True
    visible.scatter_(1, keep + P, True)
    prefix = [model.cls_token] + ([model.dist_token] if distill_token else [])
    z = torch.cat([t.expand(3, -1, -1) for t in prefix] + [model.patch_embed(x)], dim=1) + model.pos_embed
    for block in model.blocks:
        attn = block.attn
        h = block.norm1(z)
        q, k, v = attn.qkv(h).reshape(3, T, 3, attn.heads, attn.head_dim).permute(2, 0, 3, 1, 4)
        scores = (q @ k.transpose(-2, -1)) / math.sqrt(attn.head_dim)
        scores = scores.masked_fill(~visible[:, None, None, :], float("-inf"))
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(3, T, -1)
        z = z + attn.proj(y)
        z = z + block.mlp(block.norm2(z))
    z = model.norm(z)
    kept_tokens = torch.cat([z[:, :P], z[:, P:].gather(1, keep[..., None].expand(-1, -1, 32))], dim=1)
    logits = model.head(kept_tokens[:, 0] if pool == "cls" else kept_tokens[:, P:].mean(1))
    if distill_token:
        logits = (logits + model.head_dist(kept_tokens[:, 1])) / 2

    tokens, _ = model.forward_features(x, keep=keep)
    torch.testing.assert_close(tokens, kept_tokens, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x, keep=keep), logits, atol=1e-5, rtol=1e-5)


def test_keeping_every_token_equals_plain_forward():
    model = small_model()
    x = torch.randn(2, 3, 16, 16)
    keep = torch.arange(16).expand(2, -1)
    torch.testing.assert_close(model(x, keep=keep), model(x))
    logits, attentions = model(x, keep=keep[:, :5], return_attention=True)
    assert attentions[0].shape == (2, 4, 6, 6)


def test_every_preset_builds_and_gives_logits():
    for name in PRESETS:
        with torch.device("meta"):  # shapes only: ViT-H alone would need 2.5 GB of real weights
            model = create_model(name)
        cfg = model.cfg
        x = torch.empty(2, cfg.in_channels, cfg.image_size, cfg.image_size, device="meta")
        assert model(x).shape == (2, cfg.num_classes), name


def test_small_presets_run_for_real():
    for name in ("vit_tiny_32", "vit_lite_32", "vit_digits"):
        model = create_model(name).eval()
        cfg = model.cfg
        logits = model(torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size))
        assert logits.shape == (2, 10) and torch.isfinite(logits).all()


@pytest.mark.parametrize("name,millions", [("vit_base", 86), ("vit_large", 307), ("vit_huge", 632)])
def test_parameter_counts_match_table_1(name, millions):
    with torch.device("meta"):
        n = num_parameters(create_model(name))
    assert abs(n / 1e6 - millions) / millions < 0.01


def test_deit_tiny_shape_has_its_published_parameter_count():
    with torch.device("meta"):
        assert num_parameters(create_model("vit_tiny")) == 5_717_416


def test_bad_shapes_are_user_errors():
    with pytest.raises(VitkitError, match="multiple of patch size"):
        ViTConfig(image_size=30, patch_size=4)
    with pytest.raises(VitkitError, match="divisible"):
        ViTConfig(dim=100, heads=3)
    with pytest.raises(VitkitError, match="unknown preset"):
        create_model("vit_gigantic")
    for field, value in [("depth", 0), ("mlp_dim", -1), ("num_classes", -1), ("dropout", 1.0), ("drop_path", -0.1)]:
        with pytest.raises(VitkitError, match=field):
            ViTConfig(**{field: value})
    assert isinstance(VisionTransformer(ViTConfig(image_size=16, patch_size=8, dim=8, depth=1, heads=1, mlp_dim=8,
                                                  num_classes=0)).head, torch.nn.Identity)  # 0: a headless backbone
    model = small_model()
    with pytest.raises(VitkitError, match="multiple of the patch size"):
        model(torch.randn(1, 3, 18, 18))
    with pytest.raises(VitkitError, match="resample"):
        model(torch.randn(1, 3, 32, 32))
    with pytest.raises(VitkitError, match="channels"):
        model(torch.randn(1, 1, 16, 16))


def test_resampling_position_embeddings():
    pos = torch.randn(1, 1 + 14 * 14, 8)
    assert torch.equal(resample_pos_embed(pos, 14), pos)
    constant = torch.ones(1, 1 + 14 * 14, 8) * 0.3
    for grid in (2, 8, 24):
        out = resample_pos_embed(constant, grid)
        assert out.shape == (1, 1 + grid * grid, 8)
        torch.testing.assert_close(out, torch.full_like(out, 0.3))  # interpolation reproduces constants
    # A smooth ramp along the columns stays ordered along the columns after upsampling.
    ramp = torch.linspace(0, 1, 4).repeat(4)[None, :, None]
    up = resample_pos_embed(torch.cat([torch.zeros(1, 1, 1), ramp], 1), 8)[0, 1:, 0].reshape(8, 8)
    assert (up[:, 1:] >= up[:, :-1]).all()


def test_model_resize_keeps_class_token_and_runs():
    model = small_model()
    cls_pos = model.pos_embed[0, 0].clone()
    model.resize(32)
    assert model.cfg.image_size == 32 and model.pos_embed.shape == (1, 65, 32)
    torch.testing.assert_close(model.pos_embed[0, 0], cls_pos)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    fixed = small_model(pos_embed="sincos2d")
    fixed.resize(32)
    torch.testing.assert_close(fixed.pos_embed[0, 1:], sincos_2d(8, 32))


def test_stochastic_depth_drops_whole_samples_in_training_only():
    model = small_model(drop_path=0.5)
    block = model.blocks[-1]
    z = torch.randn(64, 5, 32)
    branch = torch.ones_like(z)
    dropped = block.drop_path.train()(branch)
    per_sample = dropped.reshape(64, -1)
    assert ((per_sample == 0).all(1) | (per_sample == 2.0).all(1)).all()  # 0 or 1/(1-0.5)
    assert torch.equal(block.drop_path.eval()(branch), branch)
    assert [round(b.drop_path.p, 3) for b in model.blocks] == [0.0, 0.25, 0.5]


def test_preset_overrides():
    cfg = preset_config("vit_tiny_32", num_classes=100, drop_path=0.1)
    assert cfg.num_classes == 100 and cfg.drop_path == 0.1 and cfg.dim == 192


def test_distillation_token_has_its_own_head_and_the_prediction_is_their_mean():
    model = small_model(distill_token=True)
    assert model.pos_embed.shape == (1, 2 + 16, 32) and model.dist_token.shape == (1, 1, 32)
    x = torch.randn(3, 3, 16, 16)
    z, _ = model.forward_features(x)
    assert z.shape == (3, 18, 32)
    heads = model(x, both_heads=True)
    assert heads.shape == (3, 2, 7)
    torch.testing.assert_close(heads[:, 0], model.head(z[:, 0]))
    torch.testing.assert_close(heads[:, 1], model.head_dist(z[:, 1]))
    torch.testing.assert_close(model(x), (model.head(z[:, 0]) + model.head_dist(z[:, 1])) / 2)
    logits, attentions = model(x, return_attention=True)
    assert attentions[0].shape == (3, 4, 18, 18)
    torch.testing.assert_close(logits, model(x), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(model(x, keep=torch.arange(16).expand(3, -1)), model(x))
    with pytest.raises(VitkitError, match="distillation token"):
        small_model()(x, both_heads=True)


def test_resizing_a_distilled_model_keeps_both_prefix_rows():
    model = small_model(distill_token=True)
    prefix = model.pos_embed[0, :2].clone()
    model.resize(32)
    assert model.pos_embed.shape == (1, 2 + 64, 32)
    torch.testing.assert_close(model.pos_embed[0, :2], prefix)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 7)
    fixed = small_model(pos_embed="sincos2d", distill_token=True)
    torch.testing.assert_close(fixed.pos_embed[0, :2], torch.zeros(2, 32))
    torch.testing.assert_close(fixed.pos_embed[0, 2:], sincos_2d(4, 32))
