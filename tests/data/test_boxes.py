"""Box data: IoU/GIoU against torchvision, box-aware augmentation, and the YOLO, archive and CSV readers."""

import io
import tarfile

import numpy as np
import pytest
import torch
import torchvision.ops as ops
from conftest import SHARED
from PIL import Image
from synthetic_boxes import COLOURS, square_images, write_yolo

from vitkit.data.box_augment import BoxAugment, BoxAugmentConfig, BoxLoader
from vitkit.data.boxes import (
    MissingSplit, box_iou, cxcywh_to_xyxy, generalized_box_iou, load_box_dataset, square_crops, xyxy_to_cxcywh,
)
from vitkit.errors import VitkitError

ASL = SHARED / "datasets" / "asl-letters.tar.gz"


def random_boxes(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    wh = 0.05 + 0.6 * torch.rand(n, 2, generator=g, dtype=torch.float64)
    centre = torch.rand(n, 2, generator=g, dtype=torch.float64)
    return torch.cat([centre, wh], dim=1)


def test_iou_and_giou_match_torchvision():
    a, b = random_boxes(500, 0), random_boxes(500, 1)
    b[:50] = a[:50] + 0.01  # some heavily overlapping pairs too
    xa, xb = cxcywh_to_xyxy(a), cxcywh_to_xyxy(b)
    assert torch.allclose(box_iou(a, b), ops.box_iou(xa, xb).diagonal(), atol=1e-12)
    assert torch.allclose(generalized_box_iou(a, b), ops.generalized_box_iou(xa, xb).diagonal(), atol=1e-12)
    assert torch.allclose(xyxy_to_cxcywh(xa), a, atol=1e-12)


def test_iou_and_giou_on_hand_made_boxes():
    # xyxy: identical; half-overlapping (IoU 1/3); side by side with a gap (enclosing 3, union 2).
    a = xyxy_to_cxcywh(torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0], [0.0, 0.0, 1.0, 1.0]]))
    b = xyxy_to_cxcywh(torch.tensor([[0.0, 0.0, 1.0, 1.0], [0.5, 0.0, 1.5, 1.0], [2.0, 0.0, 3.0, 1.0]]))
    assert torch.allclose(box_iou(a, b), torch.tensor([1.0, 1 / 3, 0.0]))
    assert torch.allclose(generalized_box_iou(a, b), torch.tensor([1.0, 1 / 3, -1 / 3]))


def bright_rectangles(n: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Black images with a white rectangle on whole pixels, and its box."""
    g = torch.Generator().manual_seed(seed)
    x0, y0 = torch.randint(0, size - 4, (2, n), generator=g)
    w = torch.minimum(torch.randint(3, size, (n,), generator=g), size - x0)
    h = torch.minimum(torch.randint(3, size, (n,), generator=g), size - y0)
    cols, rows = torch.arange(size)[None, None, :], torch.arange(size)[None, :, None]
    inside = (cols >= x0[:, None, None]) & (cols < (x0 + w)[:, None, None])
    inside = inside & (rows >= y0[:, None, None]) & (rows < (y0 + h)[:, None, None])
    images = inside[:, None].expand(-1, 3, -1, -1).float()
    boxes = torch.stack([x0 + w / 2, y0 + h / 2, w, h], dim=1).float() / size
    return images, boxes


def test_square_crops_are_the_pixels_of_the_square_around_each_box():
    images = torch.randn(3, 2, 16, 16, dtype=torch.float64)
    # Squares that fall on whole pixels, cropped at their own pixel size: no resampling, the very pixels. Image 0:
    # a 0.5-wide square centred at (0.5, 0.5) = pixels 4..11; image 1: a tall box, its 0.25 height (×2 margin)
    # sets the square, centred at (0.375, 0.625) = columns 2..9, rows 6..13; image 2 half outside the image.
    boxes = torch.tensor([[0.5, 0.5, 0.5, 0.3], [0.375, 0.625, 0.1, 0.25], [0.0, 0.25, 0.25, 0.5]],
                         dtype=torch.float64)
    margins = torch.tensor([1.0, 2.0, 1.0], dtype=torch.float64)
    crops = [square_crops(images[i:i + 1], boxes[i:i + 1], float(margins[i]), 8)[0] for i in range(3)]
    torch.testing.assert_close(crops[0], images[0, :, 4:12, 4:12])
    torch.testing.assert_close(crops[1], images[1, :, 6:14, 2:10])
    torch.testing.assert_close(crops[2][:, :, 4:], images[2, :, 0:8, 0:4])  # columns -4..3: the left half is 0
    assert not crops[2][:, :, :4].any()
    # Upsampled ×2 (16 pixels for 8): bilinear interpolation of those pixels, away from the crop's border.
    big = square_crops(images[:1], boxes[:1], 1.0, 16)[0]
    upsampled = torch.nn.functional.interpolate(images[:1, :, 4:12, 4:12], scale_factor=2, mode="bilinear")[0]
    torch.testing.assert_close(big[:, 1:-1, 1:-1], upsampled[:, 1:-1, 1:-1])
    # The batch in one call: each image with its own box (one margin for all).
    torch.testing.assert_close(square_crops(images[:2], torch.stack([boxes[0], boxes[0]]), 1.0, 8),
                               torch.stack([crops[0], images[1, :, 4:12, 4:12]]))


@pytest.mark.parametrize("scale", [(0.2, 1.0), (0.5, 2.0)], ids=["crop", "zoom-out"])
def test_augmented_box_encloses_the_moved_pixels(scale):
    size = 48
    images, boxes = bright_rectangles(256, size, seed=3)
    augment = BoxAugment(BoxAugmentConfig(hflip=0.5, crop_scale=scale, crop_ratio=(0.5, 2.0)))
    x, moved = augment(images, boxes, torch.Generator().manual_seed(0))
    x1, y1, x2, y2 = cxcywh_to_xyxy(moved).unbind(1)
    eps = 1e-6  # (cx, cy, w, h) → corners rounds
    assert ((moved[:, 2:] > 0).all(1) & (x1 >= -eps) & (y1 >= -eps) & (x2 <= 1 + eps) & (y2 <= 1 + eps)).all()
    bright = x.mean(1) > 0.5
    assert bright.flatten(1).any(1).all()  # the box's content never leaves the picture
    centres = (torch.arange(size) + 0.5) / size
    cols = centres[None, None, :].expand_as(bright)
    rows = centres[None, :, None].expand_as(bright)
    inf = torch.tensor(float("inf"))
    seen = torch.stack([torch.where(bright, cols, inf).amin((1, 2)), torch.where(bright, rows, inf).amin((1, 2)),
                        torch.where(bright, cols, -inf).amax((1, 2)), torch.where(bright, rows, -inf).amax((1, 2))], 1)
    pixel = 1 / size
    # Every bright pixel lies in the box, and the box is no more than about a pixel larger than the bright area
    # (bilinear resampling blurs the edge by up to a pixel).
    assert (seen[:, :2] >= torch.stack([x1, y1], 1) - 0.6 * pixel).all()
    assert (seen[:, 2:] <= torch.stack([x2, y2], 1) + 0.6 * pixel).all()
    assert torch.allclose(seen, torch.stack([x1, y1, x2, y2], 1), atol=1.6 * pixel)
    # The windows really vary: the boxes moved, and about half the images were flipped.
    assert (moved - boxes).abs().max() > 0.2


def test_flip_mirrors_the_box_and_colour_jitter_leaves_it():
    images, boxes = bright_rectangles(64, 16, seed=1)
    x, moved = BoxAugment(BoxAugmentConfig(hflip=1.0))(images, boxes, torch.Generator().manual_seed(0))
    assert torch.equal(x, images.flip(-1))
    assert torch.allclose(moved, boxes * torch.tensor([-1, 1, 1, 1]) + torch.tensor([1, 0, 0, 0]))
    jitter = BoxAugment(BoxAugmentConfig(brightness=0.4, contrast=0.4, saturation=0.4))
    x, same = jitter(images, boxes, torch.Generator().manual_seed(0))
    assert torch.equal(same, boxes) and not torch.equal(x, images) and 0 <= x.min() and x.max() <= 1
    assert BoxAugmentConfig().hflip == 0  # signs: no mirror unless asked


def test_augmentation_is_a_function_of_the_generator_seed():
    images, boxes = bright_rectangles(32, 24, seed=2)
    augment = BoxAugment(BoxAugmentConfig(hflip=0.5, crop_scale=(0.3, 1.2), brightness=0.3, contrast=0.3))
    a = augment(images, boxes, torch.Generator().manual_seed(7))
    b = augment(images, boxes, torch.Generator().manual_seed(7))
    c = augment(images, boxes, torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and not torch.equal(a[1], c[1])


def test_augment_options_are_checked():
    with pytest.raises(VitkitError, match="flip probability"):
        BoxAugmentConfig(hflip=1.5)
    with pytest.raises(VitkitError, match="crop scale"):
        BoxAugmentConfig(crop_scale=(0.9, 0.5))


def make_yolo(tmp_path, counts=None):
    return write_yolo(tmp_path / "squares", counts or {"train": 6, "valid": 3, "test": 3}, size=16)


def test_yolo_folder_and_archive_read_the_same_boxes(tmp_path):
    root = make_yolo(tmp_path)
    archive = tmp_path / "squares.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(root, arcname="squares")
    images, labels, boxes = square_images(6, 16, 0)
    for source in (root, archive):
        ds = load_box_dataset(str(source), "train")
        assert ds.classes == list(COLOURS) and ds.name == "squares" and ds.skipped == 0
        assert torch.equal(ds.images, torch.from_numpy(images).permute(0, 3, 1, 2))
        assert torch.equal(ds.labels, torch.from_numpy(labels))
        assert torch.allclose(ds.boxes, torch.from_numpy(boxes), atol=1e-6)
        assert len(load_box_dataset(str(source), "val")) == 3 and len(load_box_dataset(str(source), "test")) == 3
        # The split also goes by its folder's name.
        assert torch.equal(load_box_dataset(str(source), "valid").boxes, load_box_dataset(str(source), "val").boxes)
        resized = load_box_dataset(str(source), "train", image_size=8)
        assert resized.images.shape == (6, 3, 8, 8) and torch.equal(resized.boxes, ds.boxes)
    sub = ds.subset(torch.tensor([0, 2]))
    assert len(sub) == 2 and torch.equal(sub.boxes, ds.boxes[[0, 2]])


def test_images_without_a_box_are_skipped_and_counted(tmp_path, capsys):
    root = make_yolo(tmp_path)
    (root / "train" / "labels" / "0001.txt").unlink()
    (root / "train" / "labels" / "0002.txt").write_text("\n")
    ds = load_box_dataset(str(root), "train")
    assert len(ds) == 4 and ds.skipped == 2
    assert "2 of 6 train images" in capsys.readouterr().err
    assert load_box_dataset(str(root), "train").skipped == 2  # also when read back from the cache


@pytest.mark.parametrize("line,message", [
    ("0 0.5 0.5 0.2", "is not `class cx cy w h`"),
    ("0 0.5 0.5 0.2 0.2 0.3 0.3", "not a polygon"),
    ("7 0.5 0.5 0.2 0.2", "class 7 is outside 0..2"),
    ("1 0.5 0.5 0 0.2", "empty"),
])
def test_bad_labels_are_one_clear_error(tmp_path, line, message):
    root = make_yolo(tmp_path)
    (root / "train" / "labels" / "0003.txt").write_text(line + "\n")
    with pytest.raises(VitkitError, match=message):
        load_box_dataset(str(root), "train")


def test_missing_pieces_are_clear_errors(tmp_path):
    root = make_yolo(tmp_path, {"train": 2})
    with pytest.raises(MissingSplit, match="no test/ folder"):
        load_box_dataset(str(root), "test")
    (root / "data.yaml").write_text("nc: 3\n")
    with pytest.raises(VitkitError, match="no `names:` list"):
        load_box_dataset(str(root), "train")
    (root / "data.yaml").unlink()
    with pytest.raises(VitkitError, match="no data.yaml"):
        load_box_dataset(str(root), "train")
    with pytest.raises(VitkitError, match="does not exist"):
        load_box_dataset(str(tmp_path / "nowhere"))


def test_archive_with_a_dotdot_member_is_refused(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        data = b"names: [a]\n"
        info = tarfile.TarInfo("../data.yaml")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    with pytest.raises(VitkitError, match="unsafe member"):
        load_box_dataset(str(archive))


def test_csv_with_pixel_corners_and_a_split_column(tmp_path):
    rng = np.random.default_rng(0)
    for name in ("a", "b", "c"):
        Image.fromarray(rng.integers(0, 256, (20, 40, 3), dtype=np.uint8)).save(tmp_path / f"{name}.png")
    (tmp_path / "boxes.csv").write_text(
        "path,label,x_min,y_min,x_max,y_max,split\n"
        "a.png,dog,0,0,20,10,train\n"
        "b.png,cat,10,5,30,15,train\n"
        "c.png,dog,-1,0,40,21,test\n"  # a hair outside the image: clipped
    )
    train = load_box_dataset(str(tmp_path / "boxes.csv"), "train", image_size=16)
    assert train.classes == ["cat", "dog"] and train.labels.tolist() == [1, 0]
    assert train.images.shape == (2, 3, 16, 16)
    assert torch.allclose(train.boxes, torch.tensor([[0.25, 0.25, 0.5, 0.5], [0.5, 0.5, 0.5, 0.5]]))
    test = load_box_dataset(str(tmp_path / "boxes.csv"), "test", image_size=16)
    assert torch.allclose(test.boxes, torch.tensor([[0.5, 0.5, 1.0, 1.0]]))
    with pytest.raises(MissingSplit):
        load_box_dataset(str(tmp_path / "boxes.csv"), "val")
    # Excel starts a UTF-8 CSV with a byte-order mark: the first column is still `path`.
    (tmp_path / "excel.csv").write_text("\ufeff" + (tmp_path / "boxes.csv").read_text(), encoding="utf-8")
    assert torch.equal(load_box_dataset(str(tmp_path / "excel.csv"), "train", image_size=16).boxes, train.boxes)
    (tmp_path / "bad.csv").write_text("path,label,x_min,y_min,x_max\na.png,dog,0,0,1\n")
    with pytest.raises(VitkitError, match="lacks the column"):
        load_box_dataset(str(tmp_path / "bad.csv"))


def test_loader_yields_boxes_with_their_images(tmp_path):
    ds = load_box_dataset(str(make_yolo(tmp_path)), "train")
    loader = BoxLoader(ds, 4, mean=(0.0,) * 3, std=(1.0,) * 3, shuffle=True, seed=1)
    xs, ys, bs = zip(*loader)
    order = torch.cat(ys)
    assert torch.cat(xs).shape == (6, 3, 16, 16) and sorted(order.tolist()) == sorted(ds.labels.tolist())
    # Each box is still its own image's: the square's pixels sit inside it.
    for x, b in zip(torch.cat(xs), torch.cat(bs)):
        x1, y1, x2, y2 = (cxcywh_to_xyxy(b) * 16).round().int().tolist()
        assert x[:, y1:y2, x1:x2].amax(0).min() > 200 / 255


@pytest.mark.skipif(not ASL.is_file(), reason=f"the ASL letters copy is not at {ASL} (see ../shared/datasets/README.md)")
def test_the_real_asl_letters_copy_loads():
    sizes = {}
    for split in ("train", "val", "test"):
        ds = load_box_dataset(str(ASL), split, image_size=32)
        assert ds.classes == [chr(ord("A") + i) for i in range(26)] and ds.skipped == 0
        assert ds.images.shape[1:] == (3, 32, 32)
        assert (ds.boxes[:, 2:] > 0).all() and (cxcywh_to_xyxy(ds.boxes) >= -1e-6).all()
        sizes[split] = len(ds)
    assert sizes == {"train": 1512, "val": 144, "test": 72}
