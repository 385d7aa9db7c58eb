"""The certificate in practice: a patch attack on trained digits models.

The undefended model loses many predictions to a 1×1 patch (a single pixel of any value); the smoothed
model keeps every prediction it certified, attacked through the differentiable mean of its ablations'
softmax at many positions per image.
"""

import pytest
import torch

from vitkit.attacks.patch import patch_attack
from vitkit.attacks.pixel import PixelModel
from vitkit.data import load_dataset
from vitkit.smoothing import Ablation, SmoothedClassifier, certify
from vitkit.train import build_config, load_model, train

SMALL = {"device": "cpu", "epochs": 20, "dim": 64, "depth": 3, "mlp_dim": 128}


@pytest.fixture(scope="module")
def digits():
    data = load_dataset("digits", "test")
    return data.images.float() / 255, data.labels


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    runs = {}
    for name, extra in (("standard", {}), ("ablated", {"ablation": "column", "ablation_size": 2})):
        out = tmp_path_factory.mktemp(name)
        train(build_config("digits", None, {**SMALL, **extra}), out, progress=False)
        runs[name] = load_model(out)
    return runs


@pytest.mark.slow
def test_patch_attack_flips_the_undefended_model(models, digits):
    x, y = digits
    model, info = models["standard"]
    pixel_model = PixelModel(model, info["mean"], info["std"])
    with torch.no_grad():
        clean = pixel_model(x).argmax(1) == y
    adversarial, _ = patch_attack(pixel_model, x, y, 1, num_positions=8, steps=20, step_size=0.1,
                                  generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        robust = pixel_model(adversarial).argmax(1) == y
    assert clean.float().mean() > 0.85
    assert (clean & ~robust).sum() > 0.2 * clean.sum()  # one pixel flips over a fifth of the right answers


@pytest.mark.slow
def test_patch_attack_never_changes_a_certified_prediction(models, digits):
    x, y = digits
    model, info = models["ablated"]
    ablation = Ablation("column", 2, (8, 8))
    smoothed = SmoothedClassifier(model, ablation, mean=info["mean"], std=info["std"])
    pred, certified = certify(smoothed.votes(x), ablation.delta(1))
    assert certified.sum() >= 20, "too few certified images for a meaningful check"
    chosen = certified.nonzero().flatten()
    for attempt in range(2):  # two rounds of 16 random positions and random starts
        adversarial, _ = patch_attack(smoothed, x[chosen], pred[chosen], 1, num_positions=16, steps=20,
                                      step_size=0.1, generator=torch.Generator().manual_seed(attempt))
        assert torch.equal(smoothed.predict(adversarial), pred[chosen])
