"""Images with one bounding box each (seed 001: the hand in American Sign Language letters), held whole
in memory, and the box geometry shared by augmentation, losses and metrics.

Boxes are float32 (N, 4) (cx, cy, w, h) normalised by the image's width and height to [0, 1], so resizing
an image to a square moves no box. Sources:
- a YOLO folder: `<root>/data.yaml` (`names: [A, B, ...]`) and `<root>/{train,valid,test}/{images,labels}`,
  one `labels/<image stem>.txt` per image with lines `class cx cy w h` (normalised); the first line is the
  image's box, and images without a label file (or with an empty one) are skipped and counted;
- the same folder inside a .tar.gz/.tgz/.tar, read in place (unsafe members refused, as for ImageFolders);
- a CSV file with the header `path,label,x_min,y_min,x_max,y_max[,split]`: image paths relative to the CSV's
  folder, class names as labels (the classes are the sorted names of the whole file), box corners in pixels
  of the original image, and an optional split column (train, val/valid/validation, test; without it
  every row is training data).
Decoded arrays are cached like the ImageFolder sources.
"""

from __future__ import annotations

import csv
import hashlib
import os
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import numpy as np
import torch
from torch import Tensor

from vitkit.data.datasets import (
    ARCHIVE_SUFFIXES, IMAGE_EXTENSIONS, SPLIT_FOLDERS, ImageDataset, _assemble, canonical_split, _cached, _decode_all, _scan_folder,
    safe_members, unreadable_archive,
)
from vitkit.errors import VitkitError

CSV_COLUMNS = ("path", "label", "x_min", "y_min", "x_max", "y_max")


class MissingSplit(VitkitError):
    """The source has no such split (no valid/ folder, no test rows): callers may go on without it."""


@dataclass
class BoxDataset(ImageDataset):
    """An ImageDataset with one box per image: boxes float32 (N, 4) (cx, cy, w, h) in [0, 1]. `skipped` counts
    the source's images of this split that had no box and were left out."""

    boxes: Tensor
    skipped: int = 0

    def subset(self, index: Tensor) -> BoxDataset:
        return BoxDataset(self.images[index].contiguous(), self.labels[index], self.classes, self.name,
                          self.boxes[index], self.skipped)


# -- geometry --------------------------------------------------------------------------------


def cxcywh_to_xyxy(boxes: Tensor) -> Tensor:
    cx, cy, w, h = boxes.unbind(-1)
    return torch.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], dim=-1)


def xyxy_to_cxcywh(boxes: Tensor) -> Tensor:
    x1, y1, x2, y2 = boxes.unbind(-1)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], dim=-1)


def scale_sizes(boxes: Tensor, scale: Tensor | float) -> Tensor:
    """(cx, cy, w, h) boxes (..., 4) with w and h multiplied by `scale` (a number, or one per box: (...,))."""
    scale = torch.as_tensor(scale, dtype=boxes.dtype, device=boxes.device)
    return torch.cat([boxes[..., :2], boxes[..., 2:] * scale[..., None]], dim=-1)


def square_crops(images: Tensor, boxes: Tensor, margin: float, size: int) -> Tensor:
    """Per image (B, C, H, W), the square (in image fractions) of side `margin` × the longer side of its (cx, cy, w, h)
    box (B, 4), centred on the box, resampled bilinearly to `size`×`size` (B, C, size, size); where the square leaves
    the image, the crop is 0. One batched `grid_sample`, no loop over images."""
    side = margin * boxes[:, 2:].amax(dim=1)
    theta = torch.zeros(len(boxes), 2, 3, dtype=images.dtype, device=images.device)
    # affine_grid maps the output's [-1, 1] square into the input's [-1, 1] coordinates: scale by the side (a
    # fraction of the image spans twice that in [-1, 1] units, as the output's square does), shift to the centre.
    theta[:, 0, 0] = theta[:, 1, 1] = side.to(images.dtype)
    theta[:, :, 2] = (2 * boxes[:, :2] - 1).to(images.dtype)
    grid = torch.nn.functional.affine_grid(theta, [len(images), images.shape[1], size, size], align_corners=False)
    return torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _pair_geometry(a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Intersection, union and enclosing-box areas of paired (cx, cy, w, h) boxes (..., 4). A negative width
    or height (a regressor without sigmoid can output one) counts as 0."""
    a = torch.cat([a[..., :2], a[..., 2:].clamp(min=0)], dim=-1)
    b = torch.cat([b[..., :2], b[..., 2:].clamp(min=0)], dim=-1)
    a, b = cxcywh_to_xyxy(a), cxcywh_to_xyxy(b)
    inter_wh = (torch.minimum(a[..., 2:], b[..., 2:]) - torch.maximum(a[..., :2], b[..., :2])).clamp(min=0)
    inter = inter_wh[..., 0] * inter_wh[..., 1]
    area_a = (a[..., 2] - a[..., 0]) * (a[..., 3] - a[..., 1])
    area_b = (b[..., 2] - b[..., 0]) * (b[..., 3] - b[..., 1])
    enclosing_wh = torch.maximum(a[..., 2:], b[..., 2:]) - torch.minimum(a[..., :2], b[..., :2])
    return inter, area_a + area_b - inter, enclosing_wh[..., 0] * enclosing_wh[..., 1]


def box_iou(a: Tensor, b: Tensor, eps: float = 1e-9) -> Tensor:
    """Intersection over union of paired (cx, cy, w, h) boxes: (..., 4), (..., 4) → (...)."""
    inter, union, _ = _pair_geometry(a, b)
    return inter / union.clamp(min=eps)


def generalized_box_iou(a: Tensor, b: Tensor, eps: float = 1e-9) -> Tensor:
    """GIoU (Rezatofighi et al. 2019) of paired (cx, cy, w, h) boxes: IoU − (C − U)/C, with C the area of the
    smallest box enclosing both and U their union; in [-1, 1], and informative also when the boxes do not
    overlap (where IoU is 0 and has no gradient)."""
    inter, union, enclosing = _pair_geometry(a, b)
    return inter / union.clamp(min=eps) - (enclosing - union) / enclosing.clamp(min=eps)


def _checked_boxes(xyxy: Tensor, names: list[str], where: str) -> Tensor:
    """(x1, y1, x2, y2) fractions → (cx, cy, w, h), clipped to the image; empty or non-finite boxes are an error."""
    finite = torch.isfinite(xyxy).all(dim=1)
    # Export tools round: a box a hair outside the image is clipped rather than refused.
    xyxy = xyxy.nan_to_num(0.0).clamp(0, 1)
    bad = ~finite | (xyxy[:, 2] <= xyxy[:, 0]) | (xyxy[:, 3] <= xyxy[:, 1])
    if bad.any():
        first = names[int(bad.nonzero()[0])]
        raise VitkitError(
            f"{int(bad.sum())} box(es) in {where} are empty, not finite or outside the image (first: {first}): "
            "fix those labels"
        )
    return xyxy_to_cxcywh(xyxy).float()


def _box_dataset(decoded: list[tuple[str, np.ndarray | None]], labels: list[int], xyxy: list[list[float]],
                 classes: list[str], name: str, where: str, skipped: int) -> BoxDataset:
    ds = _assemble(decoded, labels, classes, name, where)  # unreadable or mis-sized images are explained there
    boxes = _checked_boxes(torch.tensor(xyxy, dtype=torch.float64).reshape(-1, 4), [n for n, _ in decoded], where)
    return BoxDataset(ds.images, ds.labels, classes, name, boxes, skipped)


# -- loading ---------------------------------------------------------------------------------


def load_box_dataset(
    source: str, split: str = "train", image_size: int | None = None, cache_dir: str | Path | None = None
) -> BoxDataset:
    """Loads `split` (train, val or test) of a YOLO folder, a .tar.gz/.tgz/.tar of one, or a CSV file (see the
    module's docstring), resized to `image_size`×`image_size` when given."""
    if image_size is not None and image_size < 1:
        raise VitkitError(f"image size {image_size} is not positive: pass a size in pixels, e.g. 224")
    split = canonical_split(split)
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise VitkitError(f"box data {source!r} does not exist: pass a YOLO folder, a .tar.gz of one, or a CSV file")
    if path.is_dir():
        return _load_yolo_folder(path, split, image_size, cache_dir)
    if path.name.endswith(ARCHIVE_SUFFIXES):
        return _load_yolo_archive(path, split, image_size, cache_dir)
    if path.suffix.lower() == ".csv":
        return _load_csv(path, split, image_size, cache_dir)
    raise VitkitError(f"{path} is neither a folder, a .tar.gz/.tgz/.tar archive nor a .csv file: pass one of those")


@dataclass
class _YoloSplit:
    root: PurePosixPath  # the folder holding data.yaml
    images: list[PurePosixPath]  # the split's image files, sorted
    labels: dict[PurePosixPath, PurePosixPath]  # image → its label file, where it has one
    names_file: PurePosixPath


def _yolo_layout(files: list[PurePosixPath], split: str, where: str) -> _YoloSplit:
    """The split's images and label files among relative file paths; the shallowest data.yaml marks the root."""
    yamls = sorted((f for f in files if f.name == "data.yaml"), key=lambda f: len(f.parts))
    if not yamls:
        raise VitkitError(
            f"{where} has no data.yaml: a YOLO data set names its classes there (names: [A, B, ...]); add one"
        )
    root = yamls[0].parent
    n = len(root.parts)
    present = {f.parts[n] for f in files if f.parts[:n] == root.parts and len(f.parts) > n + 2}
    split_dir = next((root / name for name in SPLIT_FOLDERS[split] if name in present), None)
    if split_dir is None:
        raise MissingSplit(
            f"{where} has no {' or '.join(SPLIT_FOLDERS[split])}/ folder beside data.yaml: add one, or use a split "
            f"that exists ({', '.join(sorted(present)) or 'none'})"
        )
    image_dir, label_dir = split_dir / "images", split_dir / "labels"
    images = sorted(f for f in files if f.parent == image_dir and f.suffix.lower() in IMAGE_EXTENSIONS)
    if not images:
        raise VitkitError(f"{where} has no image files in {image_dir}/: expected <split>/images/<image>")
    label_files = {f for f in files if f.parent == label_dir and f.suffix == ".txt"}
    labels = {image: label for image in images if (label := label_dir / f"{image.stem}.txt") in label_files}
    return _YoloSplit(root, images, labels, yamls[0])


def _class_names(text: str, where: str) -> list[str]:
    """The `names:` of a YOLO data.yaml: a list, or a mapping from indices 0..n-1 (newer exports)."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise VitkitError(f"cannot parse {where} ({str(e).splitlines()[0]}): fix the YAML") from None
    names = data.get("names") if isinstance(data, dict) else None
    if isinstance(names, dict) and sorted(names) == list(range(len(names))):
        names = [names[i] for i in range(len(names))]
    if not isinstance(names, list) or not names:
        raise VitkitError(f"{where} has no `names:` list of class names: add one, e.g. names: [A, B, C]")
    return [str(name) for name in names]


def _first_box(text: str, where: str, num_classes: int) -> tuple[int, list[float]] | None:
    """The class and (x1, y1, x2, y2) of the first box of a YOLO label file, or None when it holds none."""
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        try:
            if len(parts) != 5:
                raise ValueError
            cls, (cx, cy, w, h) = int(parts[0]), map(float, parts[1:])
        except ValueError:
            raise VitkitError(
                f"{where} line {number}: {line.strip()!r} is not `class cx cy w h` (a box, not a polygon): fix the "
                "label file"
            ) from None
        if not 0 <= cls < num_classes:
            raise VitkitError(
                f"{where} line {number}: class {cls} is outside 0..{num_classes - 1} ({num_classes} names in "
                "data.yaml): fix the label or the names"
            )
        return cls, [cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2]
    return None


def _yolo_dataset(layout: _YoloSplit, texts: dict[PurePosixPath, str], decoded: list[tuple[str, np.ndarray | None]],
                  split: str, name: str, where: str) -> BoxDataset:
    """The images with a box, their classes and boxes; images without one are counted and reported."""
    classes = _class_names(texts[layout.names_file], f"{where}/{layout.names_file}")
    by_name = dict(decoded)
    kept, labels, boxes = [], [], []
    for image in layout.images:
        label_file = layout.labels.get(image)
        box = _first_box(texts[label_file], f"{where}/{label_file}", len(classes)) if label_file else None
        if box is not None:
            kept.append((str(image), by_name[str(image)]))
            labels.append(box[0])
            boxes.append(box[1])
    skipped = len(layout.images) - len(kept)
    if not kept:
        raise VitkitError(f"no image of the {split} split of {where} has a box: check its labels/ folder")
    if skipped:
        print(f"note: {skipped} of {len(layout.images)} {split} images in {where} have no box (no or empty label "
              "file) and are skipped", file=sys.stderr)
    return _box_dataset(kept, labels, boxes, classes, name, where, skipped)


def _load_yolo_folder(folder: Path, split: str, image_size: int | None, cache_dir) -> BoxDataset:
    files, _, fingerprint = _scan_folder(folder)

    def build() -> BoxDataset:
        layout = _yolo_layout(files, split, str(folder))
        texts = {p: (folder / p).read_text(errors="replace") for p in (layout.names_file, *layout.labels.values())}
        decoded = _decode_all(((str(p), folder / p) for p in layout.images if p in layout.labels), image_size)
        return _yolo_dataset(layout, texts, decoded, split, layout.root.name or folder.name, str(folder))

    return _cached(("yolo-folder", str(folder), fingerprint, split, image_size), cache_dir, build, BoxDataset)


def _load_yolo_archive(archive: Path, split: str, image_size: int | None, cache_dir) -> BoxDataset:
    """Decodes a split straight from the archive's stream: nothing is extracted to disk."""
    stat = archive.stat()

    def build() -> BoxDataset:
        try:
            with tarfile.open(archive) as tar:
                paths = safe_members(tar, archive)
                layout = _yolo_layout([p for m, p in paths.items() if m.isfile()], split, archive.name)
                wanted_texts = {layout.names_file, *layout.labels.values()}
                wanted_images = set(layout.labels)
                texts: dict[PurePosixPath, str] = {}

                def images():
                    # One pass in archive order (a gzip stream cannot seek back cheaply); the label files are
                    # collected on the way, whether they come before or after their images.
                    for m, p in paths.items():
                        if p in wanted_texts:
                            texts[p] = tar.extractfile(m).read().decode("utf-8", errors="replace")
                        elif p in wanted_images:
                            yield str(p), tar.extractfile(m).read()

                decoded = _decode_all(images(), image_size)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise unreadable_archive(archive, e) from None
        name = layout.root.name or archive.name[: -len(next(s for s in ARCHIVE_SUFFIXES if archive.name.endswith(s)))]
        return _yolo_dataset(layout, texts, decoded, split, name, archive.name)

    key = ("yolo-archive", str(archive), stat.st_size, stat.st_mtime_ns, split, image_size)
    return _cached(key, cache_dir, build, BoxDataset)


def _load_csv(path: Path, split: str, image_size: int | None, cache_dir) -> BoxDataset:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: Excel writes a byte-order mark first
            reader = csv.DictReader(f)
            header = [c.strip() for c in reader.fieldnames or []]
            rows = [{k.strip(): (v or "").strip() for k, v in row.items() if k} for row in reader]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise VitkitError(f"cannot read {path} ({e}): pass a UTF-8 CSV file") from None
    missing = [c for c in CSV_COLUMNS if c not in header]
    if missing:
        raise VitkitError(f"{path} lacks the column(s) {missing}: the header must be {','.join(CSV_COLUMNS)}[,split]")
    classes = sorted({r["label"] for r in rows})  # over every split, so that all splits share the indices
    if "split" in header:
        chosen = [r for r in rows if r["split"] in SPLIT_FOLDERS[split]]
    elif split == "train":
        chosen = rows
    else:
        raise MissingSplit(f"{path} has no split column, so it has only training data: add one, or use split train")
    if not chosen:
        raise MissingSplit(f"{path} has no rows of split {split!r}: check its split column")
    files = [path.parent / r["path"] for r in chosen]
    absent = [str(f) for f in files if not f.is_file()]
    if absent:
        raise VitkitError(f"{len(absent)} image(s) listed in {path} do not exist (first: {absent[0]}): fix the paths "
                          "(relative to the CSV's folder)")
    # The cache key: the CSV and every image it lists, by name, size and modification time.
    fingerprint = hashlib.sha256()
    for f in (path, *files):
        st = os.stat(f)
        fingerprint.update(f"{f}|{st.st_size}|{st.st_mtime_ns}\n".encode())

    def build() -> BoxDataset:
        try:
            corners = [[float(r[c]) for c in CSV_COLUMNS[2:]] for r in chosen]
        except ValueError:
            bad = next(r for r in chosen if not all(_is_number(r[c]) for c in CSV_COLUMNS[2:]))
            raise VitkitError(f"{path}: the box of {bad['path']} is not four numbers: fix that row") from None
        from PIL import Image

        def size(file: Path) -> tuple[int, int]:
            try:
                with Image.open(file) as img:  # reads the header only
                    return img.size
            except Exception:
                return (0, 0)  # unreadable: _assemble names it

        # Pixel corners become fractions of the original size, which the resize to image_size then keeps.
        with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
            sizes = torch.tensor(list(pool.map(size, files)), dtype=torch.float64).clamp(min=1)
        xyxy = torch.tensor(corners, dtype=torch.float64) / sizes.repeat(1, 2)
        decoded = _decode_all(((r["path"], f) for r, f in zip(chosen, files)), image_size)
        labels = [classes.index(r["label"]) for r in chosen]
        return _box_dataset(decoded, labels, xyxy.tolist(), classes, path.stem, str(path), 0)

    return _cached(("box-csv", str(path), fingerprint.hexdigest(), split, image_size), cache_dir, build, BoxDataset)


def _is_number(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False
