"""The analytic summary against independent counts on real models."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from vitkit.errors import VitkitError
from vitkit.models import create_model, num_parameters, preset_config
from vitkit.models.summary import format_summary, summarize

CASES = [("vit_tiny_32", {}), ("vit_digits", {}), ("vit_lite_32", {"pool": "mean", "pos_embed": "sincos2d"}),
         ("vit_digits", {"distill_token": True})]


def measured_macs(model, x, keep=None) -> int:
    # The explicit attention path (return_attention) runs QKᵀ and AV as counted matmuls; the fused CPU
    # kernel is invisible to FlopCounterMode.
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, keep=keep, return_attention=True)
    return counter.get_total_flops() // (2 * x.shape[0])


def saved_activation_bytes(model, x) -> int:
    """Bytes of the distinct non-parameter storages autograd keeps for backward in one training forward."""
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    storages = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(x)
    return sum(storages.values())


@pytest.mark.parametrize("preset,overrides", CASES)
def test_parameters_and_macs_match_the_real_model(preset, overrides):
    model = create_model(preset, **overrides).eval()
    cfg = model.cfg
    s = summarize(cfg)
    assert s.parameters == s.trainable_parameters == num_parameters(model)
    assert sum(row.parameters for row in s.layers) == s.parameters
    assert s.tokens == cfg.num_patches + cfg.num_prefix_tokens
    x = torch.randn(2, cfg.in_channels, cfg.image_size, cfg.image_size)
    assert s.macs_per_image == measured_macs(model, x)


def test_macs_with_kept_tokens_match_the_real_model():
    model = create_model("vit_tiny_32").eval()
    keep = torch.stack([torch.randperm(64)[:20] for _ in range(2)])
    s = summarize(model.cfg, keep_tokens=20)
    assert s.tokens == 21
    assert s.macs_per_image == measured_macs(model, torch.randn(2, 3, 32, 32), keep)


@pytest.mark.parametrize("preset,overrides", CASES)
def test_activation_estimate_matches_tensors_saved_by_autograd(preset, overrides):
    model = create_model(preset, **overrides).train()
    cfg = model.cfg
    batch = 4
    measured = saved_activation_bytes(model, torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size))
    assert summarize(cfg).activation_bytes_per_image == pytest.approx(measured / batch, rel=0.05)


def test_activation_estimate_is_linear_in_batch_and_depth():
    def act(batch_size=1, **overrides):
        return summarize(preset_config("vit_tiny_32", **overrides), batch_size).activation_bytes_per_image

    # Per image, so a batch of B needs B times as much.
    assert act(batch_size=8) == act()
    # Embedding + depth × (same cost per block).
    per_block = act(depth=2) - act(depth=1)
    assert per_block > 0
    assert act(depth=12) == act(depth=1) + 11 * per_block


def test_format_summary_lists_every_layer_and_the_totals():
    s = summarize(preset_config("vit_tiny_32"), batch_size=128)
    text = format_summary(s)
    for row in s.layers:
        assert row.name in text
    assert "128×65×192" in text
    assert "5.36M" in text and "GMACs" in text and "MB" in text


def test_invalid_arguments_are_explained():
    cfg = preset_config("vit_tiny_32")
    with pytest.raises(VitkitError, match="keep between 1 and 64"):
        summarize(cfg, keep_tokens=65)
    with pytest.raises(VitkitError, match="batch size"):
        summarize(cfg, batch_size=0)
