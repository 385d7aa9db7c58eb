"""Data-source edge cases: official CIFAR archives (a miniature stand-in), unsafe or broken archives, the cache."""

import hashlib
import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vitkit.data import ImageDataset, load_dataset, load_images, train_val_split
from vitkit.data import datasets
from vitkit.errors import VitkitError


def _image(size: tuple[int, int], seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def make_tree(root: Path, splits=("train", "test")) -> Path:
    """root/<split>/<class>/<n>.png: 3 classes × 2 random 12×10 PNGs (lossless, so pixels are known)."""
    for s, split in enumerate(splits):
        for c, cls in enumerate(["cat", "dog", "emu"]):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(2):
                _image((12, 10), 100 * s + 10 * c + i).save(folder / f"{i}.png")
    return root


def make_archive(tree: Path, archive: Path, arcname: str) -> Path:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree, arcname=arcname)
    return archive


def test_folder_pixels_are_exact_and_grey_jpeg_becomes_rgb(tmp_path):
    ds = load_dataset(str(make_tree(tmp_path / "pets")), "train")
    assert ds.name == "pets" and ds.images.shape == (6, 3, 10, 12)
    assert torch.equal(ds.images[3], torch.from_numpy(np.array(_image((12, 10), 11))).permute(2, 0, 1))  # dog/1
    (tmp_path / "grey" / "a").mkdir(parents=True)
    Image.new("L", (5, 5), 77).save(tmp_path / "grey" / "a" / "x.jpg")
    grey = load_dataset(str(tmp_path / "grey"))
    assert grey.channels == 3 and int(grey.images.float().mean().round()) == 77


def test_class_folders_only_are_the_train_split(tmp_path):
    make_tree(tmp_path / "x")
    flat = tmp_path / "x" / "train"
    assert len(load_dataset(str(flat), "train")) == 6
    with pytest.raises(VitkitError, match="no test/ folder"):
        load_dataset(str(flat), "test")


@pytest.mark.parametrize("arcname", ["pets", "."])
def test_archive_with_or_without_top_folder(tmp_path, arcname):
    root = make_tree(tmp_path / "pets")
    archive = make_archive(root, tmp_path / "pets.tgz", arcname)
    for split in ("train", "test"):
        a, b = load_dataset(str(archive), split), load_dataset(str(root), split)
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels) and a.classes == b.classes
        assert a.name == "pets"


def test_archive_with_symlink_is_refused(tmp_path):
    archive = tmp_path / "link.tar"
    with tarfile.open(archive, "w") as tar:
        info = tarfile.TarInfo("cat/0.png")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(info)
    with pytest.raises(VitkitError, match="unsafe member"):
        load_dataset(str(archive))


def test_truncated_archive_is_a_user_error(tmp_path):
    archive = make_archive(make_tree(tmp_path / "pets"), tmp_path / "pets.tar.gz", "pets")
    broken = tmp_path / "broken.tar.gz"
    broken.write_bytes(archive.read_bytes()[:200])
    with pytest.raises(VitkitError, match="cannot read"):
        load_dataset(str(broken))
    (tmp_path / "noise.tar.gz").write_bytes(b"not an archive at all" * 40)
    with pytest.raises(VitkitError, match="cannot read") as error:  # one line, not tarfile's list of compressions
        load_dataset(str(tmp_path / "noise.tar.gz"))
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("kind", ["folder", "archive"])
def test_cache_decodes_once_per_source_split_and_size(tmp_path, monkeypatch, kind):
    root = make_tree(tmp_path / "pets")
    source = root if kind == "folder" else make_archive(root, tmp_path / "pets.tgz", "pets")
    calls = []
    decode = datasets._decode
    monkeypatch.setattr(datasets, "_decode", lambda *a: calls.append(1) or decode(*a))
    first = load_dataset(str(source), "train", cache_dir=tmp_path / "c")
    second = load_dataset(str(source), "train", cache_dir=tmp_path / "c")
    assert len(calls) == 6, "the second load decoded again"
    assert torch.equal(first.images, second.images) and (first.classes, first.name) == (second.classes, second.name)
    load_dataset(str(source), "train", image_size=5, cache_dir=tmp_path / "c")  # another size: another entry
    assert len(calls) == 12
    entry = next((tmp_path / "c" / "arrays").iterdir())
    assert sorted(p.name for p in entry.iterdir()) == ["images.npy", "labels.npy", "meta.json"]


def test_changed_folder_is_decoded_again(tmp_path):
    root = make_tree(tmp_path / "pets")
    assert len(load_dataset(str(root), "train", cache_dir=tmp_path / "c")) == 6
    _image((12, 10), 999).save(root / "train" / "cat" / "new.png")
    assert len(load_dataset(str(root), "train", cache_dir=tmp_path / "c")) == 7


@pytest.fixture
def fake_cifar10(monkeypatch) -> bytes:
    """A cifar-10-python.tar.gz in the official layout with 2 images per batch; its md5 replaces the real one."""
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        def add(name: str, obj: dict) -> None:
            data = pickle.dumps(obj)
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))

        add("batches.meta", {b"label_names": [b"airplane", b"automobile"]})
        for i, name in enumerate(["test_batch"] + [f"data_batch_{k}" for k in range(1, 6)]):
            add(name, {b"data": rng.integers(0, 256, (2, 3072), dtype=np.uint8), b"labels": [i % 2, 1]})
    archive = buf.getvalue()
    filename, url, _ = datasets.CIFAR_ARCHIVES["cifar10"]
    monkeypatch.setitem(datasets.CIFAR_ARCHIVES, "cifar10", (filename, url, hashlib.md5(archive).hexdigest()))
    return archive


def test_cifar_from_root(tmp_path, fake_cifar10):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(fake_cifar10)
    train = load_dataset("cifar10", "train", root=tmp_path)
    assert train.images.shape == (10, 3, 32, 32) and len(load_dataset("cifar10", "test", root=tmp_path)) == 2
    assert train.classes == ["airplane", "automobile"] and train.name == "cifar10"
    assert train.labels.tolist() == [1, 1, 0, 1, 1, 1, 0, 1, 1, 1]  # data_batch_1..5, in order
    assert load_dataset("cifar10", "test", image_size=16, root=tmp_path).image_size == (16, 16)


def test_cifar_checksum_and_download(tmp_path, fake_cifar10, monkeypatch):
    (tmp_path / "cifar-10-python.tar.gz").write_bytes(fake_cifar10[:-1] + b"x")
    with pytest.raises(VitkitError, match="wrong checksum"):
        load_dataset("cifar10", root=tmp_path)

    monkeypatch.setattr(datasets.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(fake_cifar10))
    online = tmp_path / "online"
    assert len(load_dataset("cifar10", "test", root=online, download=True)) == 2
    assert [p.name for p in online.iterdir()] == ["cifar-10-python.tar.gz"]  # in place, no temporary file left

    monkeypatch.setattr(datasets.urllib.request, "urlopen", lambda url, timeout: io.BytesIO(b"garbage"))
    with pytest.raises(VitkitError, match="download.*wrong checksum"):
        load_dataset("cifar10", "train", root=tmp_path / "bad", download=True)
    assert list((tmp_path / "bad").iterdir()) == []


def test_split_exact_sizes_disjoint_and_invalid_fraction():
    labels = torch.cat([torch.full((n,), c) for c, n in enumerate((50, 30, 20))])
    images = torch.zeros(100, 1, 2, 2, dtype=torch.uint8)
    images[:, 0, 0, 0] = torch.arange(100)  # tells the images apart
    train, val = train_val_split(ImageDataset(images, labels, ["a", "b", "c"], "toy"), 0.1, seed=3)
    assert torch.bincount(val.labels).tolist() == [5, 3, 2] and len(train) == 90
    ids = set(train.images[:, 0, 0, 0].tolist()), set(val.images[:, 0, 0, 0].tolist())
    assert ids[0].isdisjoint(ids[1]) and len(ids[0] | ids[1]) == 100
    with pytest.raises(VitkitError, match="fraction"):
        train_val_split(train, 1.0)


def test_load_images(tmp_path):
    _image((10, 10), 0).save(tmp_path / "a.png")
    assert load_images([str(tmp_path / "a.png")], 8, 3).shape == (1, 3, 8, 8)
    assert load_images([str(tmp_path / "a.png")], 8, 1).shape == (1, 1, 8, 8)
    with pytest.raises(VitkitError, match="does not exist"):
        load_images([str(tmp_path / "b.png")], 8, 3)
    with pytest.raises(VitkitError, match="is a folder"):
        load_images([str(tmp_path)], 8, 3)
