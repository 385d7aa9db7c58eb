"""Box training end to end on a synthetic task: it learns, resumes exactly, balances its losses, and its
checkpoints load on their own."""

import copy
import json

import pytest
import torch
import torch.nn.functional as F
import torchvision.ops as ops
from safetensors.torch import load_file
from synthetic_boxes import write_yolo

from vitkit.data.boxes import box_iou, cxcywh_to_xyxy, load_box_dataset, scale_sizes
from vitkit.errors import VitkitError
from vitkit.train.boxes import (
    BOX_PARTS, BOX_SCALES, CLASS_PARTS, SMOOTH_L1_BETA, BoxTrainConfig, BoxTrainer, box_loss, box_losses,
    class_stage_config, cross_fitted_scales,
    dense_cell_loss, evaluate_box_model, fit_box_scale, load_box_model, measure_loss_balance, predict_boxes, task_loss,
    train_boxes,
)

TINY_VIT = dict(image_size=32, patch_size=4, dim=32, depth=2, heads=2, mlp_dim=64, hidden=64, device="cpu")


@pytest.fixture(scope="module")
def squares(tmp_path_factory):
    """The square task: a coloured square on noise, class = colour; 512 training images of 32×32."""
    return write_yolo(tmp_path_factory.mktemp("data") / "squares", {"train": 512, "valid": 64, "test": 128})


@pytest.fixture(scope="module")
def small_squares(tmp_path_factory):
    return write_yolo(tmp_path_factory.mktemp("data") / "small", {"train": 96, "valid": 32})


@pytest.fixture(scope="module")
def learned(squares, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    cfg = BoxTrainConfig(data=str(squares), **TINY_VIT, head_dropout=0.0, epochs=20, batch_size=16, lr=2e-3)
    return out, train_boxes(cfg, out, progress=False)


def test_a_short_run_learns_classes_and_boxes(squares, learned):
    out, summary = learned
    test = load_box_dataset(str(squares), "test", 32)
    # Chance: the most frequent class, and the mean training box for every image.
    train = load_box_dataset(str(squares), "train", 32)
    chance_accuracy = torch.bincount(test.labels).max().item() / len(test)
    chance_iou50 = (box_iou(train.boxes.mean(0).expand_as(test.boxes), test.boxes) >= 0.5).float().mean().item()
    assert summary["test_accuracy"] > 0.9 > chance_accuracy + 0.4
    assert summary["test_iou50"] > chance_iou50 + 0.25, (summary["test_iou50"], chance_iou50)
    assert summary["test_iou50"] >= summary["test_iou75"] >= summary["test_iou90"]
    for name in ("best.safetensors", "last.safetensors", "state.pt", "history.jsonl", "curves.png", "boxes.png",
                 "summary.json", "config.json"):
        assert (out / name).is_file(), name
    rows = [json.loads(line) for line in (out / "history.jsonl").read_text().splitlines()]
    assert len(rows) == 20 and {"val_accuracy", "val_iou_mean", "val_iou90", "train_iou_mean"} <= set(rows[0])


def test_the_checkpoint_reloads_on_its_own(squares, learned):
    out, summary = learned
    model, info = load_box_model(out)
    assert info["task"] == "boxes" and info["classes"] == ["red", "green", "blue"] and info["image_size"] == 32
    test = load_box_dataset(str(squares), "test", 32)
    logits, boxes = predict_boxes(model, test, info["mean"], info["std"], torch.device("cpu"))
    assert (logits.argmax(1) == test.labels).float().mean().item() == pytest.approx(summary["test_accuracy"])
    assert box_iou(boxes, test.boxes).mean().item() == pytest.approx(summary["test_iou_mean"], abs=1e-6)


def test_the_dense_box_head_learns_and_reloads(squares, learned, tmp_path):
    """The same run as `learned` with the box read from the patch tokens. The square can be anywhere: the pooled
    head must learn the coordinates of every position, the dense one reads them off the cells it weights. In 20
    epochs the dense head localises far better (mean IoU 0.91 against 0.51 when written), and its checkpoint
    predicts what the summary says."""
    cfg = BoxTrainConfig(data=str(squares), **TINY_VIT, head_dropout=0.0, epochs=20, batch_size=16, lr=2e-3,
                         box_head="dense")
    dense = train_boxes(cfg, tmp_path, progress=False)
    test = load_box_dataset(str(squares), "test", 32)
    train = load_box_dataset(str(squares), "train", 32)
    chance_iou50 = (box_iou(train.boxes.mean(0).expand_as(test.boxes), test.boxes) >= 0.5).float().mean().item()
    assert dense["test_accuracy"] > 0.9
    assert dense["test_iou50"] > chance_iou50 + 0.25, (dense["test_iou50"], chance_iou50)
    model, info = load_box_model(tmp_path)
    assert info["box_model"]["box_head"] == "dense"
    _, boxes = predict_boxes(model, test, info["mean"], info["std"], torch.device("cpu"))
    assert box_iou(boxes, test.boxes).mean().item() == pytest.approx(dense["test_iou_mean"], abs=1e-6)
    assert dense["test_iou_mean"] > learned[1]["test_iou_mean"] + 0.2, (dense["test_iou_mean"], learned[1])


def loose_boxes(n: int, inflation: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """True boxes inside the image, and predictions off by a little noise and `inflation` on every side."""
    g = torch.Generator().manual_seed(seed)
    size = 0.2 + 0.4 * torch.rand(n, 2, generator=g)
    true = torch.cat([0.3 + 0.4 * torch.rand(n, 2, generator=g), size], dim=1)
    pred = true + 0.01 * torch.randn(n, 4, generator=g)
    return scale_sizes(pred, inflation), true


def test_the_box_scale_fit_is_the_best_factor_of_its_grid_and_undoes_an_inflation():
    pred, true = loose_boxes(200, 1.06)
    fitted = fit_box_scale(pred, true)
    by_hand = [box_iou(scale_sizes(pred, f), true).mean().item() for f in BOX_SCALES.tolist()]  # one by one
    assert fitted == pytest.approx(BOX_SCALES[max(range(len(by_hand)), key=by_hand.__getitem__)].item())
    assert abs(fitted * 1.06 - 1) < 0.01
    assert box_iou(scale_sizes(pred, fitted), true).mean() > box_iou(pred, true).mean() + 0.02


def test_cross_fitted_scales_come_from_the_other_folds():
    pred, true = loose_boxes(40, 1.04, seed=1)
    scales = cross_fitted_scales(pred, true, folds=4, seed=3)
    order = torch.randperm(40, generator=torch.Generator().manual_seed(3))
    for fold in order.chunk(4):
        rest = torch.tensor([i for i in range(40) if i not in fold.tolist()])
        assert (scales[fold] == fit_box_scale(pred[rest], true[rest])).all()
    assert 0.9 < scales.min() <= scales.max() < 1.0


def test_box_scale_auto_is_fitted_on_validation_and_saved_with_the_model(small_squares, tmp_path):
    cfg = resume_config(small_squares, epochs=2, box_scale="auto", schedule="cosine", select_by="accuracy")
    summary = train_boxes(cfg, tmp_path, progress=False)
    model, info = load_box_model(tmp_path)
    assert model.box_scale == summary["box_scale"] == info["box_model"]["box_scale"] != 1.0
    val = load_box_dataset(str(small_squares), "val", 32)
    model.box_scale = 1.0
    _, raw = predict_boxes(model, val, info["mean"], info["std"], torch.device("cpu"))
    assert summary["box_scale"] == fit_box_scale(raw, val.boxes)
    assert summary["val_iou_mean"] == pytest.approx(box_iou(scale_sizes(raw, summary["box_scale"]), val.boxes).mean().item(),
                                                    abs=1e-6)
    assert summary["val_iou_mean"] >= box_iou(raw, val.boxes).mean().item()  # 1 is among the factors tried
    crossed = scale_sizes(raw, cross_fitted_scales(raw, val.boxes, seed=cfg.seed))
    assert summary["val_cross_fitted_iou_mean"] == pytest.approx(box_iou(crossed, val.boxes).mean().item(), abs=1e-6)
    with pytest.raises(VitkitError, match="--box-scale auto fits the factor on validation images"):
        BoxTrainer(resume_config(write_yolo(tmp_path / "no-val", {"train": 40}), box_scale="auto",
                                 val_fraction=0.0), tmp_path / "run")


@pytest.mark.parametrize("head", [{}, dict(box_head="dense", region_pool=True), dict(box_head="dense", zoom=1.2)])
def test_flip_tta_is_saved_with_the_model_and_used_for_the_scale_and_the_figures(small_squares, tmp_path, head):
    cfg = resume_config(small_squares, epochs=2, box_scale="auto", flip_tta=True, head_dropout=0.0, **head)
    summary = train_boxes(cfg, tmp_path, progress=False)
    model, info = load_box_model(tmp_path)
    assert model.flip_tta and info["box_model"]["flip_tta"]
    assert model.region_pool == info["box_model"]["region_pool"] == head.get("region_pool", False)
    assert model.zoom == info["box_model"]["zoom"] == head.get("zoom", 0.0)
    val = load_box_dataset(str(small_squares), "val", 32)
    # Written out with the single-view model: each image and its mirror, the mirror's box reflected back.
    model.flip_tta, model.box_scale = False, 1.0
    x = ((val.images.float() / 255 - torch.tensor(info["mean"])[:, None, None]) / torch.tensor(info["std"])[:, None, None])
    with torch.no_grad():
        (a, box_a), (b, box_b) = model(x), model(x.flip(-1))
    box_b[:, 0] = 1 - box_b[:, 0]
    logits, raw = (a + b) / 2, (box_a + box_b) / 2
    assert summary["box_scale"] == fit_box_scale(raw, val.boxes)
    assert summary["val_accuracy"] == pytest.approx((logits.argmax(1) == val.labels).float().mean().item())
    scaled = scale_sizes(raw, summary["box_scale"])
    assert summary["val_iou_mean"] == pytest.approx(box_iou(scaled, val.boxes).mean().item(), abs=1e-5)


def test_source_size_trains_on_larger_images_and_the_model_takes_them(small_squares, tmp_path):
    cfg = resume_config(small_squares, epochs=1, image_size=16, source_size=32, zoom=1.2, box_head="dense",
                        head_dropout=0.0)
    summary = train_boxes(cfg, tmp_path, progress=False)
    model, info = load_box_model(tmp_path)
    assert info["image_size"] == 32 and summary["image_size"] == 16 and summary["source_size"] == 32
    assert model.view_size == 16 and model.backbone.cfg.image_size == 16 and model.zoom == 1.2
    val = load_box_dataset(str(small_squares), "val", 32)  # the checkpoint's images: 32 pixels
    logits, boxes = predict_boxes(model, val, info["mean"], info["std"], torch.device("cpu"))
    assert summary["val_accuracy"] == pytest.approx((logits.argmax(1) == val.labels).float().mean().item())
    assert summary["val_iou_mean"] == pytest.approx(box_iou(boxes, val.boxes).mean().item(), abs=1e-5)


def resume_config(data, **overrides) -> BoxTrainConfig:
    # Head dropout and every augmentation draw random numbers; plateau adds a scheduler state to restore.
    base = dict(data=str(data), **TINY_VIT, epochs=3, batch_size=32, lr=2e-3, warmup_epochs=1, head_dropout=0.2,
                crop_scale=[0.5, 1.2], hflip=0.5, brightness=0.2, contrast=0.2, schedule="plateau", plateau_patience=0,
                select_by="iou")
    return BoxTrainConfig(**{**base, **overrides})


def stop_in_second_epoch(monkeypatch, cfg, out):
    """Trains `cfg` into `out` until the second epoch, which is interrupted as by Ctrl-C."""
    calls = {"n": 0}
    original = BoxTrainer.train_epoch

    def interrupted(self):
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt
        return original(self)

    monkeypatch.setattr(BoxTrainer, "train_epoch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_boxes(cfg, out, progress=False)
    monkeypatch.setattr(BoxTrainer, "train_epoch", original)


@pytest.mark.parametrize("options", [
    {}, dict(ema=0.9), dict(zoom=1.2), dict(zoom=1.2, zoom_backbone="own", class_epochs=2, schedule="cosine"),
], ids=["plain", "ema", "zoom", "zoom-own"])
def test_a_resumed_run_ends_with_the_same_weights(small_squares, tmp_path, monkeypatch, options):
    straight = tmp_path / "straight"
    train_boxes(resume_config(small_squares, **options), straight, progress=False)
    stopped = tmp_path / "stopped"
    stop_in_second_epoch(monkeypatch, resume_config(small_squares, **options), stopped)
    train_boxes(resume_config(small_squares, **options), stopped, resume=True, progress=False)

    a, b = load_file(str(straight / "last.safetensors")), load_file(str(stopped / "last.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    def figures(run):  # the history without its timings
        rows = [json.loads(line) for line in (run / "history.jsonl").read_text().splitlines()]
        return [{k: v for k, v in r.items() if k not in ("epoch_seconds", "images_per_second")} for r in rows]

    assert figures(straight) == figures(stopped) and len(figures(straight)) == 3


def test_past_class_epochs_the_class_stays_fixed_and_the_box_learns_on(small_squares, tmp_path, monkeypatch):
    options = dict(epochs=3, zoom=1.2, zoom_backbone="own", class_epochs=1, schedule="cosine")
    summary = train_boxes(resume_config(small_squares, **options), tmp_path / "run", progress=False)
    stop_in_second_epoch(monkeypatch, resume_config(small_squares, **options), tmp_path / "one-epoch")
    first = load_file(str(tmp_path / "one-epoch" / "last.safetensors"))  # the weights after epoch 1
    last = load_file(str(tmp_path / "run" / "last.safetensors"))
    start = BoxTrainer(resume_config(small_squares, **options), tmp_path / "unused", progress=False).model.state_dict()
    class_keys = [k for k in last if k.startswith(("zoom_backbone.", "classifier."))]
    box_keys = [k for k in last if k.startswith(("backbone.", "regressor."))]
    assert len(class_keys) + len(box_keys) == len(last) and class_keys and box_keys
    assert all(torch.equal(last[k], first[k]) for k in class_keys)  # fixed since epoch 1 ...
    assert any(not torch.equal(first[k], start[k]) for k in class_keys)  # ... where it had learned
    assert all(not torch.equal(last[k], first[k]) for k in box_keys if k.endswith("weight"))
    # Both backbones started from the same weights; the parameters count twice.
    assert all(torch.equal(start[k], start["zoom_" + k]) for k in start if k.startswith("backbone."))
    assert summary["parameters"] == summary["trainable_parameters"] == sum(v.numel() for v in last.values())
    rows = [json.loads(line) for line in (tmp_path / "run" / "history.jsonl").read_text().splitlines()]
    assert [r["class_lr"] for r in rows] == [0.0, 0.0, 0.0] and rows[1]["lr"] > 0  # the rate after each epoch


@pytest.fixture(scope="module")
def zoom_own_run(small_squares, tmp_path_factory):
    """A finished --zoom-backbone own run (its class learning 1 of 2 epochs), whose box a class stage keeps."""
    out = tmp_path_factory.mktemp("zoom-own")
    cfg = resume_config(small_squares, epochs=2, zoom=1.2, zoom_backbone="own", class_epochs=1, schedule="cosine",
                        ema=0.9, box_scale="auto", box_head="dense", cell_loss=1.0, loss_balance="auto")
    return out, train_boxes(cfg, out, progress=False)


def test_a_class_stage_takes_the_runs_options_with_its_own_defaults(zoom_own_run):
    source, summary = zoom_own_run
    saved = json.loads((source / "config.json").read_text())
    cfg = class_stage_config({"class_from": str(source)})
    # RUN's --class-epochs as --epochs, the last epoch kept, RUN's measured C; every other option RUN's.
    assert (cfg.epochs, cfg.class_epochs, cfg.select_by) == (1, None, "last")
    assert float(cfg.loss_balance) == summary["loss_balance"] and saved["loss_balance"] == "auto"
    changed = {"epochs", "class_epochs", "select_by", "loss_balance", "class_from"}
    assert {k: v for k, v in cfg.to_dict().items() if k not in changed} == {
        k: v for k, v in saved.items() if k not in changed}
    assert class_stage_config({"class_from": str(source), "epochs": 3, "select_by": "accuracy"}).epochs == 3
    with pytest.raises(VitkitError, match="--class-from takes the folder of a finished"):
        class_stage_config({"class_from": str(source / "nope")})
    with pytest.raises(VitkitError, match="--class-from trains the class on the zoom's own backbone"):
        class_stage_config({"class_from": str(source), "zoom_backbone": "shared"})


def test_a_class_stage_keeps_the_runs_box_and_trains_the_class_from_its_box_backbone(zoom_own_run, tmp_path):
    source, source_summary = zoom_own_run
    trained = load_file(str(source / "best.safetensors"))
    cfg = class_stage_config({"class_from": str(source), "epochs": 2})
    trainer = BoxTrainer(cfg, tmp_path / "stage", progress=False)
    fresh = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.start_from_box_of(source)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    box_keys = [k for k in start if k.startswith(BOX_PARTS)]
    class_keys = [k for k in start if k.startswith(CLASS_PARTS)]
    assert len(box_keys) + len(class_keys) == len(start) and box_keys and class_keys
    # The run's box, its first backbone copied into the zoom's, the classifier as initialised.
    assert all(torch.equal(start[k], trained[k]) for k in box_keys)
    assert all(torch.equal(start["zoom_" + k], trained[k]) for k in box_keys if k.startswith("backbone."))
    assert all(torch.equal(start[k], fresh[k]) for k in start if k.startswith("classifier."))
    assert trainer.trainable_parameters == sum(start[k].numel() for k in class_keys)

    summary = trainer.fit()
    for name in ("best", "last"):  # --select-by last: best is the last epoch's
        weights = load_file(str(tmp_path / "stage" / f"{name}.safetensors"))
        assert all(torch.equal(weights[k], trained[k]) for k in box_keys), name  # the EMA's box too: bit for bit
        assert all(not torch.equal(weights[k], start[k]) for k in class_keys if k.endswith("weight")), name
    assert summary["best_epoch"] == 2 and summary["class_from"] == str(source)
    # The same boxes: the same box scale and IoU figures; the accuracy is the new class's.
    for key in ("box_scale", "val_iou_mean", "val_iou90", "val_cross_fitted_iou_mean"):
        assert summary[key] == source_summary[key], key
    model, _ = load_box_model(tmp_path / "stage")
    assert model.zoom_backbone is not None and model.box_scale == source_summary["box_scale"]


def test_a_resumed_class_stage_ends_with_the_same_weights(zoom_own_run, tmp_path, monkeypatch):
    source, _ = zoom_own_run
    cfg = class_stage_config({"class_from": str(source), "epochs": 3})
    train_boxes(cfg, tmp_path / "straight", progress=False)
    stop_in_second_epoch(monkeypatch, cfg, tmp_path / "stopped")
    train_boxes(cfg, tmp_path / "stopped", resume=True, progress=False)
    a, b = (load_file(str(tmp_path / run / "last.safetensors")) for run in ("straight", "stopped"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_class_stage_refuses_a_run_whose_box_differs(zoom_own_run, tmp_path):
    source, _ = zoom_own_run
    with pytest.raises(VitkitError, match="box head of .* differs from this run's"):
        train_boxes(class_stage_config({"class_from": str(source), "hidden": 32}), tmp_path / "stage", progress=False)


def test_layer_decay_scales_the_zoom_backbone_as_the_first(small_squares, tmp_path):
    cfg = resume_config(small_squares, layer_decay=0.5, zoom=1.2, zoom_backbone="own")
    trainer = BoxTrainer(cfg, tmp_path, progress=False)
    lr = {id(p): g["initial_lr"] for g in trainer.optimizer.param_groups for p in g["params"]}
    names = dict(trainer.model.named_parameters())
    twins = [n for n in names if n.startswith("backbone.")]
    assert twins and all(lr[id(names[n])] == lr[id(names["zoom_" + n])] for n in twins)
    assert lr[id(names["zoom_backbone.blocks.0.mlp.fc1.weight"])] == pytest.approx(2e-3 * 0.5**2)


def test_ema_checkpoints_hold_the_average_of_the_weights_after_every_step(small_squares, tmp_path):
    """Replayed by hand: the run without EMA takes the same steps (the average draws no random numbers); recording
    its weights after each step and averaging them gives the EMA run's checkpoint, and the trained model itself
    ends where the run without EMA does."""
    decay = 0.8
    plain = BoxTrainer(resume_config(small_squares, epochs=2), tmp_path / "plain", progress=False)
    average = {k: v.clone() for k, v in plain.model.state_dict().items()}
    steps = []

    def record(optimizer, args, kwargs):
        steps.append(1)
        for k, v in plain.model.state_dict().items():
            average[k] = decay * average[k] + (1 - decay) * v if v.dtype.is_floating_point else v.clone()

    plain.optimizer.register_step_post_hook(record)
    plain.fit()
    averaged = BoxTrainer(resume_config(small_squares, epochs=2, ema=decay), tmp_path / "ema", progress=False)
    averaged.fit()
    saved = load_file(str(tmp_path / "ema" / "last.safetensors"))
    assert len(steps) == 2 * len(plain.loader) and saved.keys() == average.keys()
    assert all(torch.allclose(saved[k], average[k], atol=1e-6) for k in saved)
    assert all(torch.equal(a, b) for a, b in zip(plain.model.state_dict().values(),
                                                 averaged.model.state_dict().values()))
    assert not torch.equal(saved["regressor.3.weight"], averaged.model.state_dict()["regressor.3.weight"])
    # Validation scored the average too: the last epoch's figures are those of the last checkpoint.
    model, info = load_box_model(tmp_path / "ema" / "last.safetensors")
    val = evaluate_box_model(model, info, averaged.data.val, "", torch.device("cpu"))
    assert averaged.history[-1]["val_iou_mean"] == pytest.approx(val["iou_mean"], abs=1e-6)


@pytest.mark.parametrize("kind, read_out", [("mse", {}), ("giou", {}),
                                             ("mse", {"flip_tta": True, "box_scale": "0.9"})])
def test_auto_balance_starts_both_terms_equal(small_squares, tmp_path, kind, read_out):
    # The terms as training computes them: train mode (no dropout here), where neither the mirror averaging nor
    # the box scale of the evaluation applies.
    trainer = BoxTrainer(resume_config(small_squares, box_loss=kind, head_dropout=0.0, **read_out), tmp_path)
    balance = measure_loss_balance(trainer.model, trainer.loader, kind, 2, trainer.device)
    assert trainer.model.training and trainer.model.box_scale == float(read_out.get("box_scale", 1))
    trainer.loader.set_epoch(0)
    terms = torch.zeros(2)
    with torch.no_grad():
        for _, (x, y, b) in zip(range(2), trainer.loader):
            _, ce, bl = task_loss(*trainer.model(x), y, b, balance, kind)
            terms += torch.stack([ce / balance, bl])
    assert terms[0].item() == pytest.approx(terms[1].item(), rel=1e-5)
    assert balance > 1  # the cross-entropy of 3 classes (about 1.1) is larger than either box loss at the start


def test_box_losses():
    g = torch.Generator().manual_seed(0)
    pred, true = torch.rand(16, 4, generator=g) * 0.5 + 0.25, torch.rand(16, 4, generator=g) * 0.5 + 0.25
    assert box_loss(pred, true, "mse") == pytest.approx(F.mse_loss(pred, true).item())
    assert box_loss(pred, true, "smooth_l1") == pytest.approx(F.smooth_l1_loss(pred, true, beta=SMOOTH_L1_BETA).item())
    reference = 1 - ops.generalized_box_iou(cxcywh_to_xyxy(pred), cxcywh_to_xyxy(true)).diagonal().mean()
    assert box_loss(pred, true, "giou") == pytest.approx(reference.item(), rel=1e-5)
    assert box_loss(true, true, "giou").item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(VitkitError, match="unknown box loss"):
        box_loss(pred, true, "l3")


def test_task_loss_smooths_the_labels_of_its_cross_entropy_only():
    g = torch.Generator().manual_seed(0)
    logits, labels = 5 * torch.randn(8, 5, generator=g), torch.randint(0, 5, (8,), generator=g)
    pred, true = torch.rand(8, 4, generator=g), torch.rand(8, 4, generator=g)
    loss, ce, bl = task_loss(logits, pred, labels, true, 4.0, "mse", label_smoothing=0.1)
    # Smoothed CE written out: 0.9 × CE of the label + 0.1 × mean CE over all classes.
    log_p = logits.log_softmax(1)
    smoothed = (-0.9 * log_p[torch.arange(8), labels] - 0.1 * log_p.mean(1)).mean()
    assert ce.item() == pytest.approx(smoothed.item(), rel=1e-5)
    assert abs(ce - F.cross_entropy(logits, labels)) > 0.01  # the smoothing did something
    assert bl.item() == pytest.approx(F.mse_loss(pred, true).item())
    assert loss.item() == pytest.approx((ce / 4 + bl).item())


def test_per_box_losses():
    g = torch.Generator().manual_seed(0)
    pred, true = torch.rand(3, 5, 4, generator=g) * 0.5 + 0.25, torch.rand(3, 5, 4, generator=g) * 0.5 + 0.25
    assert torch.allclose(box_losses(pred, true, "mse"), F.mse_loss(pred, true, reduction="none").mean(-1))
    assert torch.allclose(box_losses(pred, true, "smooth_l1"),
                          F.smooth_l1_loss(pred, true, beta=SMOOTH_L1_BETA, reduction="none").mean(-1))
    flat = ops.generalized_box_iou(cxcywh_to_xyxy(pred.flatten(0, 1)), cxcywh_to_xyxy(true.flatten(0, 1))).diagonal()
    assert torch.allclose(box_losses(pred, true, "giou"), 1 - flat.view(3, 5), atol=1e-6)


@pytest.mark.parametrize("kind", ["mse", "smooth_l1", "giou"])
def test_dense_cell_loss_averages_over_the_cells_inside_each_true_box(kind):
    g = torch.Generator().manual_seed(1)
    rows, cols = 4, 6
    centres = torch.tensor([[(c + 0.5) / cols, (r + 0.5) / rows] for r in range(rows) for c in range(cols)])
    corners = torch.rand(3, rows * cols, 2, generator=g) * 0.5
    edges = torch.cat([corners, corners + 0.2 + torch.rand(3, rows * cols, 2, generator=g) * 0.3], dim=-1)
    true = torch.tensor([[0.5, 0.5, 0.6, 0.4], [0.2, 0.3, 0.3, 0.5], [0.9, 0.9, 0.05, 0.05]])  # the last: no cell
    losses = []
    for image in range(3):  # written out: each cell whose centre is strictly inside the box, as its own prediction
        x1, y1, x2, y2 = cxcywh_to_xyxy(true[image]).tolist()
        for cell, (cx, cy) in enumerate(centres.tolist()):
            if x1 < cx < x2 and y1 < cy < y2:
                a, b, c, d = edges[image, cell].tolist()
                own = torch.tensor([[(a + c) / 2, (b + d) / 2, c - a, d - b]])
                losses.append(box_loss(own, true[image : image + 1], kind))
    assert len(losses) == 8 + 4  # 4 columns × 2 rows of cell centres in the first box, 2 × 2 in the second
    expected = torch.stack(losses).mean()
    assert dense_cell_loss(edges, centres, true, kind).item() == pytest.approx(expected.item(), rel=1e-5)
    assert dense_cell_loss(edges[2:], centres, true[2:], kind).item() == 0.0  # no cell inside: no loss, no NaN


def test_a_step_trains_the_weighted_cell_loss_and_the_smoothed_labels(small_squares, tmp_path):
    """Replayed by hand: with a learning rate too small to move the weights, the first epoch's logged figures are
    those of the initial model on the loader's batches: CE with the smoothing, C measured with it too, and
    train_loss = CE / C + box loss + λ × cell loss."""
    cfg = resume_config(small_squares, box_head="dense", cell_loss=2.5, label_smoothing=0.2, head_dropout=0.0,
                        epochs=1, lr=1e-12, schedule="cosine", warmup_epochs=0)
    trainer = BoxTrainer(cfg, tmp_path, progress=False)
    initial = copy.deepcopy(trainer.model)
    trainer.fit()
    balance = measure_loss_balance(initial, trainer.train_loader(cfg.batch_size), "mse", cfg.balance_batches,
                                   trainer.device, label_smoothing=0.2)
    assert trainer.balance == pytest.approx(balance, rel=1e-6)
    sums, seen = torch.zeros(4), 0
    loader = trainer.train_loader(cfg.batch_size)
    loader.set_epoch(0)
    with torch.no_grad():
        for x, y, b in loader:
            logits, pred, edges, centres = initial.train()(x, cells=True)
            ce = F.cross_entropy(logits, y, label_smoothing=0.2)
            bl, cl = F.mse_loss(pred, b), dense_cell_loss(edges, centres, b, "mse")
            sums += len(x) * torch.stack([ce / balance + bl + 2.5 * cl, ce, bl, cl])
            seen += len(x)
    logged = trainer.history[0]
    for key, value in zip(("train_loss", "train_ce", "train_box_loss", "train_cell_loss"), sums / seen):
        assert logged[key] == pytest.approx(value.item(), rel=1e-4), key


def test_the_cell_loss_trains_every_cell_to_give_the_box(small_squares, tmp_path):
    """Without it only the weighted mean of the cells' edges is fitted; with it each cell inside the box gives
    the box on its own (the per-cell error falls several-fold)."""
    errors = {}
    for weight in (0.0, 1.0):
        cfg = resume_config(small_squares, box_head="dense", cell_loss=weight, head_dropout=0.0, epochs=8,
                            schedule="cosine", hflip=0.0, crop_scale=None)
        trainer = BoxTrainer(cfg, tmp_path / str(weight), progress=False)
        trainer.fit()
        trainer.model.eval()
        x, _, b = next(iter(trainer.train_loader(64)))
        with torch.no_grad():
            _, _, edges, centres = trainer.model(x, cells=True)
        errors[weight] = dense_cell_loss(edges, centres, b, "mse").item()
        logged = [row.get("train_cell_loss") for row in trainer.history]
        assert logged[-1] < logged[0] / 3 if weight else logged == [None] * cfg.epochs  # logged where it is trained
    assert errors[1.0] < errors[0.0] / 3, errors


@pytest.mark.parametrize("box_head,ema", [("mlp", 0.0), ("dense", 0.9)])
def test_a_resnet18_backbone_trains_and_reloads(small_squares, tmp_path, box_head, ema):
    cfg = BoxTrainConfig(data=str(small_squares), backbone="resnet18", image_size=32, device="cpu", epochs=1,
                         batch_size=32, loss_balance="5", box_loss="smooth_l1", box_head=box_head, ema=ema)
    summary = train_boxes(cfg, tmp_path, progress=False)
    assert summary["loss_balance"] == 5.0 and 0 <= summary["val_iou_mean"] <= 1
    model, info = load_box_model(tmp_path)
    assert info["box_model"]["backbone"] == "resnet18" and info["arch"] == "box-resnet18"
    assert info["box_model"]["box_head"] == box_head
    # Batch norm's running statistics start at 0 and are averaged (or copied) with the weights.
    assert load_file(str(tmp_path / "last.safetensors"))["backbone.bn1.running_mean"].abs().sum() > 0


@pytest.mark.parametrize("options,message", [
    (dict(freeze_blocks=6), "--freeze-blocks keeps pre-trained ViT blocks fixed"),
    (dict(backbone="resnet18", dim=64), "--dim shape a ViT trained from scratch"),
    (dict(box_loss="l1"), "unknown box loss"),
    (dict(box_head="fcos"), "unknown box head"),
    (dict(ema=1.0), "--ema must lie in"),
    (dict(box_scale="big"), "--box-scale 'big' is neither auto nor a positive number"),
    (dict(box_head="dense", sigmoid=False), "--no-sigmoid applies to the mlp box head"),
    (dict(cell_loss=1.0), "--cell-loss trains the dense head's cells"),
    (dict(region_pool=True), "--region-pool pools the features where the dense box head looks"),
    (dict(flip_tta=True), "--flip-tta averages each image with its mirror"),
    (dict(zoom=0.9), "--zoom 0.9 would crop the object"),
    (dict(source_size=448), "--source-size is where --zoom cuts its crops from"),
    (dict(zoom=1.2, source_size=112), "--source-size is where --zoom cuts its crops from"),
    (dict(box_head="dense", region_pool=True, zoom=1.2), "--zoom classifies a crop around the box, --region-pool"),
    (dict(zoom=1.2, zoom_backbone="twin"), "unknown --zoom-backbone 'twin'"),
    (dict(zoom_backbone="own"), "--zoom-backbone own gives the zoom's second pass a backbone of its own"),
    (dict(zoom=1.2, class_epochs=5), "--class-epochs stops the class's own backbone learning early"),
    (dict(zoom=1.2, zoom_backbone="own", epochs=10, class_epochs=11), "pass 1 to --epochs 10"),
    (dict(zoom=1.2, zoom_backbone="own", class_epochs=5, schedule="plateau"), "--schedule plateau would override"),
    (dict(zoom=1.2, class_from="run"), "--class-from trains the class on the zoom's own backbone"),
    (dict(zoom=1.2, zoom_backbone="own", class_from="run", class_epochs=5), "without --class-epochs"),
    (dict(label_smoothing=1.0), "--label-smoothing must lie in"),
    (dict(box_head="dense", cell_loss=-1.0), "--cell-loss must be 0"),
    (dict(loss_balance="-1"), "neither auto nor a positive number"),
    (dict(schedule="step"), "unknown schedule"),
    (dict(crop_scale=[0.9, 0.1]), "crop scale"),
    (dict(select_by="loss"), "unknown --select-by"),
    (dict(layer_decay=0.0), "--layer-decay must lie in"),
    (dict(drop_path=1.0), "--drop-path must lie in"),
    (dict(backbone="resnet18", layer_decay=0.75), "apply to ViT backbones"),
])
def test_bad_options_are_user_errors(options, message):
    with pytest.raises(VitkitError, match=message):
        BoxTrainConfig(data="x", **options)
    with pytest.raises(VitkitError, match="--data is required"):
        BoxTrainConfig()


def test_layer_decay_scales_the_backbone_blocks_and_keeps_the_heads_at_the_peak_rate(small_squares, tmp_path):
    cfg = resume_config(small_squares, layer_decay=0.5, drop_path=0.2, lr=0.1)  # TINY_VIT: 2 blocks
    trainer = BoxTrainer(cfg, tmp_path, progress=False)
    lr = {id(p): g["initial_lr"] for g in trainer.optimizer.param_groups for p in g["params"]}  # before warmup
    names = dict(trainer.model.named_parameters())
    assert len(lr) == len(names)
    for name, p in names.items():  # the rate BEiT's rule gives each layer, written out by hand
        if name.startswith(("classifier.", "regressor.", "backbone.norm.")):
            expected = 0.1
        elif name.startswith("backbone.blocks."):
            expected = 0.1 * 0.5 ** (2 - int(name.split(".")[2]))
        else:  # patch and position embeddings, class token
            expected = 0.1 * 0.5**3
        assert lr[id(p)] == pytest.approx(expected), name
    rates = [block.drop_path.p for block in trainer.model.backbone.blocks]
    assert rates == pytest.approx([0.0, 0.2])  # stochastic depth rises to --drop-path at the last block


@pytest.mark.parametrize("cpu_bf16", [False, True])
def test_cpu_bf16_trains_the_backbone_in_bfloat16_and_the_heads_in_float32(small_squares, tmp_path, cpu_bf16):
    trainer = BoxTrainer(resume_config(small_squares, epochs=1, cpu_bf16=cpu_bf16), tmp_path, progress=False)
    seen = []  # (training?, backbone block dtype, box head dtype) at each forward
    trainer.model.backbone.blocks[0].mlp.register_forward_hook(lambda m, i, out: seen.append(("block", m.training, out.dtype)))
    trainer.model.regressor.register_forward_hook(lambda m, i, out: seen.append(("head", m.training, out.dtype)))
    trainer.fit()
    trained = {(where, dtype) for where, training, dtype in seen if training}
    assert trained == {("block", torch.bfloat16 if cpu_bf16 else torch.float32), ("head", torch.float32)}
    assert {dtype for _, training, dtype in seen if not training} == {torch.float32}
    with pytest.raises(VitkitError, match="--cpu-bf16 extends --bf16"):
        resume_config(small_squares, bf16=False, cpu_bf16=True)
