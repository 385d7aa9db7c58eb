"""`vitkit train-boxes`, and `vitkit eval` and `vitkit predict` on a box checkpoint, as a user meets them."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from synthetic_boxes import COLOURS, write_yolo

from vitkit.cli.main import main
from vitkit.train.boxes import load_box_model

TINY = ["--image-size", "32", "--patch-size", "4", "--dim", "32", "--depth", "2", "--heads", "2", "--mlp-dim", "64",
        "--hidden", "32", "--batch-size", "32", "--device", "cpu", "--quiet"]


def test_train_boxes_has_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["train-boxes", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert "--config" in out and "--loss-balance" in out and "--resume" in out


@pytest.fixture(scope="module")
def box_run(tmp_path_factory):
    data = write_yolo(tmp_path_factory.mktemp("data") / "squares", {"train": 64, "valid": 32, "test": 32})
    out = tmp_path_factory.mktemp("run")
    config = out / "options.yaml"
    config.write_text("epochs: 5\nbox-loss: giou\nloss-balance: 2\n")
    # The flag overrides the file: 2 epochs, not 5.
    assert main(["train-boxes", "--config", str(config), "--data", str(data), *TINY, "--epochs", "2",
                 "--out", str(out)]) == 0
    return data, out


def test_train_boxes_merges_config_file_and_flags(box_run):
    _, out = box_run
    saved = json.loads((out / "config.json").read_text())
    assert saved["epochs"] == 2 and saved["box_loss"] == "giou" and saved["loss_balance"] == "2"
    summary = json.loads((out / "summary.json").read_text())
    assert {"test_accuracy", "test_iou_mean", "test_iou50", "test_iou75", "test_iou90", "val_iou90"} <= set(summary)


def test_eval_of_a_box_checkpoint_writes_figures_and_the_box_picture(box_run, tmp_path):
    data, out = box_run
    assert main(["eval", str(out), "--device", "cpu", "--samples", "8", "--out", str(tmp_path)]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["images"] == 32 and 0 <= summary["test_iou50"] <= 1
    assert summary["test_accuracy"] == json.loads((out / "summary.json").read_text())["test_accuracy"]
    assert Image.open(tmp_path / "boxes.png").size[0] > 100
    assert Image.open(tmp_path / "confusion.png").size[0] > 100
    # Per class: the accuracies, weighted by the classes' image counts, add up to the overall accuracy.
    counts = dict.fromkeys(COLOURS, 0)
    for label_file in (data / "test" / "labels").glob("*.txt"):
        counts[list(COLOURS)[int(label_file.read_text().split()[0])]] += 1
    weighted = sum(summary[f"test_accuracy_{name}"] * n for name, n in counts.items() if n) / sum(counts.values())
    assert weighted == pytest.approx(summary["test_accuracy"], abs=1e-6)


def test_predict_on_a_box_checkpoint_gives_classes_and_boxes_in_the_files_pixels(box_run, tmp_path, capsys):
    data, out = box_run
    files = sorted((data / "test" / "images").glob("*.png"))[:4]
    # One file at another size and shape: the model sees it stretched to its square input.
    with Image.open(files[0]) as img:
        img.resize((64, 48), Image.Resampling.NEAREST).save(tmp_path / "wide.png")
    paths = [*files, tmp_path / "wide.png"]
    assert main(["predict", str(out), *map(str, paths), "--top-k", "2", "--device", "cpu", "--out",
                 str(tmp_path / "pred")]) == 0
    printed = capsys.readouterr().out.splitlines()
    results = json.loads((tmp_path / "pred" / "summary.json").read_text())["predictions"]
    assert len(results) == len(printed) == 5 and all("box x1, y1, x2, y2" in line for line in printed)
    assert Image.open(tmp_path / "pred" / "boxes.png").size[0] > 100

    # The 32-px files as the model takes them, written out plainly: normalised, one forward in eval mode.
    model, info = load_box_model(out)
    x = torch.tensor(np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])).permute(0, 3, 1, 2)
    mean, std = torch.tensor(info["mean"])[:, None, None], torch.tensor(info["std"])[:, None, None]
    with torch.no_grad():
        logits, boxes = model((x.float() / 255 - mean) / std)
    probs = logits.softmax(1)
    for i, r in enumerate(results[:4]):
        assert r["top"][0]["class"] == info["classes"][int(probs[i].argmax())]
        assert r["top"][0]["probability"] == pytest.approx(float(probs[i].max()), abs=1e-5)
        assert r["top"][0]["probability"] >= r["top"][1]["probability"]
        assert r["box_cxcywh"] == pytest.approx(boxes[i].tolist(), abs=1e-5)
    for r, size in zip(results, [(32, 32)] * 4 + [(64, 48)]):
        (cx, cy, w, h), (width, height) = r["box_cxcywh"], size
        assert r["image_size"] == list(size)
        assert r["box_xyxy_pixels"] == pytest.approx(
            [(cx - w / 2) * width, (cy - h / 2) * height, (cx + w / 2) * width, (cy + h / 2) * height], abs=1e-3)


def test_eval_and_predict_score_under_the_autocast_the_run_scored_itself_with(box_run, tmp_path, monkeypatch):
    import vitkit.train.boxes as boxes_module

    data, out = box_run
    _, info = load_box_model(out)
    assert info["eval_bf16"] is json.loads((out / "config.json").read_text())["bf16"]  # on CUDA: bf16 by default
    asked = []
    real = boxes_module.predict_boxes

    def recording(*args, **kwargs):
        asked.append(kwargs.get("bf16", args[6] if len(args) > 6 else None))
        return real(*args, **kwargs)

    monkeypatch.setattr(boxes_module, "predict_boxes", recording)
    image = str(next((data / "test" / "images").glob("*.png")))
    assert main(["eval", str(out), "--device", "cpu", "--out", str(tmp_path / "eval")]) == 0
    assert main(["predict", str(out), image, "--device", "cpu"]) == 0
    assert asked == [info["eval_bf16"]] * 2


def test_resume_of_a_finished_box_run_keeps_its_weights(box_run):
    _, out = box_run
    before = (out / "last.safetensors").read_bytes()
    assert main(["train-boxes", "--resume", str(out), "--quiet"]) == 0
    assert (out / "last.safetensors").read_bytes() == before


def test_explain_on_a_zoomed_box_checkpoint_draws_both_passes(tmp_path, capsys):
    data = write_yolo(tmp_path / "squares", {"train": 32, "valid": 16, "test": 16})
    run = tmp_path / "run"
    assert main(["train-boxes", "--data", str(data), *TINY, "--image-size", "16", "--source-size", "32",
                 "--zoom", "1.2", "--box-head", "dense", "--epochs", "1",
                 "--out", str(run)]) == 0
    out = tmp_path / "explain"
    assert main(["explain", str(run), "--n", "5", "--device", "cpu", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["images_shown"] == 5 and summary["figures"] == ["rollout.png", "rollout-zoom.png"]
    for name in summary["figures"]:
        assert Image.open(out / name).size[1] > 5 * 100  # a row per image
    # Image files; one layer's attention.
    files = sorted((data / "test" / "images").glob("*"))[:2]
    assert main(["explain", str(run), *map(str, files), "--method", "attention", "--layer", "0", "--device", "cpu",
                 "--out", str(out / "files")]) == 0
    assert json.loads((out / "files" / "summary.json").read_text())["images_shown"] == 2


def test_a_class_stage_trains_on_the_runs_options_and_box(tmp_path):
    data = write_yolo(tmp_path / "squares", {"train": 32, "valid": 16})
    run = tmp_path / "run"
    assert main(["train-boxes", "--data", str(data), *TINY, "--zoom", "1.2", "--zoom-backbone", "own", "--epochs", "2",
                 "--class-epochs", "1", "--box-loss", "giou", "--out", str(run)]) == 0
    stage = tmp_path / "stage"
    assert main(["train-boxes", "--class-from", str(run), "--quiet", "--out", str(stage)]) == 0
    saved = json.loads((stage / "config.json").read_text())
    assert saved["class_from"] == str(run) and saved["box_loss"] == "giou" and saved["hidden"] == 32
    assert (saved["epochs"], saved["class_epochs"], saved["select_by"]) == (1, None, "last")
    assert main(["train-boxes", "--resume", str(stage)]) == 0  # a finished stage resumes as any run


@pytest.mark.parametrize("problem", ["missing data", "bad label", "changed option", "classifier command",
                                     "explain evaluate", "explain gradient", "class stage of no run"])
def test_user_errors_are_one_line(box_run, tmp_path, capsys, problem):
    data, out = box_run
    if problem == "missing data":
        args = ["train-boxes", "--data", str(tmp_path / "nope"), *TINY]
    elif problem == "bad label":
        bad = write_yolo(tmp_path / "bad", {"train": 4})
        (bad / "train" / "labels" / "0001.txt").write_text("9 0.5 0.5 0.1 0.1\n")
        args = ["train-boxes", "--data", str(bad), *TINY]
    elif problem == "changed option":
        args = ["train-boxes", "--resume", str(out), "--lr", "0.5"]
    elif problem == "classifier command":
        args = ["certify", str(out)]
    elif problem == "class stage of no run":
        args = ["train-boxes", "--class-from", str(tmp_path)]
    elif problem == "explain evaluate":
        args = ["explain", str(out), "--evaluate"]
    else:
        args = ["explain", str(out), "--method", "grad_rollout"]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("vitkit: error:") and "\n" not in err
