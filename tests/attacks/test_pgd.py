"""FGSM, PGD and Auto-PGD, Square and RayS: budgets and the pixel box; for PGD exact special cases, batching
invariance, closed-form optima."""

import pytest
import torch
import torch.nn.functional as F

from attack_helpers import EPS, BinaryLinear, distance, seeded
from vitkit.attacks import NORMS, apgd, fgsm, pgd, rays, square
from vitkit.attacks.noise import image_keys, normal, uniform
from vitkit.errors import VitkitError

ATTACKS = {
    "fgsm": lambda m, x, y, eps, norm: fgsm(m, x, y, eps, norm=norm),
    "pgd": lambda m, x, y, eps, norm: pgd(m, x, y, eps, norm=norm, steps=5, generator=seeded()),
    "pgd-restarts": lambda m, x, y, eps, norm: pgd(m, x, y, eps, norm=norm, steps=3, restarts=3, generator=seeded()),
    "pgd-targeted": lambda m, x, y, eps, norm: pgd(m, x, (y + 1) % 4, eps, norm=norm, targeted=True, steps=5),
    "pgd-big-steps": lambda m, x, y, eps, norm: pgd(m, x, y, eps, norm=norm, steps=4, step_size=3 * eps),
    "apgd-ce": lambda m, x, y, eps, norm: apgd(m, x, y, eps, norm=norm, steps=6, restarts=2, generator=seeded()),
    "apgd-dlr": lambda m, x, y, eps, norm: apgd(m, x, y, eps, norm=norm, steps=6, loss="dlr", generator=seeded()),
    "square": lambda m, x, y, eps, norm: square(m, x, y, eps, norm=norm, queries=50, generator=seeded()),
    "rays": lambda m, x, y, eps, norm: rays(m, x, y, eps, queries=50),
}
LINF_ONLY = {"rays"}


@pytest.mark.parametrize(("attack", "norm"), [(a, n) for a in ATTACKS for n in NORMS if n == "linf" or a not in LINF_ONLY])
def test_budget_and_pixel_box_hold_and_the_input_is_untouched(attack, norm, model, batch):
    x, y = batch
    x[0, :, :2] = 0.0  # pixels on the edges of the box
    x[1, :, :2] = 1.0
    kept = x.clone()
    adversarial = ATTACKS[attack](model, x, y, EPS[norm], norm)
    assert torch.equal(x, kept)
    assert adversarial.shape == x.shape
    assert (distance(adversarial, x, norm) <= EPS[norm] + 1e-6).all()
    assert adversarial.min() >= 0 and adversarial.max() <= 1
    assert (adversarial != x).any()


@pytest.mark.parametrize("norm", NORMS)
def test_one_pgd_step_of_size_eps_without_random_start_is_fgsm(norm, model, batch):
    x, y = batch
    one_step = pgd(model, x, y, EPS[norm], norm=norm, steps=1, step_size=EPS[norm], random_start=False)
    assert torch.equal(one_step, fgsm(model, x, y, EPS[norm], norm=norm))


@pytest.mark.parametrize("norm", NORMS)
def test_an_image_gets_the_same_attack_alone_and_in_any_batch(norm, model, batch):
    x, y = batch
    together = pgd(model, x, y, EPS[norm], norm=norm, steps=3, restarts=3, generator=seeded(5))
    for i in (0, 5):
        alone = pgd(model, x[i : i + 1], y[i : i + 1], EPS[norm], norm=norm, steps=3, restarts=3, generator=seeded(5))
        torch.testing.assert_close(alone[0], together[i], rtol=0, atol=1e-6)
    reordered = pgd(model, x.flip(0), y.flip(0), EPS[norm], norm=norm, steps=3, restarts=3, generator=seeded(5))
    torch.testing.assert_close(reordered.flip(0), together, rtol=0, atol=1e-6)
    other_seed = pgd(model, x, y, EPS[norm], norm=norm, steps=3, restarts=3, generator=seeded(6))
    assert not torch.equal(other_seed, together)


def test_keyed_noise_is_uniform_and_differs_between_images():
    keys = image_keys(torch.rand(3, 3, 8, 8), seed=7)
    assert len(set(keys.tolist())) == 3
    u = uniform(keys, 0, (20_000,))
    assert 0 <= u.min() and u.max() < 1
    assert abs(u.mean() - 0.5) < 0.01 and abs(u.var() - 1 / 12) < 0.01
    assert not torch.equal(u[0], u[1]) and not torch.equal(u[0], uniform(keys, 1, (20_000,))[0])
    z = normal(keys, 0, (20_000,))
    assert abs(z.mean()) < 0.03 and abs(z.std() - 1) < 0.03
    assert torch.equal(image_keys(torch.zeros(2, 3, 4, 4), 1), image_keys(torch.zeros(1, 3, 4, 4), 1).expand(2))


def test_targeted_pgd_raises_the_target_probability(model, batch):
    x, _ = batch
    target = (model(x).argmax(1) + 1) % 4
    adversarial = pgd(model, x, target, 0.1, targeted=True, steps=10, generator=seeded())
    with torch.no_grad():
        before = model(x).softmax(1).gather(1, target[:, None])
        after = model(adversarial).softmax(1).gather(1, target[:, None])
    assert (after > before).all()


@pytest.mark.parametrize("norm", NORMS)
def test_restarts_are_never_worse_than_one_run(norm, model, batch):
    x, _ = batch
    y = model(x).argmax(1)  # every image starts classified right
    eps = EPS[norm] / 4
    once = pgd(model, x, y, eps, norm=norm, steps=3, generator=seeded(3))
    thrice = pgd(model, x, y, eps, norm=norm, steps=3, restarts=3, generator=seeded(3))
    with torch.no_grad():
        logits_once, logits_thrice = model(once), model(thrice)
    fooled_once, fooled_thrice = logits_once.argmax(1) != y, logits_thrice.argmax(1) != y
    assert (fooled_thrice | ~fooled_once).all()
    loss_once = F.cross_entropy(logits_once, y, reduction="none")
    loss_thrice = F.cross_entropy(logits_thrice, y, reduction="none")
    assert (loss_thrice[~fooled_thrice] >= loss_once[~fooled_thrice]).all()
    assert fooled_once.sum() < len(y)  # otherwise the check above says nothing


def test_pgd_reaches_the_closed_form_optimum_of_a_linear_model():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3 * 4 * 4, generator=g, dtype=torch.float64)
    model = BinaryLinear(w)
    x = torch.rand(5, 3, 4, 4, generator=g, dtype=torch.float64)
    x[:, 0] = 0.01  # near the edge of the box: the optimum is clipped there
    y = torch.zeros(5, dtype=torch.long)
    eps = 0.05
    best_linf = (x + eps * w.sign().reshape(3, 4, 4)).clamp(0, 1)
    for random_start in (False, True):
        found = pgd(model, x, y, eps, steps=10, random_start=random_start, generator=g)
        torch.testing.assert_close(found, best_linf, rtol=0, atol=1e-12)
    torch.testing.assert_close(fgsm(model, x, y, eps), best_linf, rtol=0, atol=1e-12)

    x = 0.3 + 0.4 * torch.rand(5, 3, 4, 4, generator=g, dtype=torch.float64)  # far from the edges
    eps = 0.25
    best_l2 = x + eps * (w / w.norm()).reshape(3, 4, 4)
    torch.testing.assert_close(fgsm(model, x, y, eps, norm="l2"), best_l2, rtol=0, atol=1e-12)
    torch.testing.assert_close(pgd(model, x, y, eps, norm="l2", steps=10, random_start=False), best_l2, rtol=0,
                               atol=1e-12)
    found = pgd(model, x, y, eps, norm="l2", steps=60, step_size=eps / 2, generator=g)
    torch.testing.assert_close(found, best_l2, rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(norm="l1"), "unknown norm"),
        (dict(steps=0), "at least one step"),
        (dict(restarts=2, random_start=False), "repeat the same run"),
    ],
)
def test_bad_options_are_explained(options, message, model, batch):
    x, y = batch
    with pytest.raises(VitkitError, match=message):
        pgd(model, x, y, 0.1, **options)
    with pytest.raises(VitkitError, match="budget"):
        fgsm(model, x, y, -0.1)
