"""Adversarial training: the batch the trainer sees, and a run end to end."""

import json

import pytest
import torch

from conftest import tiny_vit
from vitkit.attacks import Adversary
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


def test_adversarial_training_runs_and_is_saved(tmp_path):
    cfg = TrainConfig(data="digits", model="vit_digits", epochs=1, batch_size=128, lr=2e-3, warmup_epochs=0,
                      adv="pgd", eps=0.1, adv_steps=2, adv_step_size=0.05, adv_mix=0.0, device="cpu")
    summary = train(cfg, tmp_path, progress=False)
    assert 0 <= summary["test_accuracy"] <= 1
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["adv"] == "pgd" and saved["eps"] == 0.1 and saved["adv_mix"] == 0.0


@pytest.mark.parametrize(
    "options,message",
    [(dict(adv="cw"), "unknown adversarial attack"), (dict(adv="pgd", adv_mix=1.0), "--adv-mix"),
     (dict(adv="pgd", eps=0.0), "--eps"), (dict(adv_norm="l1"), "--adv-norm")],
)
def test_bad_adversarial_options_are_explained(options, message):
    with pytest.raises(VitkitError, match=message):
        TrainConfig(**options)
