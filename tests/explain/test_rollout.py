"""Rollout against loop-based references of each formula, and its known properties."""

import pytest
import torch

from vitkit.errors import VitkitError
from vitkit.explain import METHODS, attention_rollout, discard_lowest, gradient_rollout, patch_relevance, relevance_to_image
from conftest import tiny_vit
from vitkit.models import PRESETS, create_model


def random_attention(layers=4, B=3, H=2, T=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.rand(B, H, T, T, generator=g).softmax(-1) for _ in range(layers)]


def reference_rollout(attentions, fusion, residual, start=0):
    """One image at a time, one layer at a time, exactly as the formulas read."""
    out = []
    for b in range(attentions[0].shape[0]):
        fused = []
        for a in attentions[start:]:
            per_head = a[b]
            f = {"mean": per_head.mean(0), "max": per_head.max(0).values, "min": per_head.min(0).values}[fusion]
            fused.append(f)
        T = fused[0].shape[0]
        if residual == "seed":
            r = fused[0]
            for f in fused[1:]:
                r = r @ (f + torch.eye(T))
        else:
            r = torch.eye(T)
            for f in fused:
                a_hat = f + torch.eye(T)
                for i in range(T):
                    a_hat[i] = a_hat[i] / a_hat[i].sum()
                r = a_hat @ r
        out.append(r)
    return torch.stack(out)


@pytest.mark.parametrize("fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("residual", ["normalized", "seed"])
def test_vectorised_rollout_equals_the_loop_reference(fusion, residual):
    attn = random_attention()
    got = attention_rollout(attn, head_fusion=fusion, residual=residual)
    torch.testing.assert_close(got, reference_rollout(attn, fusion, residual))
    got = attention_rollout(attn, head_fusion=fusion, residual=residual, start_layer=2)
    torch.testing.assert_close(got, reference_rollout(attn, fusion, residual, start=2))


def test_normalised_rollout_rows_sum_to_one():
    r = attention_rollout(random_attention(layers=6), discard_ratio=0.5)
    torch.testing.assert_close(r.sum(-1), torch.ones(3, 5))


def test_uniform_attention_gives_a_constant_map():
    T = 10
    uniform = [torch.full((2, 3, T, T), 1 / T) for _ in range(4)]
    for residual in ("normalized", "seed"):
        row = attention_rollout(uniform, residual=residual)[:, 0, 1:]
        torch.testing.assert_close(row, row[:, :1].expand_as(row))


def test_identity_attention_has_no_nan():
    eye = [torch.eye(6).expand(2, 3, 6, 6) for _ in range(3)]
    for residual in ("normalized", "seed"):
        r = attention_rollout(eye, residual=residual, discard_ratio=0.9)
        assert torch.isfinite(r).all()
    assert torch.isfinite(relevance_to_image(attention_rollout(eye)[:, 0, 1:4], (1, 3), (4, 12))).all()


def test_discard_ratio_is_per_image():
    a = torch.rand(2, 6, 6)
    a[1] *= 100  # a different scale: a shared threshold would wipe image 0 entirely
    out = discard_lowest(a, 0.5)
    inner = out[:, 1:, 1:].flatten(1)
    for b in range(2):
        assert (inner[b] == 0).sum() == 12  # half of the 25 non-class entries (rounded down)
        assert torch.equal(out[b, 0], a[b, 0]) and torch.equal(out[b, :, 0], a[b, :, 0])


def test_maps_for_every_small_preset_and_token_subsets():
    for name in ("vit_tiny_32", "vit_lite_32", "vit_digits"):
        model = create_model(name)
        cfg = model.cfg
        x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size)
        for method in METHODS:
            rel = patch_relevance(model, x, method)
            assert rel.shape == (2, cfg.num_patches) and torch.isfinite(rel).all()
        keep = torch.stack([torch.randperm(cfg.num_patches)[:5] for _ in range(2)])
        rel = patch_relevance(model, x, "rollout", keep=keep)
        dropped = torch.ones_like(rel, dtype=torch.bool).scatter_(1, keep, False)
        assert (rel[dropped] == 0).all() and (rel.gather(1, keep) > 0).all()
    for name in PRESETS:  # every preset, shapes only (ViT-H's real weights alone would need 2.5 GB)
        with torch.device("meta"):
            model = create_model(name)
            cfg = model.cfg
            rel = patch_relevance(model, torch.empty(2, cfg.in_channels, cfg.image_size, cfg.image_size))
        assert rel.shape == (2, cfg.num_patches), name


def test_gradient_rollout_matches_its_formula_on_a_tiny_model():
    model = tiny_vit(patch_size=4, num_classes=3, dim=8, mlp_dim=16)
    x = torch.randn(1, 3, 8, 8)
    logits, attentions = model(x, return_attention=True)
    target = logits.argmax(1)
    grads = torch.autograd.grad(logits[0, target[0]], attentions)
    r = torch.eye(5)
    for a, g in zip(attentions, grads):
        r = r + (g[0] * a[0]).clamp(min=0).mean(0) @ r
    torch.testing.assert_close(gradient_rollout(model, x), r[0, 1:][None].detach())
    mean_model = tiny_vit(patch_size=4, num_classes=3, dim=8, mlp_dim=16, pool="mean")
    assert gradient_rollout(mean_model, x).shape == (1, 4)


def test_upsampled_maps_are_normalised():
    rel = torch.rand(3, 16)
    maps = relevance_to_image(rel, (4, 4), (32, 32))
    assert maps.shape == (3, 32, 32)
    torch.testing.assert_close(maps.flatten(1).amin(1), torch.zeros(3))
    torch.testing.assert_close(maps.flatten(1).amax(1), torch.ones(3))


def test_single_layer_attention_is_the_class_row_of_that_layer():
    model = tiny_vit()
    x = torch.randn(2, 3, 8, 8)
    _, attentions = model(x, return_attention=True)
    for layer in (0, 1, -1):
        expected = attentions[layer].amax(1)[:, 0, 1:]
        torch.testing.assert_close(patch_relevance(model, x, "attention", layer=layer, head_fusion="max"), expected)
    with pytest.raises(VitkitError, match="outside"):
        patch_relevance(model, x, "attention", layer=5)


@pytest.mark.parametrize("pool", ["cls", "mean"])
def test_a_distilled_vit_is_explained_through_both_output_tokens(pool):
    """Its prediction is the mean of the class (or mean-pooled) head and the distillation token's head."""
    model = tiny_vit(distill_token=True, pool=pool)
    x = torch.randn(2, 3, 8, 8)
    _, attentions = model(x, return_attention=True)
    r = attention_rollout(attentions)
    class_row = r[:, 0] if pool == "cls" else r[:, 2:].mean(1)
    torch.testing.assert_close(patch_relevance(model, x), ((class_row + r[:, 1]) / 2)[:, 2:])
    out = discard_lowest(torch.rand(2, 6, 6), 0.5, prefix=2)
    assert (out[:, 2:, 2:].flatten(1) == 0).sum(1).tolist() == [8, 8]  # half of the 16 patch-to-patch entries
    for method in METHODS:
        assert patch_relevance(model, x, method).shape == (2, 16)
    with pytest.raises(VitkitError, match="has none: pass a ViT"):
        patch_relevance(torch.nn.Linear(3, 3), x)
