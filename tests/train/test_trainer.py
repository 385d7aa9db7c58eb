"""End-to-end training on the embedded digits: resume equality, NaN handling, the run folder."""

import json

import pytest
import torch
from safetensors.torch import load_file

from vitkit.errors import VitkitError
from vitkit.train import TrainConfig, Trainer, train


def tiny_config(**overrides) -> TrainConfig:
    # Dropout, stochastic depth, mixup and EMA all draw random numbers: resume must restore every source.
    base = dict(data="digits", model="vit_digits", epochs=3, batch_size=128, lr=2e-3, warmup_epochs=1,
                crop_padding=1, dropout=0.1, drop_path=0.1, mixup=0.2, ema=0.9, device="cpu")
    return TrainConfig(**{**base, **overrides})


@pytest.mark.parametrize(
    "extra",
    [{}, {"ablation": "column", "ablation_size": 2},
     {"adv": "trades", "eps": 0.1, "adv_steps": 1, "adv_step_size": 0.1},
     {"distill": "hard", "teacher": "digits_teacher", "dim": 32, "depth": 2, "heads": 2, "mlp_dim": 64},
     {"patch_dropout": 0.3}, {"patch_dropout": 0.3, "adv": "trades", "eps": 0.1, "adv_steps": 1, "adv_step_size": 0.1},
     {"spt": True, "lsa": True}],
    ids=["whole", "ablated", "trades", "distilled", "patch-dropout", "patch-dropout-trades", "spt-lsa"],
)
def test_resumed_run_ends_with_the_same_weights(tmp_path, monkeypatch, request, extra):
    if "teacher" in extra:  # a fixture's run folder
        extra = {**extra, "teacher": str(request.getfixturevalue(extra["teacher"]))}
    straight = tmp_path / "straight"
    train(tiny_config(**extra), straight, progress=False)

    stopped = tmp_path / "stopped"
    calls = {"n": 0}
    original = Trainer.train_epoch

    def stop_in_second_epoch(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(Trainer, "train_epoch", stop_in_second_epoch)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_config(**extra), stopped, progress=False)
    monkeypatch.setattr(Trainer, "train_epoch", original)
    assert json.loads((stopped / "history.jsonl").read_text().splitlines()[-1])["epoch"] == 1
    train(tiny_config(**extra), stopped, resume=True, progress=False)

    a, b = load_file(straight / "last.safetensors"), load_file(stopped / "last.safetensors")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    history_a = [json.loads(l) for l in (straight / "history.jsonl").read_text().splitlines()]
    history_b = [json.loads(l) for l in (stopped / "history.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in history_a] == [r["train_loss"] for r in history_b]


def test_run_folder_and_summary(tmp_path):
    summary = train(tiny_config(epochs=2, mixup=0.0, ema=0.0), tmp_path, progress=False)
    for name in ("config.json", "last.safetensors", "best.safetensors", "state.pt", "history.jsonl", "curves.png",
                 "summary.json"):
        assert (tmp_path / name).is_file(), name
    saved = json.loads((tmp_path / "summary.json").read_text())
    assert saved == json.loads(json.dumps(summary))
    assert 0.0 <= saved["test_accuracy"] <= 1.0 and 0.0 <= saved["val_accuracy"] <= 1.0
    assert not list(tmp_path.glob(".*tmp"))


def test_nan_loss_stops_with_advice_and_keeps_the_last_good_epoch(tmp_path, monkeypatch):
    trainer = Trainer(tiny_config(epochs=3, mixup=0.0, ema=0.0), tmp_path, progress=False)
    original = trainer.train_epoch
    calls = {"n": 0}

    def poison():
        calls["n"] += 1
        if calls["n"] == 2:
            with torch.no_grad():
                trainer.model.head.weight.fill_(float("nan"))
        return original()

    trainer.train_epoch = poison
    with pytest.raises(VitkitError, match="--lr"):
        trainer.fit()
    weights = load_file(tmp_path / "last.safetensors")
    assert all(torch.isfinite(v).all() for v in weights.values())
    assert len((tmp_path / "history.jsonl").read_text().splitlines()) == 1


def test_fewer_images_than_a_batch_is_a_user_error(tmp_path):
    with pytest.raises(VitkitError, match="batch"):
        Trainer(tiny_config(batch_size=100_000), tmp_path, progress=False)


def test_training_on_ablations_records_the_ablation(tmp_path):
    from vitkit.train import read_info

    summary = train(tiny_config(epochs=1, ablation="row", ablation_size=3, ablation_stride=2), tmp_path, progress=False)
    assert read_info(tmp_path)["ablation"] == {"kind": "row", "size": 3, "image_size": [8, 8], "stride": 2}
    assert "row ablation" in summary["accuracy_measured_on"]


@pytest.mark.parametrize("cpu_bf16", [False, True])
def test_cpu_bf16_trains_in_bfloat16_and_evaluates_in_float32(tmp_path, cpu_bf16):
    trainer = Trainer(tiny_config(epochs=1, ema=0, cpu_bf16=cpu_bf16), tmp_path, progress=False)  # evaluates self.model
    seen = []  # (training?, dtype) of the first block's MLP output at each forward
    trainer.model.blocks[0].mlp.register_forward_hook(lambda m, i, out: seen.append((m.training, out.dtype)))
    trainer.fit()
    assert {dtype for training, dtype in seen if training} == {torch.bfloat16 if cpu_bf16 else torch.float32}
    assert {dtype for training, dtype in seen if not training} == {torch.float32}
    with pytest.raises(VitkitError, match="--cpu-bf16 extends --bf16"):
        tiny_config(bf16=False, cpu_bf16=True)
