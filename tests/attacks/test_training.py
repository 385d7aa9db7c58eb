"""Adversarial training: the batch the trainer sees, FAT's early-stopped PGD, TRADES's attack and loss, and runs
end to end."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_vit
from vitkit.attacks import Adversary, PixelModel, Trades, kl_divergence, pgd, project, trades_example
from vitkit.attacks.noise import draw_seed, image_keys, normal
from vitkit.errors import VitkitError
from vitkit.train import TrainConfig, train

MEAN, STD = (0.5, 0.4, 0.3), (0.25, 0.2, 0.3)


@pytest.mark.parametrize("attack,norm,eps", [("pgd", "linf", 8 / 255), ("fgsm", "linf", 8 / 255), ("pgd", "l2", 0.5)])
def test_adversary_keeps_the_clean_share_and_bounds_the_rest(attack, norm, eps):
    model = tiny_vit().train()
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    pixels = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    x = (pixels - mean) / std
    soft = torch.softmax(torch.randn(8, 4), 1)  # mixup's soft targets are accepted too
    adversary = Adversary(model, MEAN, STD, attack=attack, eps=eps, steps=3, step_size=eps / 2, norm=norm, mix=0.25)
    mixed = adversary(x, soft)
    assert model.training
    assert torch.equal(mixed[:2], x[:2])
    delta = (mixed[2:] * std + mean - pixels[2:]).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all() and (size > eps / 2).all()
    assert ((mixed * std + mean) >= -1e-6).all() and ((mixed * std + mean) <= 1 + 1e-6).all()


@pytest.mark.parametrize("tau", [0, 1, 2])
def test_fat_stops_each_image_at_its_tau_plus_first_misclassified_iterate(tau):
    # Brute force: without a random start PGD is deterministic, so iterate t is PGD with t steps (0: the image).
    # FAT keeps the iterate where an image is found wrong for the (τ+1)-th time, else the last one.
    model = PixelModel(tiny_vit(), MEAN, STD)
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(16, 3, 8, 8, generator=g), torch.randint(0, 4, (16,), generator=g)
    steps, eps = 6, 16 / 255
    iterates = [x] + [pgd(model, x, y, eps, steps=t, step_size=eps / 3, random_start=False) for t in range(1, steps + 1)]
    with torch.no_grad():
        wrong = torch.stack([model(it).argmax(1) != y for it in iterates[:-1]])  # (steps, B): checked before each step
    expected = iterates[-1].clone()
    for i in range(len(y)):
        times = wrong[:, i].nonzero()[:, 0]
        if len(times) > tau:
            expected[i] = iterates[int(times[tau])][i]
    found = pgd(model, x, y, eps, steps=steps, step_size=eps / 3, random_start=False, early_stop=tau)
    torch.testing.assert_close(found, expected, rtol=0, atol=1e-6)
    stopped = [i for i in range(len(y)) if wrong[:, i].sum() > tau]
    assert 0 < len(stopped) < len(y)  # some images stop early and some run to the end: the test tells them apart
    # Training with --fat-tau: the Adversary's batch is this attack (with PGD's random start).
    adversary = Adversary(model.model, MEAN, STD, steps=steps, step_size=eps / 3, eps=eps, mix=0.0, early_stop=tau)
    torch.manual_seed(7)
    batch = adversary(model.normalize(x), y)
    torch.manual_seed(7)
    direct = pgd(model, model.to_pixels(model.normalize(x)), y, eps, steps=steps, step_size=eps / 3, early_stop=tau)
    torch.testing.assert_close(batch, model.normalize(direct), rtol=0, atol=1e-6)


def test_adversarial_training_runs_and_is_saved(tmp_path):
    cfg = TrainConfig(data="digits", model="vit_digits", epochs=1, batch_size=128, lr=2e-3, warmup_epochs=0,
                      adv="pgd", eps=0.1, adv_steps=2, adv_step_size=0.05, adv_mix=0.0, device="cpu")
    summary = train(cfg, tmp_path, progress=False)
    assert 0 <= summary["test_accuracy"] <= 1
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["adv"] == "pgd" and saved["eps"] == 0.1 and saved["adv_mix"] == 0.0


@pytest.mark.parametrize("norm,eps", [("linf", 8 / 255), ("l2", 0.5)])
def test_trades_example_stays_in_the_ball_and_the_box(model, batch, norm, eps):
    pixels, _ = batch
    model.train()
    adversarial = trades_example(model, pixels, eps, steps=3, step_size=eps / 2, norm=norm)
    assert model.training and model.model.training
    delta = (adversarial - pixels).flatten(1)
    size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
    assert (size <= eps + 1e-5).all() and (size > eps / 2).all()  # well beyond the 0.001 start
    assert adversarial.min() >= 0 and adversarial.max() <= 1


def test_trades_attack_raises_the_kl_over_its_start(model, batch):
    pixels, _ = batch
    eps = 8 / 255
    adversarial = trades_example(model, pixels, eps, steps=5, step_size=2 / 255,
                                 generator=torch.Generator().manual_seed(3))
    # The same start, rebuilt from the same seed: x + 0.001·N(0, I) keyed by image.
    noise = normal(image_keys(pixels, draw_seed(torch.Generator().manual_seed(3))), 0, tuple(pixels.shape[1:]))
    start = project(pixels + 0.001 * noise, pixels, eps, "linf")
    # Measured in float64: the KL at the start (~1e-8) is below float32's rounding of the logits.
    exact = copy.deepcopy(model).double()
    with torch.no_grad():
        target = exact(pixels.double()).softmax(1)
        at_start = kl_divergence(exact(start.double()), target)
        at_end = kl_divergence(exact(adversarial.double()), target)
    assert (at_start > 0).all() and (at_end > 100 * at_start).all()


def test_trades_loss_is_cross_entropy_plus_beta_kl(batch):
    pixels, labels = batch
    vit = tiny_vit().train()
    mean, std = torch.tensor(MEAN)[:, None, None], torch.tensor(STD)[:, None, None]
    x = (pixels - mean) / std
    soft = 0.7 * F.one_hot(labels, 4) + 0.3 * F.one_hot(labels.roll(1), 4)  # mixup's soft targets
    logits = vit(x).detach().requires_grad_(True)
    trades = Trades(vit, MEAN, STD, beta=6.0, eps=8 / 255, steps=2, step_size=4 / 255)
    torch.manual_seed(5)
    loss = F.cross_entropy(logits, soft) + trades.loss(vit, x, logits)  # as the trainer adds them

    torch.manual_seed(5)  # the same start: its seed comes from torch's global generator
    adversarial = trades_example(PixelModel(vit, MEAN, STD), pixels, 8 / 255, steps=2, step_size=4 / 255)
    p, q = logits.softmax(1), vit((adversarial - mean) / std).softmax(1)
    by_hand = -(soft * logits.log_softmax(1)).sum(1).mean() + 6.0 * (p * (p.log() - q.log())).sum(1).mean()
    assert torch.allclose(loss, by_hand, atol=1e-5)
    assert vit.training
    # The KL term is differentiated through the clean side too (as in Zhang et al.'s code).
    (grad,) = torch.autograd.grad(trades.loss(vit, x, logits), logits)
    assert grad.abs().sum() > 0


def test_trades_training_runs_and_is_saved(tmp_path):
    cfg = TrainConfig(data="digits", model="vit_digits", epochs=1, batch_size=128, lr=2e-3, warmup_epochs=0,
                      mixup=0.2, label_smoothing=0.1, adv="trades", eps=0.1, adv_steps=2, adv_step_size=0.05,
                      trades_beta=3.0, device="cpu")
    summary = train(cfg, tmp_path, progress=False)
    assert 0 <= summary["test_accuracy"] <= 1
    assert (tmp_path / "best.safetensors").is_file()
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["adv"] == "trades" and saved["trades_beta"] == 3.0


@pytest.mark.parametrize(
    "options,message",
    [(dict(adv="cw"), "unknown adversarial attack"), (dict(adv="pgd", adv_mix=1.0), "--adv-mix"),
     (dict(adv="pgd", eps=0.0), "--eps"), (dict(adv_norm="l1"), "--adv-norm"),
     (dict(adv="trades", adv_mix=0.0), "--adv-mix does not apply to --adv trades"),
     (dict(adv="trades", trades_beta=-1.0), "--trades-beta"), (dict(adv="trades", fat_tau=1), "--fat-tau"),
     (dict(adv="pgd", fat_tau=-1), "--fat-tau")],
)
def test_bad_adversarial_options_are_explained(options, message):
    with pytest.raises(VitkitError, match=message):
        TrainConfig(**options)
