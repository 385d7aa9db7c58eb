"""Figures are written as valid PNGs, atomically; the confusion matrix counts correctly."""

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.errors import VitkitError
from vitkit.plots import (
    confusion_matrix,
    plot_adversarial_examples,
    plot_box_predictions,
    plot_certified_accuracy,
    plot_confusion_matrix,
    plot_explanations,
    plot_learning_curves,
    plot_prediction_grid,
    plot_robustness,
)

CLASSES = [f"class {i}" for i in range(10)]


def assert_png(path):
    assert path.stat().st_size > 0
    with Image.open(path) as img:
        assert img.format == "PNG"
        assert img.width > 0 and img.height > 0
    # Only the figure itself: the temporary file was renamed over it.
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_learning_curves_with_and_without_validation(tmp_path):
    history = [
        {"epoch": e, "train_loss": 2.0 / e, "train_accuracy": 0.1 * e, "lr": 1e-3,
         "val_loss": 2.2 / e if e % 2 == 0 else None, "val_accuracy": 0.09 * e if e % 2 == 0 else None}
        for e in range(1, 6)
    ]
    history[0].pop("val_loss")
    plot_learning_curves(history, tmp_path / "curves.png")
    assert_png(tmp_path / "curves.png")


def test_learning_curves_reject_empty_history(tmp_path):
    with pytest.raises(VitkitError, match="empty"):
        plot_learning_curves([], tmp_path / "curves.png")


def test_confusion_matrix_equals_a_double_loop():
    g = torch.Generator().manual_seed(0)
    true, pred = torch.randint(0, 7, (500,), generator=g), torch.randint(0, 7, (500,), generator=g)
    expected = np.zeros((7, 7), dtype=np.int64)
    for t, p in zip(true.tolist(), pred.tolist()):
        expected[t, p] += 1
    np.testing.assert_array_equal(confusion_matrix(true, pred, 7), expected)


def test_confusion_matrix_rejects_labels_out_of_range():
    with pytest.raises(VitkitError, match="0..classes-1"):
        confusion_matrix(torch.tensor([0, 3]), torch.tensor([0, 1]), 3)


@pytest.mark.parametrize("normalize", [True, False])
def test_plot_confusion_matrix(tmp_path, normalize):
    cm = confusion_matrix(torch.randint(0, 10, (200,)), torch.randint(0, 10, (200,)), 10)
    cm[3] = 0  # a class absent from the data must not break normalisation
    plot_confusion_matrix(cm, CLASSES, tmp_path / "cm.png", normalize=normalize)
    assert_png(tmp_path / "cm.png")


def test_plot_confusion_matrix_checks_class_names(tmp_path):
    with pytest.raises(VitkitError, match="class names"):
        plot_confusion_matrix(np.zeros((3, 3)), CLASSES, tmp_path / "cm.png")


@pytest.mark.parametrize(
    "images",
    [torch.randint(0, 256, (11, 3, 32, 32), dtype=torch.uint8), torch.rand(5, 1, 8, 8)],
    ids=["rgb-uint8", "grey-float"],
)
def test_prediction_grid(tmp_path, images):
    n = images.shape[0]
    true = [i % 10 for i in range(n)]
    pred = [t if i % 3 else (t + 1) % 10 for i, t in enumerate(true)]  # every third one wrong
    plot_prediction_grid(images, true, pred, CLASSES, tmp_path / "grid.png", probs=[0.5] * n)
    assert_png(tmp_path / "grid.png")


def test_prediction_grid_checks_lengths(tmp_path):
    with pytest.raises(VitkitError, match="as many"):
        plot_prediction_grid(torch.rand(3, 3, 8, 8), [0, 1], [0, 1, 2], CLASSES, tmp_path / "grid.png")
    with pytest.raises(VitkitError, match="class names"):
        plot_prediction_grid(torch.rand(2, 3, 8, 8), [0, 1], [0, 12], CLASSES, tmp_path / "grid.png")


def test_failed_write_leaves_no_temporary_file(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    def broken_savefig(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", broken_savefig)
    with pytest.raises(OSError):
        plot_confusion_matrix(np.eye(2), ["a", "b"], tmp_path / "cm.png")
    assert list(tmp_path.iterdir()) == []


def test_certified_accuracy_and_robustness_curves(tmp_path):
    plot_certified_accuracy([1, 2, 3], [0.5, 0.4, 0.3], 0.6, 0.55, "column ablation, b=4", tmp_path / "a" / "cert.png")
    assert_png(tmp_path / "a" / "cert.png")
    plot_robustness([0, 2 / 255, 8 / 255], [0.9, 0.5, 0.1], tmp_path / "b" / "robust.png", title="pgd")
    assert_png(tmp_path / "b" / "robust.png")


@pytest.mark.parametrize("channels", [1, 3])
def test_adversarial_examples(tmp_path, channels):
    clean = torch.rand(2, channels, 8, 8)
    adversarial = (clean + 0.03 * torch.randn_like(clean)).clamp(0, 1)
    titles = [("cat (90%)", "perturbation", "dog (60%)")] * 2
    plot_adversarial_examples(clean, adversarial, titles, [True, False], tmp_path / "examples.png")
    assert_png(tmp_path / "examples.png")


def count_colour(path, rgb, tolerance=40):
    with Image.open(path) as img:
        pixels = np.asarray(img.convert("RGB"), dtype=int)
    return int((np.abs(pixels - np.array(rgb)).max(axis=-1) < tolerance).sum())


def test_box_predictions_draw_the_true_box_only_where_it_is_known(tmp_path):
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)  # black: only the boxes and titles are coloured
    pred = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.3, 0.6, 0.4, 0.2]])
    true = torch.tensor([[0.4, 0.5, 0.3, 0.6], [0.6, 0.4, 0.2, 0.4]])
    sky_blue, orange = (0, 191, 255), (255, 165, 0)
    plot_box_predictions(images, true, pred, [0, 1], [0, 2], CLASSES, tmp_path / "known" / "boxes.png", ious=[0.5, 0.1])
    plot_box_predictions(images, None, pred, None, [0, 2], CLASSES, tmp_path / "new" / "boxes.png", probs=[0.9, 0.6])
    assert_png(tmp_path / "known" / "boxes.png")
    assert_png(tmp_path / "new" / "boxes.png")
    assert count_colour(tmp_path / "known" / "boxes.png", sky_blue) > 50
    assert count_colour(tmp_path / "new" / "boxes.png", sky_blue) == 0
    assert count_colour(tmp_path / "new" / "boxes.png", orange) > 50
    with pytest.raises(VitkitError, match="neither"):
        plot_box_predictions(images, true, pred, None, [0, 2], CLASSES, tmp_path / "bad.png")


def test_explanations_draw_the_predicted_boxes_where_given(tmp_path):
    images = torch.zeros(2, 3, 32, 32, dtype=torch.uint8)  # black, under zero relevance (jet's dark blue)
    maps = torch.zeros(2, 32, 32)
    orange = (255, 165, 0)
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.5], [0.3, 0.6, 0.4, 0.2]])
    plot_explanations(images, maps, ["a", "b"], [True, False], tmp_path / "plain.png")
    plot_explanations(images, maps, ["a", "b"], [True, False], tmp_path / "boxes.png", boxes=boxes)
    assert count_colour(tmp_path / "plain.png", orange) == 0
    assert count_colour(tmp_path / "boxes.png", orange) > 100
