"""What the tests of the gradient attacks share: a budget per norm, seeded generators, distances."""

import torch

EPS = {"linf": 8 / 255, "l2": 0.5}


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def distance(a, b, norm):
    """Each image's ℓ∞ or ℓ2 distance (B,)."""
    d = (a - b).flatten(1)
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1)
