"""Certificates against brute force: every way an adversary can re-vote Δ ablations."""

import itertools
import random

import pytest
import torch

from vitkit.errors import VitkitError
from vitkit.smoothing import Ablation, Votes, certification_report, certify, largest_certified_patch, parse_patch_sizes


def winner(counts):
    """argmax with ties to the smallest class index, written plainly."""
    best = 0
    for c in range(1, len(counts)):
        if counts[c] > counts[best]:
            best = c
    return best


def counts_of(ballots, classes):
    counts = [0] * classes
    for ballot in ballots:
        for c in ballot:
            counts[c] += 1
    return counts


def can_flip(ballots, classes, delta, choices):
    """True if re-casting the ballots of some ≤ Δ ablations (each to any of `choices`) changes the winner."""
    before = winner(counts_of(ballots, classes))
    for changed in itertools.combinations(range(len(ballots)), min(delta, len(ballots))):
        for new in itertools.product(choices, repeat=len(changed)):
            trial = list(ballots)
            for i, ballot in zip(changed, new):
                trial[i] = ballot
            if winner(counts_of(trial, classes)) != before:
                return True
    return False


def random_cases(rule, n, seed):
    rng = random.Random(seed)
    classes = 3
    subsets = [tuple(c for c in range(classes) if mask >> c & 1) for mask in range(2**classes)]
    for _ in range(n):
        A = rng.randint(2, 7)
        if rule == "top":  # one vote per ablation, skewed so that certified cases occur
            favourite = rng.randrange(classes)
            ballots = [(favourite,) if rng.random() < 0.7 else (rng.randrange(classes),) for _ in range(A)]
            choices = [(c,) for c in range(classes)]
        else:  # threshold: any subset of the classes, possibly none
            ballots = [rng.choice(subsets) for _ in range(A)]
            choices = subsets
        yield ballots, classes, rng.randint(0, 2), choices


@pytest.mark.parametrize("rule", ["top", "threshold"])
def test_levine_feizi_certificate_is_exact(rule):
    """certified ⇔ no re-vote of Δ ablations changes the prediction (so the rule is sound and tight)."""
    seen = {True: 0, False: 0}
    for ballots, classes, delta, choices in random_cases(rule, 400, seed=1):
        counts = torch.tensor([counts_of(ballots, classes)])
        pred, certified = certify(counts, delta, "levine_feizi")
        assert pred.item() == winner(counts[0].tolist())
        robust = not can_flip(ballots, classes, delta, choices)
        assert certified.item() == robust, (ballots, delta)
        seen[robust] += 1
    assert min(seen.values()) > 20  # both outcomes were exercised


@pytest.mark.parametrize("rule", ["top", "threshold"])
def test_salman_certificate_is_sound_and_only_stricter_at_ties(rule):
    for ballots, classes, delta, choices in random_cases(rule, 400, seed=2):
        counts = counts_of(ballots, classes)
        pred, certified = certify(torch.tensor([counts]), delta, "salman")
        robust = not can_flip(ballots, classes, delta, choices)
        if certified.item():
            assert robust
        elif robust:  # uncertified yet robust: only an exact tie that the smaller index wins
            c = pred.item()
            runner_up = max(counts[k] for k in range(classes) if k != c)
            assert counts[c] == runner_up + 2 * delta


def test_certify_many_deltas_at_once_nests():
    counts = torch.randint(0, 20, (200, 10))
    deltas = torch.arange(0, 6)
    _, certified = certify(counts, deltas)
    for k, d in enumerate(deltas.tolist()):
        assert torch.equal(certified[:, k], certify(counts, d)[1])
    assert (certified[:, 1:] <= certified[:, :-1]).all()  # a larger Δ never certifies more


def test_ties_go_to_the_smallest_class():
    pred, certified = certify(torch.tensor([[3, 5, 5], [0, 0, 0]]), 0)
    assert pred.tolist() == [1, 0]
    assert certified.tolist() == [False, False]  # a tie is not a strict majority
    _, lf = certify(torch.tensor([[3, 5, 5]]), 0, "levine_feizi")
    assert lf.tolist() == [True]  # class 1 keeps a tie against class 2


def make_votes(counts, labels, base, ablation):
    return Votes(torch.tensor(counts), torch.tensor(labels), torch.tensor(base), ablation, {"classes": ["a", "b", "c"]})


def test_report_against_a_plain_computation(tmp_path):
    ablation = Ablation("column", 4, (32, 32))  # 32 ablations
    counts = [[32, 0, 0], [20, 12, 0], [17, 15, 0], [2, 30, 0], [0, 10, 22]]
    labels, base = [0, 0, 0, 1, 1], [0, 0, 1, 1, 2]
    votes = make_votes(counts, labels, base, ablation)
    report = certification_report(votes, [1, 2, 3, 5], main_size=5)
    assert report["standard_accuracy"] == pytest.approx(3 / 5)
    assert report["smoothed_accuracy"] == pytest.approx(4 / 5)  # the last image votes class 2
    for m in (1, 2, 3, 5):
        delta = m + 3  # ⌈(m + b − 1)/1⌉
        expected = sum(
            winner(c) == y and c[winner(c)] > max(v for k, v in enumerate(c) if k != winner(c)) + 2 * delta
            for c, y in zip(counts, labels)
        ) / 5
        assert report[f"certified_accuracy_{m}x{m}"] == pytest.approx(expected)
    assert report["certified_accuracy"] == report["certified_accuracy_5x5"] == pytest.approx(2 / 5)
    assert report["correct_vote_fraction"] == pytest.approx((32 + 20 + 17 + 30 + 10) / (5 * 32))
    # Per image, the prediction's certificate whether right or wrong: the last one (22 vs 10) holds for Δ ≤ 6, m ≤ 2.
    assert largest_certified_patch(votes, 10).tolist() == [10, 0, 0, 10, 2]
    # The votes file holds everything the report needs.
    votes.save(tmp_path / "votes.safetensors")
    again = Votes.load(tmp_path / "votes.safetensors")
    assert again.ablation == ablation and certification_report(again, [1, 2, 3, 5], 5) == report


def test_votes_file_errors_are_clear(tmp_path):
    (tmp_path / "bad.safetensors").write_bytes(b"not a file")
    with pytest.raises(VitkitError, match="not a votes file"):
        Votes.load(tmp_path / "bad.safetensors")


def test_patch_sizes_parse():
    assert parse_patch_sizes("1-4") == [1, 2, 3, 4]
    assert parse_patch_sizes("5,2,2-3") == [2, 3, 5]
    with pytest.raises(VitkitError, match="patch sizes"):
        parse_patch_sizes("five")
