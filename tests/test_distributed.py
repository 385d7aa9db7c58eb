"""torchrun with two CPU processes (Gloo) against one process: training, resume across process counts,
evaluation, certification and attacks give the same results."""

import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file
from synthetic_boxes import write_yolo

from vitkit.cli.main import main
from vitkit.smoothing import Votes

# No augmentation, dropout or mixup: with them each rank would draw its own random numbers.
TINY = ["--data", "digits", "--dim", "32", "--depth", "1", "--heads", "2", "--mlp-dim", "64", "--epochs", "3",
        "--batch-size", "64", "--lr", "1e-2", "--warmup-epochs", "0", "--dropout", "0", "--drop-path", "0",
        "--device", "cpu", "--quiet"]


def torchrun(*args: str) -> None:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
               "-m", "vitkit", *args]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


def assert_same_weights(a, b) -> None:
    """Equal up to float rounding (gradients summed in another order, amplified by AdamW's division by the
    gradient's root mean square; about 6e-4 here). Unreduced gradients would differ by about lr = 1e-2 a step."""
    a, b = load_file(a), load_file(b)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=5e-3, atol=5e-3, msg=k)


def history(run) -> list[dict]:
    return [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same training in one process and in two."""
    root = tmp_path_factory.mktemp("ddp")
    assert main(["train", *TINY, "--out", str(root / "one")]) == 0
    torchrun("train", *TINY, "--out", str(root / "two"))
    return root / "one", root / "two"


def test_two_processes_train_as_one(runs):
    one, two = runs
    assert_same_weights(one / "last.safetensors", two / "last.safetensors")
    for a, b in zip(history(one), history(two), strict=True):
        assert a["train_accuracy"] == pytest.approx(b["train_accuracy"], abs=0.01)
        assert a["val_accuracy"] == pytest.approx(b["val_accuracy"], abs=0.01)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
    assert json.loads((two / "summary.json").read_text())["processes"] == 2
    assert json.loads((two / "config.json").read_text()) == json.loads((one / "config.json").read_text())


def test_resume_with_another_number_of_processes(runs, tmp_path):
    """A finished run extended by one epoch: the 1-process run in 2 processes and the 2-process run in 1."""
    one, two = runs
    for source, name in ((one, "one_in_two"), (two, "two_in_one")):
        shutil.copytree(source, tmp_path / name)
        config = json.loads((tmp_path / name / "config.json").read_text())
        (tmp_path / name / "config.json").write_text(json.dumps({**config, "epochs": 4}))
    torchrun("train", "--resume", str(tmp_path / "one_in_two"), "--quiet")
    assert main(["train", "--resume", str(tmp_path / "two_in_one"), "--quiet"]) == 0
    assert_same_weights(tmp_path / "one_in_two" / "last.safetensors", tmp_path / "two_in_one" / "last.safetensors")
    assert [r["epoch"] for r in history(tmp_path / "two_in_one")] == [1, 2, 3, 4]
    assert history(tmp_path / "one_in_two")[:3] == history(one)


def test_eval_and_certify_in_two_processes_match_one(runs, tmp_path):
    checkpoint = str(runs[0] / "best.safetensors")
    # 37 images: shares of 18 and 19, so the gather must not pad or reorder.
    certify = ["certify", checkpoint, "--num-images", "37", "--batch-size", "8", "--device", "cpu", "--quiet"]
    assert main([*certify, "--out", str(tmp_path / "certify1")]) == 0
    torchrun(*certify, "--out", str(tmp_path / "certify2"))
    eval_ = ["eval", checkpoint, "--batch-size", "100", "--device", "cpu"]
    assert main([*eval_, "--out", str(tmp_path / "eval1")]) == 0
    torchrun(*eval_, "--out", str(tmp_path / "eval2"))

    a, b = (Votes.load(tmp_path / d / "votes.safetensors") for d in ("certify1", "certify2"))
    assert torch.equal(a.counts, b.counts) and torch.equal(a.base_predictions, b.base_predictions)
    rows = [list(csv.reader(open(tmp_path / d / "per_image.csv"))) for d in ("certify1", "certify2")]
    assert rows[0] == rows[1] and len(rows[0]) == 38
    timing = {"seconds", "images_per_second", "processes"}
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("certify1", "certify2"))
    assert {k: v for k, v in s1.items() if k not in timing} == {k: v for k, v in s2.items() if k not in timing}
    e1, e2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("eval1", "eval2"))
    assert e1.keys() == e2.keys()
    for k in e1:  # logits of other batch compositions may differ in the last bits
        assert e1[k] == (pytest.approx(e2[k], rel=1e-5) if isinstance(e1[k], float) else e2[k]), k


def test_attack_in_two_processes_matches_one(runs, tmp_path):
    """PGD from random starts: each image's start is keyed by its pixels, so which process attacks it does not
    matter and the per-image outcomes are identical."""
    attack = ["attack", str(runs[0] / "best.safetensors"), "--num-images", "37", "--eps", "0.05,0.1", "--steps", "3",
              "--batch-size", "8", "--examples", "2", "--device", "cpu"]
    assert main([*attack, "--out", str(tmp_path / "one")]) == 0
    torchrun(*attack, "--out", str(tmp_path / "two"))
    rows = [list(csv.reader(open(tmp_path / d / "per_image.csv"))) for d in ("one", "two")]
    assert rows[0] == rows[1] and len(rows[0]) == 38
    assert rows[0][0] == ["index", "label", "clean_right", "robust_eps_0.0500", "robust_eps_0.1000"]
    clean = [int(r[2]) for r in rows[0][1:]]
    robust = [int(r[4]) for r in rows[0][1:]]
    assert 0 < sum(robust) < sum(clean)  # the attack changes some answers and not all: the comparison means something
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert (s1["processes"], s2["processes"]) == (1, 2)
    assert s1["clean_accuracy"] == sum(clean) / 37 and s1["robust_accuracy_eps_0.1000"] == sum(robust) / 37
    timing = {"seconds", "processes"}
    assert {k: v for k, v in s1.items() if k not in timing} == {k: v for k, v in s2.items() if k not in timing}


@pytest.mark.parametrize("head", [[], ["--box-head", "dense", "--cell-loss", "1", "--label-smoothing", "0.1"]])
def test_box_training_and_evaluation_in_two_processes_match_one(tmp_path, head):
    """train-boxes (ViT, no dropout or augmentation) under 2 ranks takes the steps one process takes, with the same
    measured loss balance C (the dense head's cell loss too: its mean is over the global batch's cells);
    `vitkit eval` of the box checkpoint gives the same figures."""
    data = write_yolo(tmp_path / "squares", {"train": 64, "valid": 21, "test": 23})
    tiny = ["--data", str(data), "--image-size", "32", "--patch-size", "8", "--dim", "32", "--depth", "1", "--heads", "2",
            "--mlp-dim", "64", "--hidden", "32", "--head-dropout", "0", "--epochs", "2", "--batch-size", "16",
            "--lr", "1e-3", "--device", "cpu", "--quiet", *head]
    assert main(["train-boxes", *tiny, "--out", str(tmp_path / "one")]) == 0
    torchrun("train-boxes", *tiny, "--out", str(tmp_path / "two"))
    assert_same_weights(tmp_path / "one" / "last.safetensors", tmp_path / "two" / "last.safetensors")
    s1, s2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("one", "two"))
    assert s1["loss_balance"] == s2["loss_balance"] and s2["processes"] == 2
    for a, b in zip(history(tmp_path / "one"), history(tmp_path / "two"), strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-3)
        assert a["val_iou_mean"] == pytest.approx(b["val_iou_mean"], rel=1e-3)
    for k in ("test_accuracy", "test_iou_mean", "test_iou50", "val_loss"):
        assert s1[k] == pytest.approx(s2[k], rel=1e-3), k

    eval_ = ["eval", str(tmp_path / "one"), "--device", "cpu", "--batch-size", "8"]
    assert main([*eval_, "--out", str(tmp_path / "eval1")]) == 0
    torchrun(*eval_, "--out", str(tmp_path / "eval2"))
    e1, e2 = (json.loads((tmp_path / d / "summary.json").read_text()) for d in ("eval1", "eval2"))
    assert e1.keys() == e2.keys() and e1["images"] == 23
    for k in e1:
        assert e1[k] == (pytest.approx(e2[k], rel=1e-5) if isinstance(e1[k], float) else e2[k]), k
    assert (tmp_path / "eval2" / "boxes.png").exists()


def test_commands_that_do_not_share_work_refuse_torchrun(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["info"]) == 2
    assert "runs in one process" in capsys.readouterr().err
