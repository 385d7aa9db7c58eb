"""Pre-trained weights: DeiT-Tiny through vitkit against timm, the Hugging Face layout, resampling to other
image and patch sizes, new heads, bad files, hub names, and fine-tuning with frozen blocks."""

import json

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import WEIGHTS, requires_weights
from safetensors.torch import load_file, save_file
from timm.layers import resample_abs_pos_embed, resample_patch_embed
from timm.models.vision_transformer import checkpoint_filter_fn

from vitkit.errors import VitkitError
from vitkit.models import load_pretrained, resample_patch_projection
from vitkit.train import TrainConfig, train


@pytest.fixture(scope="module")
def deit_state():
    return load_file(str(WEIGHTS))


def timm_deit(state, **kwargs):
    model = timm.create_model("deit_tiny_patch16_224", pretrained=False, **kwargs)
    model.load_state_dict(state)
    return model.eval()


def max_logit_difference(vitkit_model, timm_model, size: int) -> float:
    torch.manual_seed(0)
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        return (vitkit_model.eval()(x) - timm_model(x)).abs().max().item()


def hugging_face_layout(state: dict, prefix: str) -> dict:
    """timm names → transformers' ViTForImageClassification names, written out independently of vitkit."""
    out = {
        f"{prefix}embeddings.cls_token": state["cls_token"],
        f"{prefix}embeddings.position_embeddings": state["pos_embed"],
        f"{prefix}embeddings.patch_embeddings.projection.weight": state["patch_embed.proj.weight"],
        f"{prefix}embeddings.patch_embeddings.projection.bias": state["patch_embed.proj.bias"],
        f"{prefix}layernorm.weight": state["norm.weight"],
        f"{prefix}layernorm.bias": state["norm.bias"],
        f"{prefix}pooler.dense.weight": torch.randn(192, 192),  # ViTModel's pooler: must be ignored
        f"{prefix}pooler.dense.bias": torch.randn(192),
        "classifier.weight": state["head.weight"],
        "classifier.bias": state["head.bias"],
    }
    for i in range(12):
        hf, tm = f"{prefix}encoder.layer.{i}.", f"blocks.{i}."
        for kind in ("weight", "bias"):
            query, key, value = state[tm + f"attn.qkv.{kind}"].chunk(3)
            out[hf + f"attention.attention.query.{kind}"] = query.clone()
            out[hf + f"attention.attention.key.{kind}"] = key.clone()
            out[hf + f"attention.attention.value.{kind}"] = value.clone()
            out[hf + f"attention.output.dense.{kind}"] = state[tm + f"attn.proj.{kind}"]
            out[hf + f"layernorm_before.{kind}"] = state[tm + f"norm1.{kind}"]
            out[hf + f"layernorm_after.{kind}"] = state[tm + f"norm2.{kind}"]
            out[hf + f"intermediate.dense.{kind}"] = state[tm + f"mlp.fc1.{kind}"]
            out[hf + f"output.dense.{kind}"] = state[tm + f"mlp.fc2.{kind}"]
    return out


@requires_weights
def test_deit_tiny_gives_timms_logits(deit_state):
    model = load_pretrained(WEIGHTS)
    assert (model.cfg.dim, model.cfg.depth, model.cfg.heads, model.cfg.num_classes) == (192, 12, 3, 1000)
    assert max_logit_difference(model, timm_deit(deit_state), 224) <= 1e-4  # measured 3.1e-6


@requires_weights
@pytest.mark.parametrize("suffix,prefix", [(".safetensors", "vit."), (".bin", "")])
def test_hugging_face_layout_gives_the_same_logits(tmp_path, deit_state, suffix, prefix):
    state = hugging_face_layout(deit_state, prefix)
    path = tmp_path / f"model{suffix}"
    if suffix == ".safetensors":
        save_file(state, path)
    else:
        torch.save(state, path)
    # DeiT's LayerNorm epsilon, not transformers' default 1e-12, so the logits can match timm's exactly.
    (tmp_path / "config.json").write_text(json.dumps({"num_attention_heads": 3, "layer_norm_eps": 1e-6}))
    model = load_pretrained(path)
    assert model.cfg.heads == 3 and model.cfg.norm_eps == 1e-6
    assert max_logit_difference(model, timm_deit(deit_state), 224) <= 1e-4  # measured 3.1e-6


@requires_weights
def test_image_size_384_matches_timms_resampled_model(deit_state):
    model = load_pretrained(WEIGHTS, image_size=384)
    assert model.pos_embed.shape == (1, 1 + 24 * 24, 192)
    # The same bicubic resampling as vitkit's (no antialiasing when upsampling): the same model.
    same = dict(deit_state, pos_embed=resample_abs_pos_embed(deit_state["pos_embed"], [24, 24], antialias=False))
    assert max_logit_difference(model, timm_deit(same, img_size=384), 384) <= 1e-4  # measured 2.7e-6
    # timm's own checkpoint filter antialiases, which switches PyTorch's bicubic kernel (a = -0.5, not -0.75):
    # slightly different position tables, logits within 0.1 (measured 0.019, logits up to about 5).
    reference = timm.create_model("deit_tiny_patch16_224", pretrained=False, img_size=384).eval()
    reference.load_state_dict(checkpoint_filter_fn(dict(deit_state), reference))
    assert max_logit_difference(model, reference, 384) <= 0.1


def inner_products(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    return torch.einsum("bcij,dcij->bd", x.double(), weight.double())


def resize(x: torch.Tensor, size: int) -> torch.Tensor:
    return F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@requires_weights
def test_patch_projection_resize_preserves_tokens(deit_state):
    w = deit_state["patch_embed.proj.weight"]  # (192, 3, 16, 16)
    w4 = resample_patch_projection(w, 4)
    # timm's implementation of the same FlexiViT resize, as an independent reference.
    torch.testing.assert_close(w4, resample_patch_embed(w, [4, 4], interpolation="bilinear"), atol=1e-5, rtol=1e-4)

    torch.manual_seed(0)
    # Exact for patches in the range of Bᵀ: the adjoint of the resize (by autograd) applied to 4×4 noise.
    base = torch.zeros(64, 3, 16, 16, requires_grad=True)
    (adjoint,) = torch.autograd.grad((resize(base, 4) * torch.randn(64, 3, 4, 4)).sum(), base)
    assert relative_error(inner_products(resize(adjoint, 4), w4), inner_products(adjoint, w)) < 1e-5
    # Close on other smooth patches (bilinear upsamplings of 4×4 noise): measured 0.13, against 0.49 for
    # resizing the weights themselves (scaled by 16 to keep their sum).
    smooth = F.interpolate(torch.randn(64, 3, 4, 4), size=(16, 16), mode="bilinear", align_corners=False)
    error = relative_error(inner_products(resize(smooth, 4), w4), inner_products(smooth, w))
    naive = relative_error(inner_products(resize(smooth, 4), resize(w, 4) * 16), inner_products(smooth, w))
    assert error < 0.2 and error < naive / 2
    # Upsampling the patch is exact for every input, white noise included.
    noise = torch.randn(16, 3, 16, 16)
    assert relative_error(inner_products(resize(noise, 32), resample_patch_projection(w, 32)), inner_products(noise, w)) < 1e-5


@requires_weights
def test_224_16_to_32_4_gives_a_working_model(deit_state):
    model = load_pretrained(WEIGHTS, image_size=32, patch_size=4, num_classes=10).eval()
    assert (model.cfg.image_size, model.cfg.patch_size, model.cfg.grid_size) == (32, 4, 8)
    assert model.patch_embed.proj.weight.shape == (192, 3 * 4 * 4) and model.pos_embed.shape == (1, 65, 192)
    torch.testing.assert_close(model.pos_embed[0, 0], deit_state["pos_embed"][0, 0])  # class token row kept
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10) and torch.isfinite(logits).all()


@requires_weights
def test_new_head_is_zero_and_the_rest_is_loaded(deit_state):
    model = load_pretrained(WEIGHTS, num_classes=10)
    assert model.head.weight.shape == (10, 192) and model.head.bias.shape == (10,)
    assert not model.head.weight.any() and not model.head.bias.any()
    assert torch.equal(model.blocks[5].attn.qkv.weight, deit_state["blocks.5.attn.qkv.weight"])
    assert torch.equal(load_pretrained(WEIGHTS, num_classes=1000).head.weight, deit_state["head.weight"])


def tiny_timm_file(tmp_path, **extra):
    """A tiny timm ViT for 8×8 grey images (the digits), saved as a timm-layout safetensors file."""
    torch.manual_seed(0)
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=8, patch_size=2, in_chans=1,
                              embed_dim=16, depth=2, num_heads=2, num_classes=5)
    path = tmp_path / "tiny.safetensors"
    save_file({**model.state_dict(), **extra}, path)
    return path


def test_unknown_and_corrupt_files_are_user_errors(tmp_path):
    save_file({"conv1.weight": torch.zeros(3, 3)}, tmp_path / "resnet.safetensors")
    with pytest.raises(VitkitError, match=r"neither timm nor Hugging Face ViT weights \(keys \['conv1.weight'\]"):
        load_pretrained(tmp_path / "resnet.safetensors")
    for name in ("broken.safetensors", "broken.bin"):
        (tmp_path / name).write_bytes(b"not a weights file at all")
        with pytest.raises(VitkitError, match="cannot read weights"):
            load_pretrained(tmp_path / name)
    torch.save({"weights": torch.zeros(1), "how": VitkitError("an object")}, tmp_path / "pickled.pt")
    with pytest.raises(VitkitError, match="cannot read weights"):  # weights_only: no arbitrary objects
        load_pretrained(tmp_path / "pickled.pt")
    for missing in (tmp_path / "missing.safetensors", tmp_path / "missing_weights", "./weights", "~/models/x"):
        with pytest.raises(VitkitError, match="does not exist"):  # a path, not a hub name: nothing downloaded
            load_pretrained(missing)
    # A timm model with layer scale (as DeiT III): named, not silently dropped.
    layer_scale = tiny_timm_file(tmp_path, **{"blocks.0.ls1.gamma": torch.ones(16)})
    with pytest.raises(VitkitError, match=r"unexpected \['blocks.0.ls1.gamma'\]"):
        load_pretrained(layer_scale)


def test_hub_names_download_and_failures_say_what_to_do(tmp_path, monkeypatch):
    import huggingface_hub
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    tiny = tiny_timm_file(tmp_path)
    calls = []

    def fake_download(repo, filename):
        calls.append((repo, filename))
        if filename == "model.safetensors" and repo.startswith("timm/"):
            return str(tiny)
        if filename == "pytorch_model.bin":
            torch.save(load_file(tiny), tmp_path / filename)
            return str(tmp_path / filename)
        raise EntryNotFoundError(f"{repo} has no {filename}")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert load_pretrained("deit_tiny_patch16_224.fb_in1k", heads=2).cfg.dim == 16
    assert calls == [("timm/deit_tiny_patch16_224.fb_in1k", "model.safetensors")]
    calls.clear()
    assert load_pretrained("someone/vit-tiny", heads=2).cfg.patch_size == 2
    assert calls == [("someone/vit-tiny", "model.safetensors"), ("someone/vit-tiny", "pytorch_model.bin"),
                     ("someone/vit-tiny", "config.json")]

    def offline(repo, filename):
        raise LocalEntryNotFoundError("cannot reach the hub and the file is not cached")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    with pytest.raises(VitkitError, match="pass a local .safetensors/.bin file"):
        load_pretrained("vit_base_patch16_224.augreg_in21k")


def test_fine_tuning_with_frozen_blocks_trains_only_the_rest(tmp_path):
    path = tiny_timm_file(tmp_path)
    cfg = TrainConfig(data="digits", pretrained=str(path), freeze_blocks=1, heads=2, epochs=1, batch_size=64, lr=1e-3,
                      warmup_epochs=0, device="cpu")
    train(cfg, tmp_path / "run", progress=False)
    before = load_pretrained(path, num_classes=10, heads=2).state_dict()
    after = load_file(tmp_path / "run" / "last.safetensors")
    assert set(before) == set(after)
    frozen = ("patch_embed.", "cls_token", "pos_embed", "blocks.0.")
    for name, value in before.items():
        assert torch.equal(after[name], value) == name.startswith(frozen), name


def test_timms_distilled_deit_loads_with_its_distillation_token(tmp_path):
    torch.manual_seed(0)
    timm_model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=8, patch_size=2,
                                   in_chans=1, embed_dim=16, depth=2, num_heads=2, num_classes=5).eval()
    for head in (timm_model.head, timm_model.head_dist):
        torch.nn.init.normal_(head.weight)
    save_file(timm_model.state_dict(), tmp_path / "distilled.safetensors")
    model = load_pretrained(tmp_path / "distilled.safetensors", heads=2)
    assert model.cfg.distill_token and model.cfg.image_size == 8
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():  # timm's distilled model in eval mode predicts the mean of its two heads, as vitkit's
        torch.testing.assert_close(model.eval()(x), timm_model(x), atol=1e-5, rtol=1e-5)
    resized = load_pretrained(tmp_path / "distilled.safetensors", heads=2, image_size=16, num_classes=3)
    assert resized.pos_embed.shape == (1, 2 + 64, 16) and not resized.head_dist.weight.any()
    torch.testing.assert_close(resized.pos_embed[0, :2], model.pos_embed[0, :2])
