import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import CIFAR_JPG, requires_cifar
from vitkit.data import CIFAR10_MEAN, CIFAR10_STD, channel_stats, load_dataset, train_val_split
from vitkit.data import datasets as datasets_module
from vitkit.errors import VitkitError


def make_folder(root, sizes=((6, 6),) * 3, classes=("cat", "dog"), fmt="png"):
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i, size in enumerate(sizes):
            value = 40 + 100 * label + i
            Image.new("RGB", size, (value, value, value)).save(root / name / f"{i}.{fmt}")
    return root


def test_digits_split_is_fixed_and_disjoint():
    train, test = load_dataset("digits", "train"), load_dataset("digits", "test")
    assert len(train) + len(test) == 1797 and len(test) == pytest.approx(0.2 * 1797, abs=10)
    assert train.images.dtype == torch.uint8 and train.images.shape[1:] == (1, 8, 8)
    assert train.classes == [str(i) for i in range(10)] and int(train.images.max()) == 255
    rows = {bytes(x.numpy()) for x in train.images}
    assert sum(bytes(x.numpy()) in rows for x in test.images) < 15  # digits holds a few exact duplicates itself
    again = load_dataset("digits", "test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)
    assert (torch.bincount(test.labels) >= 30).all()  # stratified: every class is in the test split


def test_image_folder_labels_resize_and_cache(tmp_path, monkeypatch):
    folder = make_folder(tmp_path / "pets")
    ds = load_dataset(str(folder), "train", cache_dir=tmp_path / "cache")
    assert ds.classes == ["cat", "dog"] and ds.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert ds.images.shape == (6, 3, 6, 6) and ds.images[3, 0, 0, 0] == 140
    resized = load_dataset(str(folder), "train", image_size=4, cache_dir=tmp_path / "cache")
    assert resized.images.shape == (6, 3, 4, 4)

    def no_decoding(*args):
        raise AssertionError("decoded again despite the cache")

    monkeypatch.setattr(datasets_module, "_decode", no_decoding)
    cached = load_dataset(str(folder), "train", cache_dir=tmp_path / "cache")
    assert torch.equal(cached.images, ds.images) and cached.classes == ds.classes


def test_image_folder_with_split_folders(tmp_path):
    make_folder(tmp_path / "root" / "train")
    make_folder(tmp_path / "root" / "test", sizes=((6, 6),))
    assert len(load_dataset(str(tmp_path / "root"), "test")) == 2
    with pytest.raises(VitkitError, match="no val/ folder"):
        load_dataset(str(tmp_path / "root"), "val")
    make_folder(tmp_path / "root" / "valid", sizes=((6, 6),) * 2)
    assert len(load_dataset(str(tmp_path / "root"), "valid")) == len(load_dataset(str(tmp_path / "root"), "val")) == 4
    with pytest.raises(VitkitError, match="unknown split 'dev': use train, test or val"):
        load_dataset(str(tmp_path / "root"), "dev")


def test_class_difference_names_the_first_class_that_differs():
    a, b = ["A", "B", "C", "D", "E", "F"], ["A", "B", "C", "D", "E", "G"]
    assert datasets_module.class_difference(a, b) == "class 5 is 'F' in the data, 'G' in the checkpoint"
    assert datasets_module.class_difference(a, a[:5]) == "6 classes in the data, 5 in the checkpoint"
    assert datasets_module.class_difference(b[:3], a) == "3 classes in the data, 6 in the checkpoint"


def test_image_folder_user_errors(tmp_path):
    with pytest.raises(VitkitError, match="neither a built-in"):
        load_dataset(str(tmp_path / "missing"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(VitkitError, match="no class folders"):
        load_dataset(str(tmp_path / "empty"))
    mixed = make_folder(tmp_path / "mixed", sizes=((6, 6), (8, 8)))
    with pytest.raises(VitkitError, match="image-size"):
        load_dataset(str(mixed))
    broken = make_folder(tmp_path / "broken", fmt="jpg")
    (broken / "dog" / "bad.jpg").write_bytes(b"this is not a jpeg")
    with pytest.raises(VitkitError, match="bad.jpg"):
        load_dataset(str(broken))


def test_archive_loads_like_the_folder_and_refuses_escapes(tmp_path):
    folder = make_folder(tmp_path / "src" / "pets" / "train")
    archive = tmp_path / "pets.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tmp_path / "src" / "pets", arcname="pets")
    from_archive = load_dataset(str(archive), "train")
    from_folder = load_dataset(str(folder), "train")
    assert torch.equal(from_archive.images, from_folder.images) and from_archive.classes == from_folder.classes

    evil = tmp_path / "evil.tar.gz"
    payload = tmp_path / "payload.txt"
    payload.write_text("x")
    with tarfile.open(evil, "w:gz") as tar:
        tar.add(payload, arcname="../escaped.txt")
    with pytest.raises(VitkitError, match="unsafe member"):
        load_dataset(str(evil))
    assert not (tmp_path.parent / "escaped.txt").exists()


def test_cifar_archive_missing_says_where_to_put_it(tmp_path):
    with pytest.raises(VitkitError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", "train", root=tmp_path)


def test_train_val_split_is_stratified_and_deterministic():
    ds = load_dataset("digits", "train")
    train, val = train_val_split(ds, 0.1, seed=3)
    train2, val2 = train_val_split(ds, 0.1, seed=3)
    assert torch.equal(val.labels, val2.labels) and torch.equal(val.images, val2.images)
    assert len(train) + len(val) == len(ds)
    per_class = torch.bincount(ds.labels)
    assert (torch.bincount(val.labels, minlength=10) - (per_class * 0.1).round()).abs().max() == 0
    _, other = train_val_split(ds, 0.1, seed=4)
    assert not torch.equal(other.images, val.images)
    everything, nothing = train_val_split(ds, 0.0)
    assert len(everything) == len(ds) and len(nothing) == 0


def test_seeded_sample_is_a_reproducible_random_subset():
    data = load_dataset("digits", "test")  # stored in no particular class order, but its rows are distinct enough
    sample = data.sample(50, seed=3)
    assert len(sample) == 50 and sample.classes == data.classes
    rows = {bytes(x.numpy()): int(y) for x, y in zip(data.images, data.labels)}
    assert all(rows[bytes(x.numpy())] == int(y) for x, y in zip(sample.images, sample.labels))  # image and label stay paired
    assert len({bytes(x.numpy()) for x in sample.images}) >= 49  # drawn without replacement (digits has a few duplicates)
    assert torch.equal(sample.images, data.sample(50, seed=3).images)
    assert not torch.equal(sample.images, data.sample(50, seed=4).images)
    assert not torch.equal(sample.images, data.images[:50])  # random, not the first images
    expected = torch.randperm(len(data), generator=torch.Generator().manual_seed(3))[:50]
    assert torch.equal(sample.labels, data.labels[expected])
    assert data.sample(0, seed=3) is data and data.sample(len(data), seed=3) is data  # all of them, in order


def test_channel_stats_match_a_plain_computation():
    ds = load_dataset("digits", "train")
    mean, std = channel_stats(ds)
    x = ds.images.numpy().astype(np.float64) / 255
    assert mean[0] == pytest.approx(x.mean(), abs=1e-9) and std[0] == pytest.approx(x.std(), abs=1e-9)


@requires_cifar
def test_cifar10_jpeg_copy():
    test = load_dataset(str(CIFAR_JPG), "test")
    assert len(test) == 10_000 and test.images.shape[1:] == (3, 32, 32)
    assert test.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    assert torch.bincount(test.labels).tolist() == [1000] * 10
    mean, std = channel_stats(test)
    assert np.allclose(mean, CIFAR10_MEAN, atol=0.02) and np.allclose(std, CIFAR10_STD, atol=0.02)
