"""Ablation families: masks against their plain definition, and the soundness of Δ by exhaustion."""

import math

import pytest
import torch

from conftest import tiny_vit
from vitkit.errors import VitkitError
from vitkit.smoothing import Ablation, RandomlyAblated, ablated_logits, token_masks


def reference_mask(ablation: Ablation, row: int, col: int) -> torch.Tensor:
    """Pixel by pixel, as the papers define it: b adjacent columns / rows / a b×b block, wrapping."""
    H, W = ablation.image_size
    b = ablation.size
    keep = torch.zeros(H, W, dtype=torch.bool)
    for i in range(H):
        for j in range(W):
            in_rows = ablation.kind == "column" or (i - row) % H < b
            in_cols = ablation.kind == "row" or (j - col) % W < b
            keep[i, j] = in_rows and in_cols
    return keep


@pytest.mark.parametrize("kind", ["column", "row", "block"])
@pytest.mark.parametrize("stride", [1, 3])
def test_masks_match_the_definition(kind, stride):
    ablation = Ablation(kind, 3, (7, 9), stride)
    positions = ablation.positions()
    assert len(positions) == ablation.num_ablations
    masks = ablation.masks(positions)
    for (r, c), mask in zip(positions.tolist(), masks):
        assert torch.equal(mask, reference_mask(ablation, r, c))
    # Start positions: every s-th along the ablated axes, 0 elsewhere.
    if kind == "column":
        assert positions[:, 1].tolist() == list(range(0, 9, stride)) and positions[:, 0].eq(0).all()
    if kind == "block":
        assert len(positions) == math.ceil(7 / stride) * math.ceil(9 / stride)


def test_column_ablation_wraps_around_the_right_edge():
    ablation = Ablation("column", 4, (32, 32))
    mask = ablation.masks(torch.tensor([[0, 30]]))[0]
    assert mask.all(0).nonzero().flatten().tolist() == [0, 1, 30, 31]
    assert mask.sum() == 4 * 32


def touched_counts(ablation: Ablation, m: int) -> torch.Tensor:
    """For every placement of an m×m patch inside the image: how many ablations keep a pixel of it."""
    H, W = ablation.image_size
    masks = ablation.masks(ablation.positions()).flatten(1).float()  # (A, HW)
    patches = []
    for i in range(H - m + 1):
        for j in range(W - m + 1):
            p = torch.zeros(H, W)
            p[i : i + m, j : j + m] = 1
            patches.append(p.flatten())
    return ((torch.stack(patches) @ masks.T) > 0).sum(1)  # (placements,)


CASES = [
    (kind, size, b, s)
    for kind in ("column", "row", "block")
    for size in ((8, 8), (12, 10))
    for b in (1, 3, 4)
    for s in (1, 2, 3)
]


@pytest.mark.parametrize("kind,image_size,b,s", CASES)
def test_every_patch_touches_at_most_delta_ablations(kind, image_size, b, s):
    """Exhaustive soundness: no placement touches more than Δ ablations, and some touches exactly Δ."""
    ablation = Ablation(kind, b, image_size, s)
    for m in range(1, min(image_size) + 1):
        counts = touched_counts(ablation, m)
        delta = ablation.delta(m)
        assert counts.max() == delta, (m, counts.max(), delta)


@pytest.mark.parametrize("kind", ["column", "row", "block"])
@pytest.mark.parametrize("b,s", [(4, 1), (4, 2), (2, 4), (3, 1)])
def test_delta_is_the_papers_formula_when_the_stride_divides_the_side(kind, b, s):
    ablation = Ablation(kind, b, (16, 16), s)
    for m in range(1, 10):
        one_axis = min(math.ceil((m + b - 1) / s), 16 // s)
        assert ablation.delta(m) == (one_axis**2 if kind == "block" else one_axis)


def test_seed_000_setting():
    """Column ablation b=4 on CIFAR's 32 columns against 5×5 patches: 32 ablations, Δ = 5 + 4 − 1 = 8."""
    ablation = Ablation("column", 4, (32, 32))
    assert ablation.num_ablations == 32 and ablation.delta(5) == 8


def test_delta_at_a_non_dividing_stride_exceeds_the_formula_and_stays_sound():
    # 10 columns, stride 3: starts 0, 3, 6, 9; the band at 9 wraps onto column 0, which band 0 also keeps.
    ablation = Ablation("column", 2, (10, 10), 3)
    assert ablation.delta(1) == 2 > math.ceil((1 + 2 - 1) / 3)
    assert touched_counts(ablation, 1).max() == 2


def test_bad_ablations_are_rejected_with_a_message():
    with pytest.raises(VitkitError, match="unknown ablation"):
        Ablation("diagonal", 4, (32, 32))
    with pytest.raises(VitkitError, match="ablation size"):
        Ablation("column", 40, (32, 32))
    with pytest.raises(VitkitError, match="patch size"):
        Ablation("column", 4, (32, 32)).delta(33)


@pytest.mark.parametrize("b,touched", [(3, {4}), (2, {1, 2, 4})])
def test_token_masks_keep_every_patch_with_a_kept_pixel(b, touched):
    ablation = Ablation("block", b, (8, 8))
    masks = ablation.masks(ablation.positions())
    tokens = token_masks(masks, 2)
    expected = masks.reshape(-1, 4, 2, 4, 2).permute(0, 1, 3, 2, 4).reshape(len(masks), 16, 4).any(-1)
    assert torch.equal(tokens, expected)
    # On 2×2 patches a 3-pixel band always spans 2 patches per axis; a 2-pixel band spans 1 or 2.
    assert set(tokens.sum(1).tolist()) == touched


def test_ablated_logits_drop_only_fully_masked_tokens():
    """Grouped token dropping equals running each image alone on the tokens it keeps."""
    model = tiny_vit()
    ablation = Ablation("column", 2, (8, 8))
    x = torch.randn(6, 3, 8, 8)
    positions = torch.tensor([[0, 0], [0, 1], [0, 2], [0, 7], [0, 5], [0, 4]])  # 1 or 2 token columns, mixed
    masks = ablation.masks(positions)
    assert token_masks(masks, 2).sum(1).tolist() == [4, 8, 4, 8, 8, 4]  # two groups, interleaved
    out = ablated_logits(model, x, masks, fill=0.5, patch_size=2)
    for i in range(6):
        xi = torch.where(masks[i], x[i], torch.tensor(0.5))[None]
        keep = token_masks(masks[i : i + 1], 2)[0].nonzero().flatten()[None]
        torch.testing.assert_close(out[i], model(xi, keep=keep)[0])
    full = ablated_logits(model, x, masks, fill=0.5)  # without token dropping: the whole masked image
    torch.testing.assert_close(full, model(torch.where(masks[:, None], x, torch.tensor(0.5))))


def test_randomly_ablated_is_seeded_and_uses_the_familys_positions():
    model = tiny_vit()
    ablation = Ablation("row", 2, (8, 8))
    x = torch.randn(5, 3, 8, 8)
    a = RandomlyAblated(model, ablation, patch_size=2, seed=3)(x)
    b = RandomlyAblated(model, ablation, patch_size=2, seed=3)(x)
    torch.testing.assert_close(a, b)
    drawn = ablation.random_positions(5, torch.Generator().manual_seed(3))  # the positions it used
    torch.testing.assert_close(a, ablated_logits(model, x, ablation.masks(drawn), patch_size=2))
    positions = ablation.random_positions(1000, torch.Generator().manual_seed(0))
    assert positions[:, 1].eq(0).all() and set(positions[:, 0].tolist()) == set(range(8))
