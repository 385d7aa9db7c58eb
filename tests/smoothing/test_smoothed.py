"""The smoothed classifier: votes against a plain per-ablation loop, and what a patch can change."""

import pytest
import torch
from torch import nn

from conftest import tiny_vit
from vitkit.errors import VitkitError
from vitkit.smoothing import Ablation, SmoothedClassifier, levine_feizi_encoding, token_masks

MEAN, STD = (0.4, 0.5, 0.6), (0.2, 0.25, 0.3)


def smoothed(model, ablation, **kw):
    return SmoothedClassifier(model, ablation, mean=MEAN, std=STD, **kw)


def reference_logits(model, ablation, x, fill=0.0, drop=True):
    """(B, A, classes), one ablation of one image at a time."""
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    out = []
    for image in (x - mean) / std:
        rows = []
        for position in ablation.positions():
            mask = ablation.masks(position[None])
            masked = torch.where(mask, image, torch.tensor(fill))[None]
            keep = token_masks(mask, model.cfg.patch_size)[0].nonzero().flatten()[None] if drop else None
            rows.append(model(masked, keep=keep)[0])
        out.append(torch.stack(rows))
    return torch.stack(out)


@pytest.mark.parametrize("kind,b", [("column", 3), ("row", 2), ("block", 3)])
def test_votes_match_a_plain_loop(kind, b):
    model = tiny_vit()
    ablation = Ablation(kind, b, (8, 8))
    x = torch.rand(4, 3, 8, 8)
    clf = smoothed(model, ablation, max_batch=5)  # pieces that split images and token-count groups
    with torch.no_grad():
        ref = reference_logits(model, ablation, x)
        torch.testing.assert_close(clf.ablation_logits(x), ref)
    votes = clf.votes(x)
    expected = torch.stack([torch.bincount(r.argmax(-1), minlength=4) for r in ref])
    assert torch.equal(votes, expected)
    assert votes.sum(1).eq(ablation.num_ablations).all()
    assert torch.equal(clf.predict(x), expected.argmax(1))


def test_threshold_rule_counts_every_class_above_theta():
    model = tiny_vit()
    ablation = Ablation("column", 2, (8, 8))
    x = torch.rand(3, 3, 8, 8)
    clf = smoothed(model, ablation, rule="threshold", threshold=0.3)
    with torch.no_grad():
        probs = reference_logits(model, ablation, x).softmax(-1)
    expected = (probs >= 0.3).sum(1)
    assert torch.equal(clf.votes(x), expected)
    assert (clf.votes(x).sum(1) <= 2 * ablation.num_ablations).all()


def test_results_do_not_depend_on_batching():
    model = tiny_vit()
    clf = smoothed(model, Ablation("column", 3, (8, 8)))
    x = torch.rand(5, 3, 8, 8)
    together = clf.votes(x)
    alone = torch.cat([clf.votes(x[i : i + 1]) for i in range(5)])
    assert torch.equal(together, alone)
    clf.max_batch = 3
    assert torch.equal(clf.votes(x), together)


def test_without_token_dropping_the_model_sees_whole_masked_images():
    model = tiny_vit()
    ablation = Ablation("column", 3, (8, 8))
    x = torch.rand(2, 3, 8, 8)
    with torch.no_grad():
        out = smoothed(model, ablation, drop_tokens=False).ablation_logits(x)
        torch.testing.assert_close(out, reference_logits(model, ablation, x, drop=False))


@pytest.mark.parametrize("options", [{}, {"shifted_patches": True, "locality_attention": True}],
                         ids=["plain", "spt-lsa"])
def test_a_patch_changes_only_the_ablations_it_touches(options):
    """The mechanism behind the certificate: ablations that keep no pixel of the patch see the same input.
    With SPT a kept token also sees its neighbours' pixels shifted in, but those are masked (the fill) before
    the shift, so the certificate holds for SPT/LSA base models too."""
    model = tiny_vit(**options)
    torch.manual_seed(0)
    for kind, b, m in [("column", 2, 3), ("row", 3, 2), ("block", 3, 2)]:
        ablation = Ablation(kind, b, (8, 8))
        clf = smoothed(model, ablation)
        x = torch.rand(1, 3, 8, 8)
        for _ in range(5):
            i, j = torch.randint(0, 8 - m + 1, (2,)).tolist()
            attacked = x.clone()
            attacked[..., i : i + m, j : j + m] = torch.rand(3, m, m)
            with torch.no_grad():
                changed = (clf.ablation_logits(attacked) != clf.ablation_logits(x)).any(-1)[0]
            patch = torch.zeros(8, 8, dtype=torch.bool)
            patch[i : i + m, j : j + m] = True
            touched = (ablation.masks(ablation.positions()) & patch).flatten(1).any(1)
            assert changed.any()  # the patch does reach the model
            assert not changed[~touched].any()
            assert changed.sum() <= touched.sum() <= ablation.delta(m)


class TinyCNN(nn.Module):
    def __init__(self, in_channels):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                                 nn.Flatten(), nn.Linear(4, 3))

    def forward(self, x):
        return self.net(x)


def test_levine_feizi_encoding_for_a_cnn_base():
    x = torch.rand(2, 3, 8, 8)
    ablation = Ablation("column", 2, (8, 8))
    masks = ablation.masks(torch.tensor([[0, 7], [0, 3]]))
    encoded = levine_feizi_encoding(x, masks)
    assert encoded.shape == (2, 6, 8, 8)
    torch.testing.assert_close(encoded[:, :3][masks[:, None].expand(-1, 3, -1, -1)], x[masks[:, None].expand(-1, 3, -1, -1)])
    torch.testing.assert_close(encoded[:, 3:] + encoded[:, :3], masks[:, None].float().expand(-1, 3, -1, -1))
    assert encoded[~masks[:, None].expand(-1, 6, -1, -1)].eq(0).all()
    cnn = TinyCNN(6).eval()
    clf = SmoothedClassifier(cnn, ablation, encoding="levine_feizi")
    with torch.no_grad():
        positions = ablation.positions()
        ref = torch.stack([cnn(levine_feizi_encoding(x, ablation.masks(p[None]).expand(2, -1, -1))) for p in positions], 1)
    torch.testing.assert_close(clf.ablation_logits(x), ref)


def test_soft_forward_is_differentiable_and_modes_are_restored():
    model = tiny_vit().train()
    clf = smoothed(model, Ablation("column", 2, (8, 8)))
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    clf.votes(x.detach())
    assert model.training
    model.eval()
    log_probs = clf(x)
    torch.testing.assert_close(log_probs.exp().sum(1), torch.ones(2))
    (grad,) = torch.autograd.grad(log_probs[:, 0].sum(), x)
    assert grad.abs().sum() > 0


def test_wrong_image_size_and_options_are_rejected():
    clf = smoothed(tiny_vit(), Ablation("column", 2, (8, 8)))
    with pytest.raises(VitkitError, match="do not match"):
        clf.votes(torch.rand(1, 3, 16, 16))
    with pytest.raises(VitkitError, match="voting rule"):
        smoothed(tiny_vit(), Ablation("column", 2, (8, 8)), rule="majority")


@pytest.mark.parametrize("device", [
    "meta",  # shapes and devices only: catches a tensor left on the CPU without a GPU
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")),
])
def test_images_on_another_device(device):
    model = tiny_vit().to(device)
    ablation = Ablation("column", 3, (8, 8))
    x = torch.rand(2, 3, 8, 8, device=device)
    # Token dropping needs real values (which tokens to keep), so meta runs whole masked images.
    clf = smoothed(model, ablation, drop_tokens=device != "meta")
    assert clf.ablation_logits(x).device.type == device
    assert clf.clean_logits(x).device.type == device
    if device != "meta":
        assert clf.votes(x).sum(1).eq(ablation.num_ablations).all()


def test_collect_votes_in_bfloat16_on_the_cpu():
    from vitkit.data import ImageDataset
    from vitkit.smoothing import collect_votes

    class Recording(nn.Module):  # a base model that notes the dtype its layer computes in
        def __init__(self):
            super().__init__()
            self.layer, self.dtypes = nn.Linear(3 * 8 * 8, 4), set()

        def forward(self, x):
            out = self.layer(x.flatten(1))
            self.dtypes.add(out.dtype)
            return out

    torch.manual_seed(0)
    data = ImageDataset(torch.randint(0, 256, (6, 3, 8, 8), dtype=torch.uint8), torch.arange(6) % 4,
                        ["a", "b", "c", "d"], "random")
    model = Recording()
    clf = smoothed(model, Ablation("column", 3, (8, 8)))
    full = collect_votes(clf, data, torch.device("cpu"), progress=False)
    assert model.dtypes == {torch.float32}
    model.dtypes.clear()
    half = collect_votes(clf, data, torch.device("cpu"), progress=False, bf16=True)
    assert model.dtypes == {torch.bfloat16}
    assert half.counts.sum(1).eq(8).all() and (half.counts == full.counts).float().mean() > 0.5
