"""RayS: the nearest boundary of a linear model found to within 5%, the query budget, batching invariance,
and success where gradients are masked."""

import pytest
import torch

from attack_helpers import BinaryLinear, Counting, Staircase, unfoolable_linear
from vitkit.attacks import pgd, rays
from vitkit.errors import VitkitError


def test_the_nearest_boundary_of_a_linear_model_is_found():
    # Class 0 while w·x + b < 0. The nearest point of the boundary in ℓ∞ is −(w·x + b)/‖w‖₁ away, along
    # sign(w) (inside the box's middle nothing is clipped): a sign vector, the kind RayS searches.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3 * 4 * 4, generator=g, dtype=torch.float64)
    model = BinaryLinear(w, bias=0.0)
    for _ in range(3):
        x = 0.4 + 0.2 * torch.rand(1, 3, 4, 4, generator=g, dtype=torch.float64)
        model.bias = -float(x.flatten() @ w) - 0.5  # w·x + b = −0.5: right, 0.5/‖w‖₁ from the boundary
        y = torch.zeros(1, dtype=torch.long)
        nearest = 0.5 / w.abs().sum().item()
        found = rays(model, x, y, 1.05 * nearest, queries=3000)
        assert model(found).argmax(1).item() == 1
        assert (found - x).abs().max() <= 1.05 * nearest + 1e-12


def test_an_image_costs_at_most_the_query_budget(model, batch):
    linear, x, y = unfoolable_linear()
    counting = Counting(linear)
    rays(counting, x, y, 8 / 255, queries=37)
    assert counting.images == 37 * len(x)  # never fooled: every query is spent
    x, y = batch
    counting = Counting(model)
    rays(counting, x, y, 8 / 255, queries=37)
    assert counting.images <= 37 * len(x)


def test_an_image_gets_the_same_attack_alone_and_in_a_batch(model, batch):
    x, y = batch
    together = rays(model, x, y, 8 / 255, queries=200)
    for i in range(len(x)):
        torch.testing.assert_close(rays(model, x[i : i + 1], y[i : i + 1], 8 / 255, queries=200)[0], together[i],
                                   rtol=0, atol=1e-6)


def test_misclassified_images_are_left_alone(model, batch):
    x, y = batch
    with torch.no_grad():
        wrong = model(x).argmax(1) != y
    assert wrong.any()
    assert torch.equal(rays(model, x, y, 8 / 255, queries=50)[wrong], x[wrong])


def test_rays_fools_a_model_whose_gradients_are_masked():
    g = torch.Generator().manual_seed(0)
    model = Staircase(torch.randn(3 * 8 * 8, generator=g))
    x = torch.rand(16, 3, 8, 8, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = 1 / 8
    assert torch.equal(model(pgd(model, x, y, eps, steps=20, random_start=False)).argmax(1), y)  # PGD stays put
    assert (model(rays(model, x, y, eps, queries=300)).argmax(1) != y).float().mean() > 0.9


@pytest.mark.parametrize("options,message", [(dict(queries=0), "at least one query"), (dict(tolerance=0.0), "tolerance")])
def test_bad_options_are_explained(options, message, model, batch):
    x, y = batch
    with pytest.raises(VitkitError, match=message):
        rays(model, x, y, 0.1, **options)


def test_no_budget_leaves_the_images_and_non_square_images_work(model, batch):
    x, y = batch
    assert torch.equal(rays(model, x, y, 0.0, queries=20), x)
    g = torch.Generator().manual_seed(2)
    wide = BinaryLinear(torch.randn(3 * 4 * 8, generator=g), bias=0.0)
    images = torch.rand(4, 3, 4, 8, generator=g)
    with torch.no_grad():
        labels = wide(images).argmax(1)
    found = rays(wide, images, labels, 0.3, queries=300)
    assert (found - images).abs().amax() <= 0.3 + 1e-6 and found.min() >= 0 and found.max() <= 1
    assert (wide(found).argmax(1) != labels).all()  # a linear model falls within 0.3 of these images
