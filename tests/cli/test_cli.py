"""The command line as a user meets it: help, the config file, each command, and user errors."""

import json
import subprocess
import sys

import pytest
from PIL import Image

from vitkit.attacks import apgd, attack_outcomes, load_pixel_model, rays, square, worst_case
from vitkit.cli.main import main
from vitkit.data import load_dataset

COMMANDS = ("train", "eval", "predict", "info", "explain", "attack", "certify", "demo")


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
    assert main(["train", "--resume", str(trained_run), "--out", str(trained_run), "--quiet"]) == 0  # its own folder
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
        (["attack", "/no/such/checkpoint.safetensors"], "does not exist"),
        (["certify", "/no/such/checkpoint.safetensors"], "does not exist"),
        (["certify", "--votes", "/no/such/votes.safetensors"], "not a votes file"),
        (["train", "--ablation", "diagonal", "--quiet"], "unknown ablation"),
        (["train", "--recipe", "cifar10-fast-distilled", "--quiet"], "pass --teacher CHECKPOINT"),
    ],
)
def test_user_errors_are_one_line_without_traceback(args, message):
    result = run_cli(*args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0


RUN, OUT = "RUN", "OUT"  # the trained run, and an output folder that must stay unwritten


@pytest.mark.parametrize(
    "args,message",
    [
        # numbers out of range, refused when parsed
        (["predict", RUN, "x.png", "--top-k", "0", "--out", OUT], "0 must be at least 1"),
        (["explain", RUN, "--discard-ratio", "1.5", "--out", OUT], "must lie in [0, 1)"),
        (["explain", RUN, "--evaluate", "--steps", "1", "--out", OUT], "must be at least 2"),
        (["attack", RUN, "--eps", ",", "--out", OUT], "holds no value"),
        (["attack", RUN, "--step-size", "-1", "--out", OUT], "must be positive"),
        (["attack", RUN, "--examples", "-1", "--out", OUT], "must be at least 0"),
        (["certify", RUN, "--ablation-size", "0", "--out", OUT], "0 must be at least 1"),
        (["certify", RUN, "--n", "-1", "--out", OUT], "must be at least 0"),
        (["certify", RUN, "--max-batch", "0", "--out", OUT], "0 must be at least 1"),
        (["info", "vit_tiny", "--num-classes", "-1"], "-1 must be at least 0"),
        # refused before any work
        (["attack", RUN, "--eps", "8", "--out", OUT], "exceeds the pixel range"),
        (["attack", RUN, "--patch-size", "3", "--out", OUT], "belong to --attack patch"),
        (["attack", RUN, "--attack", "patch", "--eps", "0.1", "--out", OUT], "drop --eps"),
        (["attack", RUN, "--attack", "fgsm", "--step-size", "0.1", "--out", OUT], "drop --step-size"),
        (["attack", RUN, "--attack", "apgd", "--step-size", "0.1", "--out", OUT], "sets its own step sizes"),
        (["attack", RUN, "--loss", "dlr", "--out", OUT], "--loss chooses the loss of --attack apgd"),
        (["attack", RUN, "--attack", "apgd", "--loss", "ce,hinge", "--out", OUT], "use ce, dlr or ce,dlr"),
        (["attack", RUN, "--attack", "apgd", "--loss", "ce,ce", "--out", OUT], "names a loss twice"),
        (["attack", RUN, "--attack", "auto", "--loss", "dlr", "--out", OUT], "auto runs both"),
        (["attack", RUN, "--attack", "square", "--steps", "3", "--out", OUT], "set their budget with --queries"),
        (["attack", RUN, "--attack", "rays", "--no-random-start", "--out", OUT], "do not apply to --attack rays"),
        (["attack", RUN, "--attack", "fgsm", "--restarts", "2", "--out", OUT], "use --attack pgd for iterations"),
        (["attack", RUN, "--attack", "patch", "--restarts", "2", "--out", OUT], "--restarts do not apply"),
        (["attack", RUN, "--attack", "square", "--step-size", "0.1", "--out", OUT], "square takes no gradient steps"),
        (["attack", RUN, "--queries", "100", "--out", OUT], "--queries is the budget of the black-box attacks"),
        (["attack", RUN, "--attack", "rays", "--norm", "l2", "--out", OUT], "ℓ∞ ball only"),
        (["attack", RUN, "--attack", "square", "--surrogate", RUN, "--out", OUT], "needs no surrogate"),
        (["certify", RUN, "--patch-size", "20", "--out", OUT], "does not fit 8-pixel images"),
        (["info", "vit_nope"], "neither a preset"),
        (["train", "--warmup-epochs", "-3", "--out", OUT], "--warmup-epochs must be 0"),
        (["train", "--weight-decay", "-1", "--out", OUT], "--weight-decay must be 0"),
        (["train", "--dim", "0", "--out", OUT], "--dim must be positive"),
        (["train", "--label-smoothing", "2", "--out", OUT], "--label-smoothing must lie in [0, 1)"),
        (["train", "--drop-path", "-0.5", "--out", OUT], "--drop-path must lie in [0, 1)"),
        (["train", "--dropout", "1.5", "--out", OUT], "--dropout must lie in [0, 1)"),
        (["train", "--eval-batch-size", "0", "--out", OUT], "--eval-batch-size must be positive"),
        (["train", "--resized-crop-scale", "0.8", "--out", OUT], "takes two values"),
        (["train-boxes", "--data", "x", "--backbone", "resnet18", "--patch-size", "4", "--out", OUT],
         "--patch-size applies to ViT"),
        (["train-boxes", "--data", "x", "--momentum", "1.5", "--out", OUT], "--momentum must lie in [0, 1)"),
        (["train", "--resume", RUN, "--recipe", "digits"], "drop --recipe"),
        (["train", "--resume", RUN, "--out", "elsewhere"], "drop --out"),
        (["train-boxes", "--resume", RUN], "is not a `vitkit train-boxes` run"),
        (["train", "--out", RUN, "--epochs", "1"], "already holds a run: continue it with --resume"),
    ],
)
def test_bad_values_and_combinations_are_refused_with_the_fix(trained_run, tmp_path, capsys, args, message):
    args = [{RUN: str(trained_run), OUT: str(tmp_path / "out")}.get(a, a) for a in args]
    run_before = {f.name: f.read_bytes() for f in trained_run.iterdir() if f.is_file()}
    with pytest.raises(SystemExit) as error:  # argparse exits by itself; main returns its status
        raise SystemExit(main(args))
    assert error.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()  # refused before anything was written
    assert {f.name: f.read_bytes() for f in trained_run.iterdir() if f.is_file()} == run_before


def test_default_run_folders_never_overwrite_a_run(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    tiny = ["--epochs", "1", "--dim", "16", "--depth", "1", "--heads", "1", "--mlp-dim", "16", "--device", "cpu", "--quiet"]
    assert main(["train", *tiny]) == 0
    first = (tmp_path / "runs" / "digits-vit_digits" / "last.safetensors").read_bytes()
    assert main(["train", *tiny, "--seed", "1"]) == 0  # same default name: the next free folder
    assert "training into runs/digits-vit_digits-2/" in capsys.readouterr().out
    assert (tmp_path / "runs" / "digits-vit_digits" / "last.safetensors").read_bytes() == first
    assert json.loads((tmp_path / "runs" / "digits-vit_digits-2" / "config.json").read_text())["seed"] == 1
    assert main(["train", "--recipe", "digits", *tiny]) == 0  # a recipe names its folder
    assert (tmp_path / "runs" / "digits" / "config.json").exists()
    assert main(["train", "--data", "/no/such/data", *tiny]) == 2  # refused: the folder it claimed is gone again
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["digits", "digits-vit_digits", "digits-vit_digits-2"]


def test_out_must_be_a_folder(trained_run, tmp_path, capsys):
    (tmp_path / "file.png").write_bytes(b"")
    assert main(["eval", str(trained_run), "--out", str(tmp_path / "file.png")]) == 2
    assert "is a file" in capsys.readouterr().err


def test_config_file_values_meet_the_flags_types(tmp_path, capsys):
    from vitkit.cli.main import build_parser, parse_args

    config = tmp_path / "c.yaml"
    for command, text, message in [
        ("train", "epochs: 1.5", "epochs in {}: '1.5' is not a whole number"),
        ("train", "hflip: [1, 2]", "hflip in {} takes one value, not a list"),
        ("train", "spt: 3", "spt in {} is an on/off option"),
        ("train", "lr: -1", "--lr must be positive"),
        ("certify", "rule: median", "rule in {} is 'median': choose one of top, threshold"),
        ("certify", "checkpoint: runs/x", "checkpoint in {} is given on the command line"),
        ("certify", "no_token_dropping: yes please", "no_token_dropping in {} is an on/off option"),
    ]:
        config.write_text(text)
        assert main([command, "--config", str(config), "--out", str(tmp_path / "o")]) == 2
        assert message.format(config) in capsys.readouterr().err
    # A list option given one value in the file is a list of one; a flag still overrides the file; a key may be
    # any long name of its option.
    config.write_text("milestones: 5\nhflip: 0.5\nspt: true\nresized_crop_scale: [0.8, 1]\n")
    args = parse_args(build_parser(), ["train", "--config", str(config), "--no-spt"])
    assert args.milestones == [5] and args.hflip == 0.5 and args.spt is False and args.resized_crop_scale == [0.8, 1]
    config.write_text("num_images: 7\n")
    assert parse_args(build_parser(), ["certify", "RUN", "--config", str(config)]).n == 7


def test_explain_takes_image_files_after_its_options(trained_run, tmp_path):
    from vitkit.data import load_dataset

    Image.fromarray(load_dataset("digits", "test").images[0, 0].numpy()).save(tmp_path / "digit.png")
    assert main(["explain", str(trained_run), "--n", "1", "--device", "cpu", "--out", str(tmp_path / "maps"),
                 str(tmp_path / "digit.png")]) == 0
    assert json.loads((tmp_path / "maps" / "summary.json").read_text())["images_shown"] == 1


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


def test_attack_reports_clean_and_robust_accuracy(trained_run, tmp_path, capsys):
    out = tmp_path / "pgd"
    assert main(["attack", str(trained_run), "--eps", "0,4/255,0.1", "--steps", "3", "--restarts", "2", "--n", "60",
                 "--batch-size", "25", "--device", "cpu", "--out", str(out)]) == 0
    assert "ε=0.0157 (4/255)" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    clean = summary["clean_accuracy"]
    assert summary["images"] == 60 and summary["robust_accuracy_eps_0.0000"] == clean
    assert summary["robust_accuracy_eps_0.1000"] <= summary["robust_accuracy_eps_0.0157"] <= clean
    for name in ("robustness.png", "examples.png"):
        assert Image.open(out / name).size[0] > 100

    # A patch attack transferred from a surrogate (here the run itself), and FGSM under ℓ2.
    out = tmp_path / "patch"
    assert main(["attack", str(trained_run), "--attack", "patch", "--patch-size", "2,3", "--steps", "3",
                 "--surrogate", str(trained_run), "--n", "30", "--device", "cpu", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["surrogate"] == str(trained_run) and 0 <= summary["robust_accuracy_patch_3"] <= 1
    assert main(["attack", str(trained_run), "--attack", "fgsm", "--norm", "l2", "--eps", "0.5", "--n", "30",
                 "--device", "cpu", "--out", str(tmp_path / "fgsm")]) == 0
    # Auto-PGD with both losses and restarts: the CLI's per-image outcomes are the library's on the same sample.
    out = tmp_path / "apgd"
    assert main(["attack", str(trained_run), "--attack", "apgd", "--loss", "ce,dlr", "--restarts", "2", "--eps",
                 "2/255,8/255", "--steps", "5", "--n", "30", "--examples", "0", "--device", "cpu", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["attack"] == "apgd" and summary["loss"] == "ce,dlr" and summary["steps"] == 5
    assert summary["restarts"] == 2
    model, info = load_pixel_model(trained_run, "cpu")
    data = load_dataset(info["data"], "test").sample(30, 0)
    ce, dlr = [lambda m, x, y, e, g, loss=loss: apgd(m, x, y, e, steps=5, loss=loss, restarts=2, generator=g)
               for loss in ("ce", "dlr")]
    expected = attack_outcomes(model, data.images, data.labels, worst_case(ce, dlr), [2 / 255, 8 / 255])
    rows = [line.split(",")[2:] for line in (out / "per_image.csv").read_text().splitlines()[1:]]
    assert rows == [[str(int(v)) for v in row] for row in expected.tolist()]
    # The ensemble (APGD-CE, APGD-DLR, Square) and RayS: the CLI's outcomes are the library's too.
    apgd_part = [lambda m, x, y, e, g, loss=loss: apgd(m, x, y, e, steps=4, loss=loss, generator=g) for loss in ("ce", "dlr")]
    for attack, options, library in [
        ("auto", ["--steps", "4", "--queries", "30"],
         worst_case(*apgd_part, lambda m, x, y, e, g: square(m, x, y, e, queries=30, generator=g))),
        ("rays", ["--queries", "40"], lambda m, x, y, e, g: rays(m, x, y, e, queries=40)),
    ]:
        out = tmp_path / attack
        assert main(["attack", str(trained_run), "--attack", attack, *options, "--eps", "2/255,8/255", "--n", "30",
                     "--examples", "0", "--device", "cpu", "--out", str(out)]) == 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["queries"] == int(options[-1]) and summary["random_start"] == {"auto": True}.get(attack)
        expected = attack_outcomes(model, data.images, data.labels, library, [2 / 255, 8 / 255])
        rows = [line.split(",")[2:] for line in (out / "per_image.csv").read_text().splitlines()[1:]]
        assert rows == [[str(int(v)) for v in row] for row in expected.tolist()]
    assert main(["attack", str(trained_run), "--attack", "patch", "--patch-size", "9", "--device", "cpu",
                 "--out", str(tmp_path / "bad")]) == 2
    assert "does not fit 8×8 images" in capsys.readouterr().err


def test_certify_reports_and_rederives_from_votes(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--epochs", "2", "--ablation", "column", "--ablation-size", "2", "--device", "cpu",
                 "--quiet", "--out", str(run)]) == 0
    out = tmp_path / "certify"
    # The ablation defaults to the one the model was trained on (column, b=2; 8 ablations of an 8×8 digit).
    assert main(["certify", str(run), "--patch-size", "1", "--patch-sizes", "1-3", "--n", "100", "--device", "cpu",
                 "--quiet", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "1x1" in printed and "3x3" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["ablation"] == "column" and summary["ablation_size"] == 2 and summary["ablations_per_image"] == 8
    assert summary["images"] == 100 and summary["delta"] == 2 and summary["token_dropping"] is True
    assert summary["certified_accuracy"] == summary["certified_accuracy_1x1"] <= summary["smoothed_accuracy"]
    assert summary["certified_accuracy_3x3"] <= summary["certified_accuracy_2x2"] <= summary["certified_accuracy_1x1"]
    rows = (out / "per_image.csv").read_text().splitlines()
    assert len(rows) == 101 and rows[0].startswith("index,label")
    assert Image.open(out / "certified_accuracy.png").size[0] > 100
    # The votes file alone gives the same figures, for any patch size, without the model.
    again = tmp_path / "again"
    assert main(["certify", "--votes", str(out / "votes.safetensors"), "--patch-size", "1", "--patch-sizes", "1-3",
                 "--out", str(again)]) == 0
    rederived = json.loads((again / "summary.json").read_text())
    assert {k: v for k, v in rederived.items() if k in summary} == {
        k: v for k, v in summary.items() if k in rederived}
    # The threshold rule and the Levine & Feizi tie rule run through the same command, and so does a patch
    # attack on the smoothed model, whose empirical accuracy bounds the certified one from above.
    assert main(["certify", str(run), "--rule", "threshold", "--threshold", "0.3", "--tie-rule", "levine_feizi",
                 "--n", "20", "--attack-n", "12", "--attack-positions", "2", "--attack-steps", "2",
                 "--patch-size", "1", "--device", "cpu", "--quiet", "--out", str(tmp_path / "lf")]) == 0
    attacked = json.loads((tmp_path / "lf" / "summary.json").read_text())
    assert attacked["attacked_images"] == 12 and attacked["certified_images_broken_by_attack"] == 0
    assert attacked["certified_accuracy_1x1_on_attacked_images"] <= attacked["empirical_accuracy_1x1"]
    votes = str(out / "votes.safetensors")
    for args, message in [
        (["--out", str(tmp_path / "none")], "one of the two"),
        (["--votes", votes, "--patch-size", "9"], "does not fit 8-pixel images"),
        (["--votes", votes, "--attack-n", "5"], "needs the model"),
    ]:
        assert main(["certify", *args, "--out", str(tmp_path / "bad")]) == 2
        assert message in capsys.readouterr().err


def test_a_resnet_run_through_eval_predict_attack_and_certify(tmp_path, capsys):
    run = tmp_path / "resnet"
    assert main(["train", "--model", "resnet18", "--epochs", "1", "--batch-size", "256", "--optimizer", "sgd", "--lr",
                 "0.1", "--warmup-epochs", "0", "--device", "cpu", "--quiet", "--out", str(run)]) == 0
    assert main(["eval", str(run), "--device", "cpu", "--out", str(tmp_path / "eval")]) == 0
    assert 0 <= json.loads((tmp_path / "eval" / "summary.json").read_text())["test_accuracy"] <= 1
    from vitkit.data import load_dataset

    Image.fromarray(load_dataset("digits", "test").images[0, 0].numpy()).save(tmp_path / "digit.png")
    assert main(["predict", str(run), str(tmp_path / "digit.png"), "--device", "cpu"]) == 0
    assert main(["attack", str(run), "--eps", "0.1", "--steps", "2", "--n", "20", "--device", "cpu",
                 "--out", str(tmp_path / "attack")]) == 0
    attacked = json.loads((tmp_path / "attack" / "summary.json").read_text())
    assert attacked["robust_accuracy_eps_0.1000"] <= attacked["clean_accuracy"]
    # Smoothing works on any base model: the CNN sees whole masked images (no tokens to drop).
    assert main(["certify", str(run), "--ablation-size", "2", "--patch-size", "1", "--patch-sizes", "1-2", "--n", "10",
                 "--device", "cpu", "--quiet", "--out", str(tmp_path / "certify")]) == 0
    assert json.loads((tmp_path / "certify" / "summary.json").read_text())["token_dropping"] is False
    capsys.readouterr()
    for command in (["explain", str(run)], ["info", str(run)]):
        assert main([*command, "--out", str(tmp_path / "vit-only")]) == 2
        assert "holds a resnet18 model: pass a ViT checkpoint" in capsys.readouterr().err


def test_distilled_training_from_the_command_line(tmp_path, digits_teacher):
    run = tmp_path / "student"
    assert main(["train", "--teacher", str(digits_teacher), "--distill", "hard", "--distill-alpha", "0.5",
                 "--dim", "32", "--depth", "1", "--heads", "2", "--mlp-dim", "64", "--epochs", "1", "--device", "cpu",
                 "--quiet", "--out", str(run)]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["teacher"] == str(digits_teacher) and saved["distill"] == "hard"
    # A distilled ViT is explained through both of its output tokens.
    assert main(["explain", str(run), "--n", "2", "--discard-ratio", "0.2", "--device", "cpu",
                 "--out", str(tmp_path / "explain")]) == 0
