"""Auto-PGD: the paper's step-size schedule and DLR loss written out, batching invariance, and
convergence where a fixed step size cannot converge."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attack_helpers import EPS, Counting, distance, seeded, unfoolable_linear
from vitkit.attacks import NORMS, apgd, dlr_loss, pgd
from vitkit.attacks.apgd import checkpoints
from vitkit.errors import VitkitError

def test_checkpoints_follow_the_papers_schedule():
    # p = 0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99 (then 1.05), by hand from p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06)
    assert checkpoints(100) == [0, 22, 41, 57, 70, 80, 87, 93, 99]
    p = [0, 0.22, 0.41, 0.57, 0.70, 0.80, 0.87, 0.93, 0.99]
    for steps in (10, 20, 37, 250):
        assert checkpoints(steps) == sorted({math.ceil(q * steps - 1e-9) for q in p if math.ceil(q * steps - 1e-9) < steps})
    assert checkpoints(1) == [0]


def test_dlr_loss_by_hand_and_its_invariances():
    logits = torch.tensor([[3.0, 1.0, 2.0, 0.0], [3.0, 1.0, 2.0, 0.0], [0.5, 4.0, 1.0, 1.0]])
    labels = torch.tensor([0, 3, 1])
    # -(z_y - max other) / (first - third): -(3 - 2) / (3 - 1), -(0 - 3) / 2, -(4 - 1) / (4 - 1)
    torch.testing.assert_close(dlr_loss(logits, labels), torch.tensor([-0.5, 1.5, -1.0]))
    z = torch.randn(16, 10, generator=seeded(1))
    y = torch.randint(0, 10, (16,), generator=seeded(2))
    torch.testing.assert_close(dlr_loss(3.5 * z - 7.0, y), dlr_loss(z, y))
    assert ((dlr_loss(z, y) > 0) == (z.argmax(1) != y)).all()
    with pytest.raises(VitkitError, match="at least 3 classes"):
        dlr_loss(torch.randn(2, 2), torch.tensor([0, 1]))


@pytest.mark.parametrize("loss", ["ce", "dlr"])
@pytest.mark.parametrize("norm", NORMS)
def test_an_image_gets_the_same_attack_alone_and_in_a_batch(norm, loss, model, batch):
    x, y = batch  # budgets and the pixel box: with the other attacks in test_pgd.py
    together = apgd(model, x, y, EPS[norm], norm=norm, steps=6, loss=loss, restarts=2, generator=seeded(5))
    for i in (0, 5):
        alone = apgd(model, x[i : i + 1], y[i : i + 1], EPS[norm], norm=norm, steps=6, loss=loss, restarts=2,
                     generator=seeded(5))
        torch.testing.assert_close(alone[0], together[i], rtol=0, atol=1e-6)


def test_the_result_is_a_success_or_at_least_as_bad_as_the_start(model, batch):
    x, _ = batch
    y = model(x).argmax(1)  # every image starts classified right
    adversarial = apgd(model, x, y, 2 / 255, steps=10, random_start=False)
    with torch.no_grad():
        before, after = model(x), model(adversarial)
    fooled = after.argmax(1) != y
    loss_before = F.cross_entropy(before, y, reduction="none")
    loss_after = F.cross_entropy(after, y, reduction="none")
    assert (loss_after[~fooled] >= loss_before[~fooled]).all()
    assert (loss_after > loss_before).any()


def test_fooled_images_leave_the_batch():
    """Three images the model already gets wrong and two it can never get wrong: after the first pass the model
    sees only the two, for every step, and the three come back as they started (their first success)."""
    linear, x, _ = unfoolable_linear()  # class 0 everywhere in the ball
    y = torch.tensor([1, 0, 1, 0, 1])
    counting = Counting(linear)
    steps = 7
    adversarial = apgd(counting, x, y, 8 / 255, steps=steps, random_start=False)
    assert counting.images == len(x) + steps * 2
    assert torch.equal(adversarial[y == 1], x[y == 1])
    alone = apgd(linear, x[y == 0], y[y == 0], 8 / 255, steps=steps, random_start=False)
    torch.testing.assert_close(adversarial[y == 0], alone, rtol=0, atol=0)


class Peak(nn.Module):
    """Two logits (0, -s·‖x - c‖²): for true class 0 the cross-entropy is highest at x = c, inside the ball."""

    def __init__(self, centre: torch.Tensor, sharpness: float = 50.0):
        super().__init__()
        self.register_buffer("centre", centre)
        self.sharpness = sharpness

    def forward(self, x):
        z = -self.sharpness * (x - self.centre).flatten(1).pow(2).sum(1)
        return torch.stack([torch.zeros_like(z), z], dim=1)


@pytest.mark.parametrize("norm", NORMS)
def test_step_halving_converges_to_an_interior_optimum_that_a_fixed_step_circles(norm):
    g = torch.Generator().manual_seed(0)
    x = 0.3 + 0.4 * torch.rand(4, 3, 4, 4, generator=g, dtype=torch.float64)
    eps = EPS[norm]
    direction = torch.randn(x.shape, generator=g, dtype=torch.float64)
    if norm == "linf":  # off the grid of any fixed step: each pixel 0.2ε to 0.8ε away
        offset = direction.sign() * eps * (0.2 + 0.6 * torch.rand(x.shape, generator=g, dtype=torch.float64))
    else:
        offset = direction / direction.flatten(1).norm(dim=1).reshape(-1, 1, 1, 1) * 0.37 * eps
    model = Peak(x + offset)  # the optimum, inside the ball
    y = torch.zeros(4, dtype=torch.long)
    found = apgd(model, x, y, eps, norm=norm, steps=100, random_start=False)
    assert (distance(found, model.centre, norm) < 0.05 * eps).all()
    circling = pgd(model, x, y, eps, norm=norm, steps=100, step_size=eps / 2, random_start=False)
    assert (distance(circling, model.centre, norm) > 0.1 * eps).all()  # the same number of fixed steps does not get there


def test_apgd_reaches_the_corner_optimum_of_a_linear_model():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(3 * 4 * 4, generator=g, dtype=torch.float64)
    x = torch.rand(5, 3, 4, 4, generator=g, dtype=torch.float64)
    model = nn.Sequential(nn.Flatten(), nn.Linear(48, 2, dtype=torch.float64))
    with torch.no_grad():
        model[1].weight.copy_(torch.stack([torch.zeros_like(w), w]))
        model[1].bias.zero_()
    y = torch.zeros(5, dtype=torch.long)
    eps = 0.05
    best = (x + eps * w.sign().reshape(3, 4, 4)).clamp(0, 1)
    found = apgd(model, x, y, eps, steps=10, generator=g)
    fooled = model(found).argmax(1) != y
    # a fooled image stops at its first misclassified point; the others climb to the corner
    torch.testing.assert_close(found[~fooled], best[~fooled], rtol=0, atol=1e-12)
    assert (model(best).argmax(1)[fooled] != 0).all()


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(norm="l1"), "unknown norm"),
        (dict(steps=0), "at least one step"),
        (dict(restarts=2, random_start=False), "repeat the same run"),
        (dict(loss="hinge"), "unknown APGD loss"),
    ],
)
def test_bad_options_are_explained(options, message, model, batch):
    x, y = batch
    with pytest.raises(VitkitError, match=message):
        apgd(model, x, y, 0.1, **options)
