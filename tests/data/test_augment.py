import torch
import torch.nn.functional as F

from vitkit.data import Augment, AugmentConfig, DeviceLoader, ImageDataset
from vitkit.data.augment import random_crop


def run(cfg, x, seed=0, labels=None, classes=10):
    labels = torch.zeros(len(x), dtype=torch.long) if labels is None else labels
    return Augment(cfg, classes)(x.clone(), labels, torch.Generator().manual_seed(seed))


def test_random_crop_is_a_window_of_the_padded_image():
    x = torch.rand(16, 2, 5, 5)
    out = random_crop(x, 2, torch.Generator().manual_seed(0))
    padded = F.pad(x, (2, 2, 2, 2))
    offsets = set()
    for b in range(16):
        hits = [(dy, dx) for dy in range(5) for dx in range(5) if torch.equal(out[b], padded[b, :, dy : dy + 5, dx : dx + 5])]
        assert hits, b
        offsets.add(hits[0])
    assert len(offsets) > 3  # per-sample offsets


def test_augmentation_is_per_sample_and_reproducible():
    cfg = AugmentConfig(hflip=0.5, resized_crop_scale=(0.5, 1.0), resized_crop_ratio=(0.9, 1.1), trivial_augment=True)
    x = torch.rand(1, 3, 16, 16).expand(32, -1, -1, -1)  # one image, 32 times
    a, _ = run(cfg, x, seed=1)
    b, _ = run(cfg, x, seed=1)
    c, _ = run(cfg, x, seed=2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    distinct = {tuple(img.flatten()[:50].tolist()) for img in a}
    assert len(distinct) > 20
    assert a.shape == x.shape and a.min() >= 0 and a.max() <= 1


def test_flip_with_probability_one_is_torch_flip():
    x = torch.rand(4, 3, 8, 8)
    out, _ = run(AugmentConfig(hflip=1.0), x)
    assert torch.equal(out, x.flip(-1))


def test_full_resized_crop_is_identity():
    x = torch.rand(4, 3, 8, 8)
    out, _ = run(AugmentConfig(resized_crop_scale=(1.0, 1.0), resized_crop_ratio=(1.0, 1.0)), x)
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


def test_mixup_and_cutmix_targets():
    x = torch.rand(8, 3, 8, 8)
    labels = torch.arange(8) % 4
    for cfg in (AugmentConfig(mixup_alpha=0.4), AugmentConfig(cutmix_alpha=1.0)):
        out, targets = run(cfg, x, labels=labels, classes=4)
        assert targets.shape == (8, 4)
        torch.testing.assert_close(targets.sum(1), torch.ones(8))
        lam = targets[0, labels[0]] if labels[0] != labels[-1] else None
        if lam is not None and cfg.mixup_alpha:
            torch.testing.assert_close(out[0], lam * x[0] + (1 - lam) * x[-1])


def test_random_erasing_changes_rectangles_only_when_on():
    x = torch.rand(8, 3, 16, 16)
    same, _ = run(AugmentConfig(random_erasing=0.0, hflip=0.0), x)
    assert torch.equal(same, x)
    erased, _ = run(AugmentConfig(random_erasing=1.0), x)
    changed = (erased != x).any(1)  # (B, H, W)
    for mask in changed:
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert mask[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].float().mean() > 0.9  # a rectangle


def dataset(n=50):
    images = torch.arange(n, dtype=torch.uint8)[:, None, None, None].expand(n, 1, 2, 2).contiguous()
    return ImageDataset(images, torch.arange(n) % 5, [str(i) for i in range(5)], "toy")


def test_loader_covers_each_sample_once_and_is_seeded():
    loader = DeviceLoader(dataset(), 8, mean=[0.0], std=[1 / 255], shuffle=True, seed=3)
    loader.set_epoch(0)
    first = torch.cat([x[:, 0, 0, 0] for x, _ in loader]).round().long()
    assert sorted(first.tolist()) == list(range(50)) and len(loader) == 7
    again = torch.cat([x[:, 0, 0, 0] for x, _ in loader]).round().long()
    loader.set_epoch(1)
    other = torch.cat([x[:, 0, 0, 0] for x, _ in loader]).round().long()
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_loader_normalises_and_drops_last():
    loader = DeviceLoader(dataset(), 8, mean=[0.5], std=[0.25], drop_last=True)
    x, y = next(iter(loader))
    torch.testing.assert_close(x[:, 0, 0, 0], (torch.arange(8) / 255 - 0.5) / 0.25)
    assert torch.equal(y, torch.arange(8) % 5) and len(loader) == 6


def test_ranks_partition_the_epoch():
    seen = []
    for rank in range(2):
        loader = DeviceLoader(dataset(), 8, mean=[0.0], std=[1 / 255], shuffle=True, rank=rank, world_size=2)
        seen.append(torch.cat([x[:, 0, 0, 0] for x, _ in loader]).round().long())
    assert len(seen[0]) == len(seen[1]) == 25
    assert set(seen[0].tolist()) | set(seen[1].tolist()) == set(range(50))
    assert not set(seen[0].tolist()) & set(seen[1].tolist())
