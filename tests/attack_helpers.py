"""What the attack tests share: a budget per norm, seeded generators, distances, a linear model."""

import torch
from torch import nn

EPS = {"linf": 8 / 255, "l2": 0.5}


def seeded(seed=0):
    return torch.Generator().manual_seed(seed)


def distance(a, b, norm):
    """Each image's ℓ∞ or ℓ2 distance (B,)."""
    d = (a - b).flatten(1)
    return d.abs().amax(1) if norm == "linf" else d.norm(dim=1)


class BinaryLinear(nn.Module):
    """Logits (0, w·x + b): for true class 0 the loss log(1 + exp(w·x + b)) only grows with w·x, and the
    margin z_0 − z_1 = −(w·x + b) only falls."""

    def __init__(self, w: torch.Tensor, bias: float = 0.1):
        super().__init__()
        self.w = nn.Parameter(w)
        self.bias = bias

    def forward(self, x):
        z = x.flatten(1) @ self.w + self.bias
        return torch.stack([torch.zeros_like(z), z], dim=1)


def unfoolable_linear(seed=0):
    """A linear model whose class 0 no ε-ball can change (bias −100), so the search runs to its end, and
    images inside the box's edges and near them."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(3 * 4 * 4, generator=g, dtype=torch.float64)
    x = torch.rand(5, 3, 4, 4, generator=g, dtype=torch.float64)
    x[:, 0, 0] = 0.01  # near an edge: the optimum is clipped there
    return BinaryLinear(w, bias=-100.0), x, torch.zeros(5, dtype=torch.long)


class Counting(nn.Module):
    """Counts the images it is queried on."""

    def __init__(self, model):
        super().__init__()
        self.model, self.images = model, 0

    def forward(self, x):
        self.images += len(x)
        return self.model(x)


class Staircase(nn.Module):
    """A linear model on pixels rounded to 8 levels: its input gradient is 0 almost everywhere (gradient
    masking), yet an ε of one level moves it."""

    def __init__(self, w):
        super().__init__()
        self.linear = BinaryLinear(w, bias=0.0)

    def forward(self, x):
        return self.linear(torch.round(x * 8) / 8)
