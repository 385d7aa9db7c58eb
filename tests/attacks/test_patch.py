"""The patch attack: pixels change only inside the square, positions given or searched."""

import pytest
import torch

from vitkit.attacks import patch_attack, patch_mask
from vitkit.errors import VitkitError


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def test_patch_mask_marks_the_square():
    mask = patch_mask(torch.tensor([[1, 2], [5, 0]]), 3, (8, 8))
    assert mask.shape == (2, 1, 8, 8) and mask.dtype == torch.bool
    assert mask[0, 0, 1:4, 2:5].all() and mask[0].sum() == 9
    assert mask[1, 0, 5:8, 0:3].all() and mask[1].sum() == 9


@pytest.mark.parametrize("given", [True, False])
def test_only_pixels_inside_the_patch_change(given, model, batch):
    x, y = batch
    kept = x.clone()
    positions = torch.randint(0, 6, (8, 2), generator=seeded()) if given else None
    adversarial, used = patch_attack(model, x, y, 3, positions=positions, num_positions=3, steps=5, generator=seeded())
    assert torch.equal(x, kept)
    if given:
        assert torch.equal(used, positions)
    assert used.shape == (8, 2) and used.min() >= 0 and used.max() <= 8 - 3
    inside = patch_mask(used, 3, (8, 8)).expand_as(x)
    assert torch.equal(adversarial[~inside], x[~inside])  # bit for bit
    assert (adversarial[inside] != x[inside]).any()
    assert adversarial.min() >= 0 and adversarial.max() <= 1


def test_searching_positions_is_never_worse_than_the_first(model, batch):
    x, _ = batch
    y = model(x).argmax(1)
    first, _ = patch_attack(model, x, y, 2, num_positions=1, steps=3, generator=seeded(2))
    searched, _ = patch_attack(model, x, y, 2, num_positions=6, steps=3, generator=seeded(2))
    with torch.no_grad():
        fooled_first, fooled_searched = model(first).argmax(1) != y, model(searched).argmax(1) != y
    assert (fooled_searched | ~fooled_first).all()
    assert fooled_searched.sum() > fooled_first.sum()


def test_an_image_gets_the_same_patch_alone_and_in_a_batch(model, batch):
    x, y = batch
    together, where = patch_attack(model, x, y, 3, num_positions=3, steps=3, generator=seeded(4))
    alone, where_alone = patch_attack(model, x[3:4], y[3:4], 3, num_positions=3, steps=3, generator=seeded(4))
    assert torch.equal(where_alone[0], where[3])
    torch.testing.assert_close(alone[0], together[3], rtol=0, atol=1e-6)


def test_a_whole_image_patch_can_fool_anything(model, batch):
    x, _ = batch
    y = model(x).argmax(1)
    adversarial, _ = patch_attack(model, x, y, 8, steps=30, step_size=0.1, generator=seeded())
    assert (model(adversarial).argmax(1) != y).float().mean() >= 0.75


@pytest.mark.parametrize(
    "size,positions,message",
    [(9, None, "does not fit"), (3, torch.tensor([[6, 0]] * 8), "row <= 5"), (3, torch.zeros(8, 3), "(B, 2)")],
)
def test_bad_sizes_and_positions_are_explained(size, positions, message, model, batch):
    x, y = batch
    with pytest.raises(VitkitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        patch_attack(model, x, y, size, positions=positions)
