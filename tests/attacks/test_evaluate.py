"""Robust accuracy over a data set: bounds, batching invariance, transfer from a surrogate."""

import torch
from torch import nn

from vitkit.attacks import Robustness, apgd, attack_outcomes, patch_attack, pgd, robust_accuracy, worst_case


def attack_pgd(m, x, y, eps, g):
    return pgd(m, x, y, eps, steps=3, restarts=2, generator=g)


def data(model, n=12):
    images = torch.randint(0, 256, (n, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = model(images.float() / 255).argmax(1)
    labels[:3] = (labels[:3] + 1) % 4  # a few wrong ones, so clean accuracy is below 1
    return images, labels


def test_robust_accuracy_is_at_most_clean_and_falls_with_eps(model):
    images, labels = data(model)
    result = robust_accuracy(model, images, labels, attack_pgd, [0.0, 2 / 255, 0.05, 0.2], batch_size=5)
    assert result.clean_accuracy == 0.75 and result.images == 12
    assert result.robust_accuracy[0] == result.clean_accuracy and result.success_rate[0] == 0
    assert all(r <= result.clean_accuracy for r in result.robust_accuracy)
    assert result.robust_accuracy[-1] < result.clean_accuracy
    assert result.robust_accuracy == sorted(result.robust_accuracy, reverse=True)
    summary = result.summary()
    assert summary["clean_accuracy"] == 0.75 and "robust_accuracy_eps_0.0078" in summary
    assert summary["attack_success_rate_eps_0.2000"] == 1 - result.robust_accuracy[-1] / 0.75


def test_figures_do_not_depend_on_the_batch_size(model):
    images, labels = data(model)

    def attack_patch(m, x, y, size, g):
        return patch_attack(m, x, y, size, num_positions=3, steps=3, generator=g)[0]

    for attack, strengths in ((attack_pgd, [0.03, 0.1]), (attack_patch, [2, 3])):
        big = robust_accuracy(model, images, labels, attack, strengths, batch_size=12, seed=3)
        small = robust_accuracy(model, images, labels, attack, strengths, batch_size=5, seed=3)
        assert big == small


class Blind(nn.Module):
    """Logits that ignore the image: a surrogate whose input gradient is 0, so PGD from the image stays there."""

    def __init__(self):
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(4))

    def forward(self, x):
        return self.bias + 0 * x.flatten(1)[:, :1]


def test_transfer_attack_is_crafted_on_the_surrogate_and_scored_on_the_target(model):
    images, labels = data(model)
    white_box = robust_accuracy(model, images, labels, attack_pgd, [0.2])
    assert robust_accuracy(model, images, labels, attack_pgd, [0.2], surrogate=model) == white_box

    def no_start(m, x, y, eps, g):
        return pgd(m, x, y, eps, steps=3, random_start=False)

    assert robust_accuracy(model, images, labels, no_start, [0.2]).robust_accuracy[0] < 0.75
    from_blind = robust_accuracy(model, images, labels, no_start, [0.2], surrogate=Blind())
    assert from_blind.robust_accuracy == [from_blind.clean_accuracy]


def test_figures_from_per_image_outcomes():
    # 4 images: clean right on 3; the attack at the first strength breaks one of them, at the second all three.
    outcomes = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0], [1, 1, 0]], dtype=torch.bool)
    result = Robustness.from_outcomes([0.1, 0.2], outcomes)
    assert result.clean_accuracy == 3 / 4 and result.images == 4
    assert result.robust_accuracy == [2 / 4, 0.0]
    assert result.success_rate == [1 / 3, 3 / 3]


def test_outcomes_are_per_image_and_robust_only_where_clean_right(model):
    images, labels = data(model)
    outcomes = attack_outcomes(model, images, labels, attack_pgd, [0.05, 0.2], batch_size=5)
    assert outcomes.shape == (12, 3) and outcomes.dtype == torch.bool
    assert not (outcomes[:, 1:] & ~outcomes[:, :1]).any()
    with torch.no_grad():
        assert torch.equal(outcomes[:, 0], model(images.float() / 255).argmax(1) == labels)
    assert outcomes[:, 2].sum() < outcomes[:, 0].sum()


def test_worst_case_is_robust_only_where_every_attack_fails(model):
    images, labels = data(model, n=16)

    # Two deterministic "attacks" (an image's result does not depend on its batch) that fool different images.
    def first(m, x, y, strength, g):
        return x * strength

    def second(m, x, y, strength, g):
        return x.flip(-1)

    strengths = [0.3, 0.6]
    alone = [attack_outcomes(model, images, labels, a, strengths) for a in (first, second)]
    together = attack_outcomes(model, images, labels, worst_case(first, second), strengths)
    torch.testing.assert_close(together, alone[0] & alone[1])
    # each fools images the other does not, so the check above tells "both" from "either" or "the last"
    assert (alone[0] & ~alone[1]).any() and (~alone[0] & alone[1]).any()

    randomised = worst_case(attack_pgd, lambda m, x, y, eps, g: apgd(m, x, y, eps, steps=3, loss="dlr", generator=g))
    in_one = attack_outcomes(model, images, labels, randomised, strengths, batch_size=16, seed=2)
    in_threes = attack_outcomes(model, images, labels, randomised, strengths, batch_size=3, seed=2)
    torch.testing.assert_close(in_threes, in_one)
