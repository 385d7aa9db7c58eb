"""PatchDropout training (`--patch-dropout`): what the training and the evaluation forward see, one step by hand,
the p = 0 identity, the config errors, and that it learns."""

import copy
import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from vitkit.errors import VitkitError
from vitkit.train import TrainConfig, Trainer, train
from vitkit.train.optim import build_optimizer
from vitkit.train.patch_dropout import PatchDropped, kept_count, random_keep

# The digits are 8×8 images; vit_digits cuts them into 2×2 patches: N = 16 tokens.
N = 16


def tiny_config(**overrides) -> TrainConfig:
    base = dict(data="digits", model="vit_digits", dim=32, depth=1, heads=2, mlp_dim=64, epochs=1, batch_size=128,
                lr=2e-3, warmup_epochs=0, schedule="constant", device="cpu", patch_dropout=0.3)
    return TrainConfig(**{**base, **overrides})


def record_calls(model: torch.nn.Module) -> list[tuple[bool, torch.Tensor | None]]:
    """Replaces the model's forward by one that logs (training?, keep) of every call, then runs the original."""
    calls = []
    original = model.forward

    def forward(x, keep=None, **kwargs):
        calls.append((model.training, None if keep is None else keep.clone()))
        return original(x, keep=keep, **kwargs)

    model.forward = forward
    return calls


class OneBatch:
    """Stands in for the trainer's loader: one fixed batch per epoch (a single optimiser step)."""

    def __init__(self, x, y):
        self.batch = (x, y)

    def set_epoch(self, epoch):
        pass

    def __len__(self):
        return 1

    def __iter__(self):
        yield self.batch


def test_kept_count_follows_the_formula():
    assert kept_count(64, 0.0) == 64
    assert kept_count(64, 0.25) == 48
    assert kept_count(64, 0.5) == 32
    assert kept_count(16, 0.3) == 11  # round(11.2)
    assert kept_count(16, 0.99) == 1  # round(0.16) = 0, but one patch always stays


def test_random_keep_is_a_uniform_subset_per_row():
    keep = random_keep(20_000, N, 11, torch.Generator().manual_seed(0))
    assert keep.shape == (20_000, 11) and keep.dtype == torch.int64
    assert (keep.diff(dim=1) > 0).all()  # ascending, hence no repeats
    assert keep.min() >= 0 and keep.max() < N
    # Each patch is kept with probability K/N (binomial std ≈ 0.0033 here).
    share = torch.bincount(keep.flatten(), minlength=N) / 20_000
    assert torch.allclose(share, torch.full((N,), 11 / N), atol=0.02)


def test_masks_depend_on_seed_epoch_and_rank_only():
    def draw(seed=0, epoch=0, rank=0):
        pd = PatchDropped(lambda x, **kw: x, N, 0.5, seed=seed, rank=rank)
        pd.set_epoch(epoch)
        return torch.cat([pd.resample(4), pd.resample(4)])

    assert torch.equal(draw(), draw())
    assert not torch.equal(draw(), draw(seed=1))
    assert not torch.equal(draw(), draw(epoch=1))
    assert not torch.equal(draw(), draw(rank=1))  # DDP ranks drop different tokens


def test_training_forward_keeps_a_random_subset_and_evaluation_sees_all_tokens(tmp_path):
    trainer = Trainer(tiny_config(), tmp_path, progress=False)
    calls = record_calls(trainer.model)
    trainer.fit()
    train_calls = [keep for training, keep in calls if training]
    eval_calls = [keep for training, keep in calls if not training]
    assert len(train_calls) == len(trainer.train_loader) and eval_calls
    assert all(keep is None for keep in eval_calls)  # validation and test: every token
    for keep in train_calls:
        assert keep.shape == (128, 11)  # K = round(0.7 · 16)
        assert (keep.diff(dim=1) > 0).all() and keep.min() >= 0 and keep.max() < N
        assert len(keep.unique(dim=0)) > 100  # C(16, 11) = 4368 subsets: the rows differ
    assert not torch.equal(train_calls[0], train_calls[1])  # a new draw every step


def test_a_training_step_is_the_cross_entropy_of_the_kept_tokens(tmp_path):
    cfg = tiny_config(label_smoothing=0.1)
    trainer = Trainer(cfg, tmp_path, progress=False)
    trainer.train_loader.set_epoch(0)
    x, y = next(iter(trainer.train_loader))
    trainer.train_loader = OneBatch(x, y)
    by_hand = copy.deepcopy(trainer.model)
    calls = record_calls(trainer.model)

    row = trainer.train_epoch()
    (training, keep), = calls
    assert training and keep.shape == (128, 11)

    # The same step by hand, on the recorded indices.
    optimizer = build_optimizer(by_hand, cfg, torch.device("cpu"))
    by_hand.train()
    loss = F.cross_entropy(by_hand(x, keep=keep), y, label_smoothing=0.1)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    assert math.isclose(row["train_loss"], loss.item(), rel_tol=1e-6)
    whole = F.cross_entropy(by_hand(x), y, label_smoothing=0.1)  # not what was trained on
    assert not math.isclose(row["train_loss"], whole.item(), rel_tol=1e-3)
    for (name, a), b in zip(trainer.model.state_dict().items(), by_hand.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_trades_forwards_share_the_steps_draw_and_the_attack_sees_whole_images(tmp_path):
    trainer = Trainer(tiny_config(adv="trades", eps=0.1, adv_steps=1, adv_step_size=0.1), tmp_path, progress=False)
    trainer.train_loader.set_epoch(0)
    trainer.train_loader = OneBatch(*next(iter(trainer.train_loader)))
    calls = record_calls(trainer.model)
    trainer.train_epoch()
    kept = [keep for _, keep in calls if keep is not None]
    assert len(kept) == 2 and torch.equal(kept[0], kept[1])  # the clean and the adversarial forward
    assert any(keep is None for _, keep in calls)  # TRADES's attack, on the whole-image model


def test_zero_is_off_bit_for_bit(tmp_path):
    off = train(tiny_config(patch_dropout=0.0, mixup=0.2), tmp_path / "zero", progress=False)
    unset = TrainConfig(**{**tiny_config(mixup=0.2).to_dict(), "patch_dropout": TrainConfig.patch_dropout})
    assert unset.patch_dropout == 0.0
    train(unset, tmp_path / "unset", progress=False)
    a, b = load_file(tmp_path / "zero" / "last.safetensors"), load_file(tmp_path / "unset" / "last.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert off["test_accuracy"] == json.loads((tmp_path / "unset" / "summary.json").read_text())["test_accuracy"]
    # A share so small that K = N drops nothing: no wrapper, no draws.
    assert Trainer(tiny_config(patch_dropout=0.01), tmp_path / "tiny", progress=False).patch_dropout is None


@pytest.mark.parametrize("overrides, words", [
    ({"model": "resnet18", "dim": None, "depth": None, "heads": None, "mlp_dim": None}, "resnet18"),
    ({"ablation": "column", "ablation_size": 2}, "--ablation"),
    ({"patch_dropout": 1.0}, r"\[0, 1\)"),
    ({"patch_dropout": -0.1}, r"\[0, 1\)"),
    ({"patch_dropout": float("nan")}, r"\[0, 1\)"),
])
def test_config_errors_name_the_flag(overrides, words):
    with pytest.raises(VitkitError, match=r"--patch-dropout") as error:
        tiny_config(**overrides)
    assert error.match(words)


def test_a_vit_learns_the_digits_with_half_its_tokens_dropped(tmp_path):
    summary = train(tiny_config(dim=48, depth=2, heads=4, mlp_dim=96, epochs=25, batch_size=64, lr=3e-3,
                                warmup_epochs=1, schedule="cosine", patch_dropout=0.5), tmp_path, progress=False)
    assert summary["test_accuracy"] > 0.6  # chance: 0.1; measured 0.84 (seeds 1, 2: 0.69, 0.75), in about 3 s
