"""Image data sets held whole in memory as uint8 tensors.

Sources: the embedded scikit-learn digits (no download), CIFAR-10/100 in the official python format
(downloaded with checksum verification when asked), any ImageFolder directory, and a .tar.gz/.tar
of one (extracted safely). Decoded arrays are cached on disk, keyed by their source, so a second
run does not decode again.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import tempfile
import urllib.request
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path, PurePosixPath
from typing import TypeVar

import numpy as np
import torch
from torch import Tensor

from vitkit.errors import VitkitError

CACHE_VERSION = 1  # bump when the decoded arrays of the same source would change
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm"}
ARCHIVE_SUFFIXES = (".tar.gz", ".tgz", ".tar")
SPLIT_FOLDERS = {"train": ("train",), "test": ("test",), "val": ("val", "valid", "validation")}


def class_difference(data_classes: list[str], model_classes: list[str]) -> str:
    """Where a data set's class names first differ from a model's, in words (for an error message)."""
    counts = f"{len(data_classes)} classes in the data, {len(model_classes)} in the checkpoint"
    first = next((i for i, (a, b) in enumerate(zip(data_classes, model_classes)) if a != b), None)
    if first is None:
        return counts
    where = f"class {first} is {data_classes[first]!r} in the data, {model_classes[first]!r} in the checkpoint"
    return where if len(data_classes) == len(model_classes) else f"{counts}; {where}"


def canonical_split(split: str) -> str:
    """train, test or val for a split's name or any of its folder names (valid, validation); a user error else."""
    for name, folders in SPLIT_FOLDERS.items():
        if split == name or split in folders:
            return name
    raise VitkitError(f"unknown split {split!r}: use train, test or val")

DIGITS_SPLIT_SEED = 20240  # fixed: digits' train/test split must be the same on every machine

# Seed 003's CIFAR-10 training-set statistics (per-pixel, images scaled to [0, 1]).
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)

CIFAR_ARCHIVES = {  # name: (file, url, md5)
    "cifar10": ("cifar-10-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
                "c58f30108f718f92721af3b95e74349a"),
    "cifar100": ("cifar-100-python.tar.gz", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
                 "eb9058c3a382ffc7106e4002c42a8d85"),
}


@dataclass
class ImageDataset:
    """Images (N, C, H, W) uint8 and labels (N,) int64 on the CPU, with the class names."""

    images: Tensor
    labels: Tensor
    classes: list[str]
    name: str

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> tuple[int, int]:
        return (self.images.shape[2], self.images.shape[3])

    def subset(self, index: Tensor | slice) -> ImageDataset:
        """The images at `index` (indices, a boolean mask or a slice), as a new data set with the same classes."""
        return ImageDataset(self.images[index].contiguous(), self.labels[index], self.classes, self.name)

    def sample(self, n: int, seed: int) -> ImageDataset:
        """A seeded random sample of n images (all of them, in order, when n is 0 or not below the size).
        Test sets are often stored class by class: a random sample covers every class."""
        if not n or n >= len(self):
            return self
        return self.subset(torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))[:n])


D = TypeVar("D", bound=ImageDataset)


def cache_root() -> Path:
    """Where decoded arrays and extracted archives go: $VITKIT_CACHE or ~/.cache/vitkit."""
    return Path(os.environ.get("VITKIT_CACHE") or Path.home() / ".cache" / "vitkit")


def data_root() -> Path:
    """Where CIFAR archives are looked for: $VITKIT_DATA or ~/.cache/vitkit/datasets."""
    return Path(os.environ.get("VITKIT_DATA") or Path.home() / ".cache" / "vitkit" / "datasets")


def load_dataset(
    source: str,
    split: str = "train",
    image_size: int | None = None,
    root: str | Path | None = None,
    download: bool = False,
    cache_dir: str | Path | None = None,
) -> ImageDataset:
    """Loads `split` of `source`, resized to `image_size`×`image_size` when given.

    `source` is "digits" (splits train/test: a fixed stratified 80/20), "cifar10" or "cifar100"
    (the official archive in `root`; `download=True` fetches it), or the path of an ImageFolder
    directory or of a .tar.gz/.tgz/.tar archive of one (read in place, after refusing absolute paths, '..'
    and links; a single top folder is skipped). A folder with train/, test/ or val/ (valid/)
    subfolders serves `DIR/<split>/<class>/<image>`; a folder of class folders only is all "train".
    """
    if image_size is not None and image_size < 1:
        raise VitkitError(f"image size {image_size} is not positive: pass a size in pixels, e.g. 32")
    split = canonical_split(split)
    if source == "digits":
        return _resize(_digits(split), image_size)
    if source in CIFAR_ARCHIVES:
        ds = _cached(("cifar", source, split), cache_dir, lambda: _cifar(source, split, root, download))
        return _resize(ds, image_size)
    path = Path(source).expanduser().resolve()
    if not path.exists():
        raise VitkitError(
            f"data source {source!r} is neither a built-in data set (digits, cifar10, cifar100) nor an existing "
            "path: check the path"
        )
    if path.is_dir():
        return _load_folder(path, split, image_size, cache_dir)
    if not path.name.endswith(ARCHIVE_SUFFIXES):
        raise VitkitError(f"{path} is a file but not a .tar.gz/.tgz/.tar archive: pass a folder or an archive")
    return _load_archive(path, split, image_size, cache_dir)


def _resize(ds: ImageDataset, size: int | None) -> ImageDataset:
    """Bilinear, antialiased resize of the whole data set (once, at load time)."""
    if size is None or ds.image_size == (size, size):
        return ds
    out = []
    for chunk in ds.images.split(1024):
        x = torch.nn.functional.interpolate(chunk.float(), size=(size, size), mode="bilinear", antialias=True,
                                            align_corners=False)
        out.append(x.round_().clamp_(0, 255).to(torch.uint8))
    return ImageDataset(torch.cat(out), ds.labels, ds.classes, ds.name)


# -- digits ----------------------------------------------------------------------------------


def _digits(split: str) -> ImageDataset:
    from sklearn.datasets import load_digits

    if split not in ("train", "test"):
        raise VitkitError(f"digits has splits train and test, not {split!r}")
    bunch = load_digits()
    images = torch.from_numpy(np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8))[:, None]
    labels = torch.from_numpy(bunch.target.astype(np.int64))
    ds = ImageDataset(images.contiguous(), labels, [str(c) for c in range(10)], "digits")
    train, test = stratified_split(ds.labels, 0.2, seed=DIGITS_SPLIT_SEED)
    return ds.subset(train if split == "train" else test)


# -- CIFAR (official python format) ------------------------------------------------------------


def _cifar(name: str, split: str, root: str | Path | None, download: bool) -> ImageDataset:
    filename, url, md5 = CIFAR_ARCHIVES[name]
    if split not in ("train", "test"):
        raise VitkitError(f"{name} has splits train and test, not {split!r}")
    archive = Path(root or data_root()).expanduser() / filename
    if not archive.is_file():
        if not download:
            raise VitkitError(
                f"{name} is not at {archive}: put {filename} there (from {url}), pass --data-root to the folder "
                "holding it, or pass --download"
            )
        _download(url, archive, md5)
    elif _md5(archive) != md5:
        raise VitkitError(f"{archive} has the wrong checksum (expected md5 {md5}): delete it and download again")
    import pickle

    wanted = {
        ("cifar10", "train"): [f"data_batch_{i}" for i in range(1, 6)],
        ("cifar10", "test"): ["test_batch"],
        ("cifar100", "train"): ["train"],
        ("cifar100", "test"): ["test"],
    }[(name, split)]
    meta_name, label_key, names_key = (
        ("batches.meta", b"labels", b"label_names") if name == "cifar10" else ("meta", b"fine_labels", b"fine_label_names")
    )
    found = {}
    with tarfile.open(archive, "r:gz") as tar:
        for member in tar:  # in archive order: a gzip stream cannot seek backwards cheaply
            base = Path(member.name).name
            if member.isfile() and base in (*wanted, meta_name):
                # The archive's md5 was verified above: these pickles are the official ones, not untrusted input.
                found[base] = pickle.load(tar.extractfile(member), encoding="bytes")
    images = np.concatenate([np.asarray(found[m][b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32) for m in wanted])
    labels = np.concatenate([np.asarray(found[m][label_key], dtype=np.int64) for m in wanted])
    classes = [c.decode() for c in found[meta_name][names_key]]
    return ImageDataset(torch.from_numpy(images), torch.from_numpy(labels), classes, name)


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _download(url: str, target: Path, md5: str) -> None:
    """Downloads to a temporary file beside `target`, checks the md5, then renames it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, suffix=".part")
    os.close(fd)
    try:
        print(f"downloading {url} to {target}", file=sys.stderr)
        with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as f:
            shutil.copyfileobj(response, f, length=1 << 20)
        if _md5(Path(tmp)) != md5:
            raise VitkitError(f"the download of {url} has the wrong checksum: try again later")
        os.replace(tmp, target)
    except OSError as e:
        raise VitkitError(f"cannot download {url} ({e}): download it by hand into {target.parent}") from None
    finally:
        Path(tmp).unlink(missing_ok=True)


# -- ImageFolder and archives ------------------------------------------------------------------
# Folders and archives share one layout logic over relative paths: [split/]<class>/.../<image>.


def _layout(files: list[PurePosixPath], dirs: set[PurePosixPath], root: PurePosixPath, split: str,
            where: str) -> tuple[list[str], list[PurePosixPath], list[int]]:
    """Classes, image files (sorted) and labels of `split` of the tree under `root`."""
    children = {d.name for d in dirs if d.parent == root}
    base = next((root / n for n in SPLIT_FOLDERS[split] if n in children), None)
    if base is None:
        if split != "train" or children & {n for names in SPLIT_FOLDERS.values() for n in names}:
            raise VitkitError(f"{where} has no {split}/ folder: add one, or use a split that exists")
        base = root  # class folders only: the whole tree is the training split
    classes = sorted(d.name for d in dirs if d.parent == base)
    if not classes:
        raise VitkitError(f"{where} has no class folders: expected <class>/<image files> in {where}/{base}")
    n = len(base.parts)
    chosen = sorted(f for f in files if len(f.parts) > n + 1 and f.parts[:n] == base.parts
                    and f.suffix.lower() in IMAGE_EXTENSIONS)
    if not chosen:
        raise VitkitError(f"{where} has class folders but no image files ({', '.join(sorted(IMAGE_EXTENSIONS))})")
    label_of = {c: i for i, c in enumerate(classes)}
    return classes, chosen, [label_of[f.parts[n]] for f in chosen]


def _visible(path: PurePosixPath) -> bool:
    return not any(part.startswith(".") for part in path.parts)  # skips .DS_Store, .git/ and the like


def _scan_folder(folder: Path) -> tuple[list[PurePosixPath], set[PurePosixPath], str]:
    """Relative files and folders under `folder`, and a cheap fingerprint (names, sizes, times) of its files."""
    files, dirs, h = [], set(), hashlib.sha256()
    for top, subdirs, names in os.walk(folder):
        rel = PurePosixPath(Path(top).relative_to(folder).as_posix())
        subdirs.sort()
        dirs.update(rel / d for d in subdirs)
        for name in sorted(names):
            st = os.stat(os.path.join(top, name))
            h.update(f"{rel / name}|{st.st_size}|{st.st_mtime_ns}\n".encode())
            files.append(rel / name)
    return [f for f in files if _visible(f)], {d for d in dirs if _visible(d)}, h.hexdigest()


def _load_folder(folder: Path, split: str, image_size: int | None, cache_dir: str | Path | None) -> ImageDataset:
    files, dirs, fingerprint = _scan_folder(folder)

    def build() -> ImageDataset:
        classes, chosen, labels = _layout(files, dirs, PurePosixPath(), split, str(folder))
        arrays = _decode_all(((str(f), folder / f) for f in chosen), image_size)
        return _assemble(arrays, labels, classes, folder.name, str(folder))

    return _cached(("folder", str(folder), fingerprint, split, image_size), cache_dir, build)


def safe_members(tar: tarfile.TarFile, archive: Path) -> dict[tarfile.TarInfo, PurePosixPath]:
    """The archive's visible members (no dot-files) with their paths, in archive order, after refusing any
    absolute path, '..', link or device: such a member could write or read outside the archive's tree."""
    members = tar.getmembers()
    for m in members:
        if m.name.startswith(("/", "\\")) or ".." in PurePosixPath(m.name).parts or not (m.isfile() or m.isdir()):
            raise VitkitError(
                f"{archive} holds an unsafe member {m.name!r} (absolute path, '..', link or device): "
                "refusing to read it; extract it yourself and pass the folder"
            )
    return {m: p for m in members if (p := PurePosixPath(m.name)).parts and _visible(p)}


def _load_archive(archive: Path, split: str, image_size: int | None, cache_dir: str | Path | None) -> ImageDataset:
    """Decodes a split straight from the archive's stream: nothing is extracted to disk."""
    stat = archive.stat()

    def build() -> ImageDataset:
        try:
            with tarfile.open(archive) as tar:
                paths = safe_members(tar, archive)
                files = [p for m, p in paths.items() if m.isfile()]
                dirs = {p for m, p in paths.items() if m.isdir()} | {a for f in files for a in f.parents}
                dirs.discard(PurePosixPath())
                # A single top folder is the root, unless it is itself a class folder (holds images directly).
                tops = {p.parts[0] for p in paths.values()}
                root = PurePosixPath(tops.pop()) if len(tops) == 1 else PurePosixPath()
                if root.parts and (root not in dirs or any(f.parent == root for f in files)):
                    root = PurePosixPath()
                classes, chosen, labels = _layout(files, dirs, root, split, archive.name)
                wanted = set(chosen)
                # Read in archive order (a gzip stream cannot seek back cheaply), then put back in sorted order.
                items = ((m.name, tar.extractfile(m).read()) for m, p in paths.items() if p in wanted)
                order = [str(p) for m, p in paths.items() if p in wanted]
                arrays = _decode_all(items, image_size)
        except (tarfile.TarError, EOFError, OSError) as e:
            raise unreadable_archive(archive, e) from None
        by_name = dict(zip(order, arrays))
        arrays = [by_name[str(p)] for p in chosen]
        name = root.name or archive.name[: -len(next(s for s in ARCHIVE_SUFFIXES if archive.name.endswith(s)))]
        return _assemble(arrays, labels, classes, name, archive.name)

    return _cached(("archive", str(archive), stat.st_size, stat.st_mtime_ns, split, image_size), cache_dir, build)


def _decode(source: Path | bytes, image_size: int | None) -> np.ndarray:
    """One image (a file or its bytes) as RGB uint8 (H, W, 3), resized (bilinear, antialiased by PIL) when asked."""
    from PIL import Image

    with Image.open(source if isinstance(source, Path) else io.BytesIO(source)) as img:
        img = img.convert("RGB")
        if image_size and img.size != (image_size, image_size):
            img = img.resize((image_size, image_size), Image.Resampling.BILINEAR)
        return np.asarray(img, dtype=np.uint8)


def _decode_all(items: Iterable[tuple[str, Path | bytes]], image_size: int | None) -> list[tuple[str, np.ndarray | None]]:
    """(name, image) for each (name, source), decoded in threads (PIL releases the GIL); None for unreadable ones."""

    def decode_chunk(chunk: list[tuple[str, Path | bytes]]) -> list[tuple[str, np.ndarray | None]]:
        out = []
        for name, source in chunk:
            try:
                out.append((name, _decode(source, image_size)))
            except Exception:  # PIL raises many types for a corrupt file; all mean the same to the user
                out.append((name, None))
        return out

    # Chunks rather than one task per file: 50,000 tiny JPEGs would be dominated by task overhead. Submitting
    # while `items` is still being read lets decoding overlap with reading an archive.
    with ThreadPoolExecutor(max_workers=min(16, os.cpu_count() or 1)) as pool:
        futures, chunk = [], []
        for item in items:
            chunk.append(item)
            if len(chunk) == 256:
                futures.append(pool.submit(decode_chunk, chunk))
                chunk = []
        futures.append(pool.submit(decode_chunk, chunk))
        return [r for f in futures for r in f.result()]


def _assemble(decoded: list[tuple[str, np.ndarray | None]], labels: list[int], classes: list[str], name: str,
              where: str) -> ImageDataset:
    """Stacks decoded images into a data set, or explains which files are unreadable or mis-sized."""
    bad = [n for n, a in decoded if a is None]
    if bad:
        raise VitkitError(
            f"{len(bad)} unreadable image(s) in {where}: {', '.join(bad[:5])}{', ...' if len(bad) > 5 else ''}; "
            "remove or replace them"
        )
    sizes = sorted({a.shape[:2] for _, a in decoded})
    if len(sizes) > 1:
        raise VitkitError(
            f"images in {where} have different sizes (H×W {', '.join(f'{h}×{w}' for h, w in sizes[:3])}"
            f"{', ...' if len(sizes) > 3 else ''}): pass an image size (--image-size) to resize them all"
        )
    images = torch.from_numpy(np.stack([a for _, a in decoded])).permute(0, 3, 1, 2).contiguous()
    return ImageDataset(images, torch.tensor(labels, dtype=torch.int64), classes, name)


# -- cache -----------------------------------------------------------------------------------


def _cached(key: tuple, cache_dir: str | Path | None, build: Callable[[], D], kind: type[D] = ImageDataset) -> D:
    """The cached data set for `key`, or built and stored (atomically: a temporary folder, then a rename).
    `kind` is an ImageDataset data class: its tensor fields are stored as .npy arrays, the rest in meta.json."""
    digest = hashlib.sha256(json.dumps([CACHE_VERSION, *key]).encode()).hexdigest()[:20]
    folder = Path(cache_dir or cache_root()).expanduser() / "arrays" / digest
    if (folder / "meta.json").is_file():
        meta = json.loads((folder / "meta.json").read_text())
        arrays = meta.get("arrays", ["images", "labels"])
        return kind(**{
            f.name: torch.from_numpy(np.load(folder / f"{f.name}.npy", allow_pickle=False)) if f.name in arrays
            else meta[f.name]
            for f in fields(kind) if f.name in arrays or f.name in meta
        })
    ds = build()
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".build-"))
    except OSError:
        return ds  # a read-only cache: the data in hand is still right
    try:
        arrays = [f.name for f in fields(kind) if isinstance(getattr(ds, f.name), Tensor)]
        for name in arrays:
            np.save(tmp / f"{name}.npy", getattr(ds, name).numpy())
        meta = {f.name: getattr(ds, f.name) for f in fields(kind) if f.name not in arrays}
        (tmp / "meta.json").write_text(json.dumps({**meta, "arrays": arrays, "key": [str(k) for k in key]}))
        os.replace(tmp, folder)
    except OSError:
        pass  # another process cached it first, or the disk is full: the data in hand is still right
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return ds


# -- splits, statistics and single images ------------------------------------------------------


def stratified_split(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Sorted indices (rest, held_out): round(`fraction` × count) of each class held out, chosen by a seeded
    permutation (CPU torch generator, so the same on every machine)."""
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(labels), generator=g)
    sorted_labels, by_class = labels[order].sort(stable=True)
    order = order[by_class]  # grouped by class, random within each class
    counts = torch.bincount(sorted_labels, minlength=int(labels.max()) + 1 if len(labels) else 0)
    rank = torch.arange(len(labels)) - (torch.cumsum(counts, 0) - counts).repeat_interleave(counts)
    held = rank < (counts.double() * fraction).round().long().repeat_interleave(counts)
    return order[~held].sort().values, order[held].sort().values


def train_val_split(ds: ImageDataset, val_fraction: float = 0.1, seed: int = 0) -> tuple[ImageDataset, ImageDataset]:
    """Deterministic, class-stratified (train, validation) split; `val_fraction` 0 gives an empty validation set."""
    if not 0 <= val_fraction < 1:
        raise VitkitError(f"validation fraction {val_fraction} is outside [0, 1): pass e.g. 0.1")
    train, val = stratified_split(ds.labels, val_fraction, seed)
    return ds.subset(train), ds.subset(val)


def channel_stats(ds: ImageDataset) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and (population) standard deviation of the images scaled to [0, 1]."""
    if len(ds) == 0:
        raise VitkitError(f"data set {ds.name!r} is empty: its channel statistics are undefined")
    # From each channel's histogram of the 256 byte values: exact, in float64, and no float copy of the images.
    counts = torch.stack([torch.bincount(ds.images[:, c].flatten(), minlength=256) for c in range(ds.channels)])
    values = torch.arange(256, dtype=torch.float64) / 255.0
    n = counts.sum(1).double()
    mean = (counts * values).sum(1) / n
    var = (counts * (values - mean[:, None]) ** 2).sum(1) / n
    return tuple(mean.tolist()), tuple(var.sqrt().tolist())


def unreadable_archive(archive: Path, error: Exception) -> VitkitError:
    """One line for an archive tarfile cannot read (its list of tried compressions cut to the first line)."""
    reason = str(error).splitlines()[0].rstrip(":") if str(error) else type(error).__name__
    return VitkitError(f"cannot read {archive} ({reason}): check that it is a whole tar archive")


def load_images(paths: list[str], image_size: int, channels: int) -> Tensor:
    """Image files as a uint8 batch (N, channels, size, size), for prediction."""
    if not paths:
        raise VitkitError("no image files given: pass one or more image paths")
    arrays = []
    for p in paths:
        if not Path(p).exists():
            raise VitkitError(f"image {p} does not exist: check the path")
        if Path(p).is_dir():
            raise VitkitError(f"{p} is a folder: pass the image files in it (e.g. {p}/*.png)")
        if not Path(p).is_file():
            raise VitkitError(f"{p} is not a regular file: pass a PNG, JPEG or similar image file")
        try:
            arrays.append(_decode(Path(p), image_size))
        except Exception:
            raise VitkitError(f"{p} is not a readable image: pass a PNG, JPEG or similar file") from None
    images = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    if channels == 1:  # ITU-R 601 luma, as PIL's "L" mode
        weights = torch.tensor([0.299, 0.587, 0.114])[:, None, None]
        images = (images.float() * weights).sum(1, keepdim=True).round().to(torch.uint8)
    return images.contiguous()
