"""The pixel-space wrapper, the input gradient, and what attacks must leave alone."""

import pytest
import torch

from conftest import tiny_vit
from vitkit.attacks import PixelModel, fgsm, input_gradient, patch_attack, pgd
from vitkit.errors import VitkitError

ATTACKS = {
    "fgsm": lambda m, x, y: fgsm(m, x, y, 0.1),
    "pgd": lambda m, x, y: pgd(m, x, y, 0.1, steps=3, restarts=2),
    "patch": lambda m, x, y: patch_attack(m, x, y, 3, num_positions=2, steps=3)[0],
}


def test_pixel_model_normalises_inside():
    vit = tiny_vit()
    model = PixelModel(vit, (0.5, 0.4, 0.3), (0.25, 0.2, 0.3))
    x = torch.rand(2, 3, 8, 8)
    mean = torch.tensor([0.5, 0.4, 0.3])[:, None, None]
    std = torch.tensor([0.25, 0.2, 0.3])[:, None, None]
    torch.testing.assert_close(model(x), vit((x - mean) / std))
    assert "mean" not in model.state_dict()  # the statistics live in the checkpoint's metadata


def test_input_gradient_matches_finite_differences():
    model = PixelModel(tiny_vit(), (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)).double()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 8, 8, generator=g, dtype=torch.float64)
    y = torch.tensor([1, 3])
    losses, grad = input_gradient(model, x, y)
    torch.testing.assert_close(losses, torch.nn.functional.cross_entropy(model(x), y, reduction="none"))
    h = 1e-6
    for flat in torch.randint(0, x.numel(), (12,), generator=g).tolist():
        e = torch.zeros(x.numel(), dtype=torch.float64)
        e[flat] = h
        e = e.reshape(x.shape)
        up = input_gradient(model, x + e, y)[0].sum()
        down = input_gradient(model, x - e, y)[0].sum()
        torch.testing.assert_close(grad.flatten()[flat], (up - down) / (2 * h), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("attack", ATTACKS)
def test_attacks_run_in_eval_mode_and_restore_modes_and_parameters(attack, batch):
    model = PixelModel(tiny_vit(dropout=0.5), (0.5,) * 3, (0.25,) * 3)
    model.train()
    model.model.blocks[0].eval()  # a mixed state must come back exactly as it was
    before = {name: m.training for name, m in model.named_modules()}
    seen = []
    model.register_forward_hook(lambda m, inputs, output: seen.append(m.training))
    x, y = batch
    ATTACKS[attack](model, x, y)
    assert seen and not any(seen)
    assert {name: m.training for name, m in model.named_modules()} == before
    for p in model.parameters():
        assert p.requires_grad and p.grad is None


def test_gradients_of_the_caller_are_kept(model, batch):
    x, y = batch
    torch.nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    pgd(model, x, y, 0.1, steps=2)
    for p, g in zip(model.parameters(), grads):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("attack", ATTACKS)
def test_normalised_input_is_refused(attack, model, batch):
    x, y = batch
    with pytest.raises(VitkitError, match="PixelModel"):
        ATTACKS[attack](model, (x - 0.5) / 0.25, y)
