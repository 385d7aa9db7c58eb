"""Certified patch robustness by derandomized smoothing: ablations, the smoothed classifier, certificates."""

from vitkit.smoothing.ablation import KINDS, Ablation, RandomlyAblated, ablated_logits, token_masks
from vitkit.smoothing.certify import (
    TIE_RULES,
    Votes,
    certification_report,
    certify,
    collect_votes,
    empirical_patch_robustness,
    largest_certified_patch,
    parse_patch_sizes,
)
from vitkit.smoothing.smoothed import ENCODINGS, RULES, SmoothedClassifier, levine_feizi_encoding

__all__ = [
    "ENCODINGS",
    "KINDS",
    "RULES",
    "TIE_RULES",
    "Ablation",
    "RandomlyAblated",
    "SmoothedClassifier",
    "Votes",
    "ablated_logits",
    "certification_report",
    "certify",
    "collect_votes",
    "empirical_patch_robustness",
    "largest_certified_patch",
    "levine_feizi_encoding",
    "parse_patch_sizes",
    "token_masks",
]
