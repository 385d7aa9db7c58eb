"""Square Attack: the paper's window schedule, the exact optimum of a linear model under ℓ∞, progress under
ℓ2, the query budget, batching invariance, and success where gradients are masked."""

import pytest
import torch
from torch import nn

from attack_helpers import EPS, Counting, Staircase, distance, seeded, unfoolable_linear
from vitkit.attacks import NORMS, margin, pgd, square
from vitkit.attacks.square import window_fraction
from vitkit.errors import VitkitError


def test_the_window_schedule_is_the_papers_rescaled_to_the_budget():
    # p_init up to iteration 10 of 10,000, then halved after 10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000
    expected = {0: 1, 10: 1, 11: 2, 50: 2, 51: 4, 200: 4, 201: 8, 501: 16, 1001: 32, 2001: 64, 4001: 128,
                6001: 256, 8000: 256, 8001: 512, 9999: 512}
    for iteration, divisor in expected.items():
        assert window_fraction(0.8, iteration, 10000) == 0.8 / divisor
    assert window_fraction(0.8, 3, 100) == 0.8 / 8  # iteration 3 of 100 is 300 of 10,000
    assert window_fraction(0.8, 100, 1000) == 0.8 / 16


def test_linf_search_ends_on_the_exact_optimum_of_a_linear_model():
    # The margin −(w·x + b) is lowest at the vertex x + ε·sign(w), clipped; the search only visits vertices,
    # and its 1×1 windows in the last ~1,900 queries fix every pixel's three signs.
    model, x, y = unfoolable_linear()
    eps = 0.05
    found = square(model, x, y, eps, queries=2000, generator=seeded(3))
    torch.testing.assert_close(found, (x + eps * model.w.detach().sign().view(3, 4, 4)).clamp(0, 1), rtol=0, atol=0)


def test_l2_search_stays_on_the_sphere_and_climbs_towards_the_optimum():
    model, x, y = unfoolable_linear(1)
    x = 0.3 + 0.4 * x  # far from the edges: nothing is clipped
    eps = 0.5
    w = model.w.detach()
    found = square(model, x, y, eps, norm="l2", queries=2000, generator=seeded(3))
    torch.testing.assert_close(distance(found, x, "l2"), torch.full((5,), eps, dtype=x.dtype))
    gain = (found - x).flatten(1) @ w  # the optimum x + ε·w/‖w‖ gains ε‖w‖
    start = square(model, x, y, eps, norm="l2", queries=2, generator=seeded(3))  # the tiles of the start only
    assert ((start - x).flatten(1) @ w < gain).all()
    # A random search with fixed-shape bumps: a transcription of the authors' loop gets 0.39–0.56 of the
    # optimum on 8×8 images with 2,000 queries, this one 0.56–0.62 on 8×8 and 0.55–0.62 here.
    assert (gain > 0.45 * eps * w.norm()).all()


@pytest.mark.parametrize("norm", NORMS)
def test_an_image_costs_at_most_the_query_budget(norm, model, batch):
    x, y = batch
    linear, xs, ys = unfoolable_linear()
    counting = Counting(linear)
    square(counting, xs, ys, EPS[norm], norm=norm, queries=37, generator=seeded())
    assert counting.images == 37 * len(xs)  # never fooled: every query is spent
    counting = Counting(model)
    square(counting, x, y, EPS[norm], norm=norm, queries=37, generator=seeded())
    assert counting.images <= 37 * len(x)


@pytest.mark.parametrize("norm", NORMS)
def test_an_image_gets_the_same_attack_alone_and_in_a_batch(norm, model, batch):
    x, y = batch
    together = square(model, x, y, EPS[norm], norm=norm, queries=60, generator=seeded(5))
    for i in range(len(x)):
        alone = square(model, x[i : i + 1], y[i : i + 1], EPS[norm], norm=norm, queries=60, generator=seeded(5))
        torch.testing.assert_close(alone[0], together[i], rtol=0, atol=1e-6)


def test_misclassified_images_are_left_alone_and_the_margin_never_rises(model, batch):
    x, y = batch
    with torch.no_grad():
        before = margin(model(x), y)
    found = square(model, x, y, 4 / 255, queries=100, generator=seeded())
    with torch.no_grad():
        after = margin(model(found), y)
    wrong = before <= 0
    assert wrong.any() and (~wrong).any()
    assert torch.equal(found[wrong], x[wrong])
    # From the stripes the search only accepts drops; the stripes themselves may rise, so compare the
    # result with the stripes alone (a budget of two queries: the clean check and the start).
    stripes = square(model, x, y, 4 / 255, queries=2, generator=seeded())
    with torch.no_grad():
        assert (after[~wrong] <= margin(model(stripes), y)[~wrong] + 1e-6).all()


def test_square_fools_a_model_whose_gradients_are_masked():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3 * 8 * 8, generator=g)
    model = Staircase(w)
    x = torch.rand(16, 3, 8, 8, generator=g)
    with torch.no_grad():
        y = model(x).argmax(1)
    eps = 1 / 8
    assert torch.equal(model(pgd(model, x, y, eps, steps=20, random_start=False)).argmax(1), y)  # PGD stays put
    found = square(model, x, y, eps, queries=300, generator=seeded())
    assert (model(found).argmax(1) != y).float().mean() > 0.9


@pytest.mark.parametrize("options,message", [(dict(queries=0), "at least one query"), (dict(p_init=0.0), "p_init"),
                                             (dict(norm="l1"), "unknown norm")])
def test_bad_options_are_explained(options, message, model, batch):
    x, y = batch
    with pytest.raises(VitkitError, match=message):
        square(model, x, y, 0.1, **options)


@pytest.mark.parametrize("norm", NORMS)
def test_no_budget_leaves_the_images_and_non_square_images_work(norm, model, batch):
    x, y = batch
    assert torch.equal(square(model, x, y, 0.0, norm=norm, queries=20, generator=seeded()), x)
    linear, wide, labels = unfoolable_linear()
    wide = torch.cat([wide, wide.flip(3)], dim=3)  # 4×8
    linear.w = nn.Parameter(torch.cat([linear.w.detach().view(3, 4, 4)] * 2, dim=2).flatten())
    found = square(linear, wide, labels, EPS[norm], norm=norm, queries=200, generator=seeded())
    assert (distance(found, wide, norm) <= EPS[norm] + 1e-6).all() and found.min() >= 0 and found.max() <= 1
    assert ((found - wide).flatten(1) @ linear.w.detach() > 0).all()  # climbed the linear model's margin
