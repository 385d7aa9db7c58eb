"""The smoothed classifier: the base model's votes over every ablation of an image.

    g(x) = argmax_c n_c(x),   n_c(x) = #{ablations a : the base model on a(x) votes for c}

Two voting rules:
- "top" (Salman et al.): each ablation votes once, for its top class;
- "threshold" (Levine & Feizi): an ablation votes for every class whose softmax is ≥ θ (possibly none).
Ties of the vote go to the smallest class index (what the certificates assume).

Images come in [0, 1] pixel space, as in `vitkit.attacks`: the classifier normalises them itself, so
the same object is voted on, attacked and certified.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from vitkit.errors import VitkitError
from vitkit.models import VisionTransformer
from vitkit.smoothing.ablation import Ablation, ablated_logits

RULES = ("top", "threshold")
ENCODINGS = ("fill", "levine_feizi")


def levine_feizi_encoding(pixels: Tensor, masks: Tensor) -> Tensor:
    """Levine & Feizi's input for CNN base models: channels (x, 1 − x) where kept and 0 where masked,
    so a masked pixel differs from every real colour. (B, C, H, W) in [0, 1] → (B, 2C, H, W)."""
    kept = masks[:, None].to(pixels.dtype)
    return torch.cat([pixels, 1 - pixels], dim=1) * kept


class SmoothedClassifier(nn.Module):
    """Derandomized smoothing of `base` over every ablation of `ablation`.

    encoding "fill": normalise with mean/std, set masked pixels to `fill` (0: the data mean) and, for a
    vitkit ViT, drop the tokens masked entirely. encoding "levine_feizi": the base model takes the
    (x, 1 − x) encoding of the pixels (2C channels), no normalisation.
    `max_batch` bounds the ablated images per forward (memory); results do not depend on it.
    """

    def __init__(
        self,
        base: nn.Module,
        ablation: Ablation,
        *,
        mean: Sequence[float] = (0.0,),
        std: Sequence[float] = (1.0,),
        fill: float = 0.0,
        rule: str = "top",
        threshold: float = 0.2,
        encoding: str = "fill",
        drop_tokens: bool = True,
        max_batch: int = 4096,
    ):
        super().__init__()
        if rule not in RULES:
            raise VitkitError(f"unknown voting rule {rule!r}: use one of {', '.join(RULES)}")
        if encoding not in ENCODINGS:
            raise VitkitError(f"unknown encoding {encoding!r}: use one of {', '.join(ENCODINGS)}")
        if max_batch < 1:
            raise VitkitError(f"max batch {max_batch} is not positive: pass e.g. --max-batch 4096")
        if rule == "threshold" and not 0 < threshold <= 1:
            raise VitkitError(f"voting threshold {threshold} must lie in (0, 1]: Levine & Feizi use 0.2 to 0.3")
        self.base = base
        self.ablation = ablation
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32)[:, None, None], persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32)[:, None, None], persistent=False)
        self.fill = fill
        self.rule = rule
        self.threshold = threshold
        self.encoding = encoding
        # Token dropping needs a vitkit ViT (the `keep=` forward; torch.compile wraps it as `_orig_mod`) and
        # the fill encoding; any other base model sees whole masked images.
        vit = getattr(base, "_orig_mod", base)
        can_drop = drop_tokens and isinstance(vit, VisionTransformer) and encoding == "fill"
        self.patch_size = vit.cfg.patch_size if can_drop else None
        self.max_batch = max_batch

    @property
    def num_ablations(self) -> int:
        return self.ablation.num_ablations

    def _chunks(self, batch: int) -> list[tuple[Tensor, Tensor]]:
        """(image index, ablation index) pairs of a batch, cut into pieces of at most `max_batch`. Pairs are
        ordered ablation-major, so a piece holds few distinct token counts."""
        A = self.num_ablations
        pairs = torch.cartesian_prod(torch.arange(A), torch.arange(batch)).flip(1)  # (A·B, 2): (image, ablation)
        return list(pairs.split(self.max_batch))

    def ablation_logits(self, x: Tensor) -> Tensor:
        """(B, A, classes) logits of the base model on every ablation of every image x (B, C, H, W) in [0, 1]."""
        if x.shape[-2:] != torch.Size(self.ablation.image_size):
            raise VitkitError(
                f"images of {tuple(x.shape[-2:])} pixels do not match the ablation's {self.ablation.image_size}: "
                "resize them or build the ablation for their size"
            )
        positions = self.ablation.positions(x.device)
        inputs = x if self.encoding == "levine_feizi" else self.normalize(x)
        B, A = len(x), len(positions)
        out = None
        for pairs in self._chunks(B):
            image, abl = pairs[:, 0].to(x.device), pairs[:, 1].to(x.device)
            masks = self.ablation.masks(positions[abl])
            if self.encoding == "levine_feizi":
                logits = self.base(levine_feizi_encoding(inputs[image], masks))
            else:
                logits = ablated_logits(self.base, inputs[image], masks, fill=self.fill, patch_size=self.patch_size)
            if out is None:
                out = logits.new_empty(B, A, logits.shape[-1])
            out[image, abl] = logits
        return out

    def normalize(self, x: Tensor) -> Tensor:
        # The statistics follow the images: the classifier need not be moved with .to(device).
        return (x - self.mean.to(x.device)) / self.std.to(x.device)

    def clean_logits(self, x: Tensor) -> Tensor:
        """The base model on the whole, unablated image, in the classifier's encoding ("standard accuracy")."""
        if self.encoding == "levine_feizi":
            return self.base(levine_feizi_encoding(x, torch.ones_like(x[:, 0], dtype=torch.bool)))
        return self.base(self.normalize(x))

    def votes_from_logits(self, logits: Tensor) -> Tensor:
        """(B, classes) int64 vote counts from (B, A, classes) ablation logits."""
        B, A, C = logits.shape
        if self.rule == "top":  # a scatter, not a (B, A, C) one-hot: cheap with a thousand classes
            top = logits.argmax(-1)
            return torch.zeros(B, C, dtype=torch.long, device=logits.device).scatter_add_(1, top, torch.ones_like(top))
        return (logits.float().softmax(-1) >= self.threshold).sum(1)

    @torch.no_grad()
    def votes(self, x: Tensor) -> Tensor:
        """n_c(x): (B, classes) int64 vote counts. The base model runs in eval mode (restored after)."""
        was_training = self.base.training
        self.base.eval()
        try:
            return self.votes_from_logits(self.ablation_logits(x))
        finally:
            self.base.train(was_training)

    def predict(self, x: Tensor) -> Tensor:
        """g(x): the class with the most votes, ties to the smallest index."""
        return self.votes(x).argmax(1)  # argmax returns the first of equal maxima

    def forward(self, x: Tensor) -> Tensor:
        """A differentiable stand-in for the vote, for attacks: log of the mean softmax over the ablations.
        (The vote itself has no gradient.) Runs the base model in its current mode, as `ablation_logits`
        does: the attacks of vitkit.attacks switch to eval mode themselves."""
        probs = self.ablation_logits(x).float().softmax(-1).mean(1)
        return probs.clamp_min(1e-12).log()
