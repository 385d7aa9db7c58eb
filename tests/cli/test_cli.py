"""The command line as a user meets it: help, the config file, each command, and user errors."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from vitkit.cli.main import main

COMMANDS = ("train", "eval", "predict", "info", "explain", "demo")


def run_cli(*args):
    """The real entry point in a subprocess, to see exactly what a user sees."""
    return subprocess.run([sys.executable, "-m", "vitkit", *map(str, args)], capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    assert exit_.value.code == 0
    assert "--config" in capsys.readouterr().out


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    config = out / "options.yaml"
    config.write_text("epochs: 5\nlr: 0.002\nbatch-size: 64\n")
    # The flag overrides the file: 2 epochs, not 5.
    code = main(["train", "--config", str(config), "--epochs", "2", "--device", "cpu", "--quiet", "--out", str(out)])
    assert code == 0
    return out


def test_train_merges_config_file_and_flags(trained_run):
    saved = json.loads((trained_run / "config.json").read_text())
    assert saved["epochs"] == 2 and saved["lr"] == 0.002 and saved["batch_size"] == 64
    assert len((trained_run / "history.jsonl").read_text().splitlines()) == 2


def test_eval_writes_figures_and_pictures(trained_run, tmp_path):
    assert main(["eval", str(trained_run), "--device", "cpu", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert 0 <= summary["test_accuracy"] <= 1 and "test_accuracy_7" in summary
    for name in ("confusion.png", "predictions.png"):
        assert Image.open(tmp_path / name).size[0] > 100


def test_predict_ranks_classes(trained_run, tmp_path, capsys):
    from vitkit.data import load_dataset

    digit = load_dataset("digits", "test").images[0, 0].numpy()
    Image.fromarray(digit).save(tmp_path / "digit.png")
    assert main(["predict", str(trained_run), str(tmp_path / "digit.png"), "--top-k", "3", "--device", "cpu",
                 "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "summary.json").read_text())["predictions"][0]
    probs = [r["probability"] for r in result["top"]]
    assert len(probs) == 3 and probs == sorted(probs, reverse=True) and 0 < sum(probs) <= 1 + 1e-6


def test_info_for_a_preset_and_a_checkpoint(trained_run, tmp_path, capsys):
    assert main(["info", "vit_base", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["parameters"] == 86_567_656 and summary["tokens"] == 197
    assert main(["info", str(trained_run)]) == 0
    assert main(["info"]) == 0 and "vit_huge" in capsys.readouterr().out


def test_resume_of_a_finished_run_keeps_its_weights(trained_run):
    before = (trained_run / "last.safetensors").read_bytes()
    assert main(["train", "--resume", str(trained_run), "--quiet"]) == 0
    assert (trained_run / "last.safetensors").read_bytes() == before


@pytest.mark.parametrize(
    "args,message",
    [
        (["train", "--data", "/no/such/folder", "--quiet"], "neither a built-in"),
        (["train", "--model", "vit_gigantic", "--quiet"], "unknown preset"),
        (["train", "--config", "/no/such.yaml"], "does not exist"),
        (["eval", "/no/such/checkpoint.safetensors"], "does not exist"),
        (["predict", "/no/such/checkpoint.safetensors", "x.png"], "does not exist"),
        (["train", "--resume", "/no/such/run"], "not a vitkit run folder"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0


def test_unknown_key_in_config_file(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"epoks": 3}))
    result = run_cli("train", "--config", bad)
    assert result.returncode == 2 and "epoks" in result.stderr and "Traceback" not in result.stderr


def test_checkpoint_that_does_not_fit(trained_run, tmp_path):
    from safetensors.torch import load_file, save_file

    from vitkit.train.checkpoint import read_info

    info = read_info(trained_run)
    info["model"]["dim"] = 64
    weights = load_file(trained_run / "best.safetensors")
    save_file(weights, tmp_path / "wrong.safetensors", metadata={"vitkit": json.dumps(info)})
    result = run_cli("eval", tmp_path / "wrong.safetensors", "--device", "cpu")
    assert result.returncode == 2 and "do not fit" in result.stderr and "Traceback" not in result.stderr


def test_predict_on_a_corrupt_image(trained_run, tmp_path):
    (tmp_path / "broken.png").write_bytes(b"garbage")
    result = run_cli("predict", trained_run, tmp_path / "broken.png", "--device", "cpu")
    assert result.returncode == 2 and "broken.png" in result.stderr


def test_demo_reaches_the_promised_accuracy(tmp_path):
    """What `make demo` promises: digits test accuracy of at least 0.97, everything in the run folder."""
    assert main(["demo", "--out", str(tmp_path), "--device", "cpu", "--quiet"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["test_accuracy"] >= 0.97, summary
    evaluated = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert evaluated["test_accuracy"] == summary["test_accuracy"]


def test_explain_draws_maps_and_scores_them(trained_run, tmp_path):
    assert main(["explain", str(trained_run), "--n", "4", "--evaluate", "--n-eval", "40", "--steps", "4",
                 "--device", "cpu", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    for method in ("rollout", "grad_rollout", "random"):
        assert 0 <= summary[f"{method}_deletion_auc"] <= 1 and 0 <= summary[f"{method}_insertion_auc"] <= 1
    assert summary["images_evaluated"] == 40
    for name in ("rollout.png", "deletion_insertion.png"):
        assert Image.open(tmp_path / name).size[0] > 100
