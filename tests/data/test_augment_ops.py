"""Augmentation details beyond the basics: every TrivialAugment op, uint8 input, mixing, validation."""

import pytest
import torch

from vitkit.data import Augment, AugmentConfig, DeviceLoader, ImageDataset
from vitkit.data.augment import TRIVIAL_OPS, trivial_augment
from vitkit.errors import VitkitError


def test_every_trivial_op_runs_and_identity_is_exact():
    x = torch.rand(1, 3, 12, 12, generator=torch.Generator().manual_seed(1)).expand(512, -1, -1, -1).contiguous()
    out = trivial_augment(x.clone(), torch.Generator().manual_seed(0))
    # The op choice is trivial_augment's first draw: replay it to know which image got which op.
    op = torch.randint(0, len(TRIVIAL_OPS), (512,), generator=torch.Generator().manual_seed(0))
    assert out.min() >= 0 and out.max() <= 1
    for i, name in enumerate(TRIVIAL_OPS):
        chosen = op == i
        assert chosen.any(), name
        change = (out[chosen] - x[chosen]).abs().amax(dim=(1, 2, 3))
        if name == "identity":
            assert change.max() < 1e-5
        else:
            assert (change > 1e-3).float().mean() > 0.5, f"{name} mostly did nothing"


def test_uint8_input_is_scaled_to_unit_range():
    x = torch.randint(0, 256, (4, 3, 6, 6), dtype=torch.uint8)
    out, labels = Augment(AugmentConfig(), 10)(x, torch.zeros(4, dtype=torch.int64), torch.Generator())
    assert torch.equal(out, x.float() / 255) and labels.dtype == torch.int64


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixed_images_hold_what_the_targets_say(mixup, cutmix):
    n, classes = 8, 8
    x = (torch.arange(n, dtype=torch.float32) / n)[:, None, None, None].expand(n, 3, 8, 8).contiguous()
    y = torch.arange(n)  # every class differs from its partner's (the reversed batch)
    for seed in range(6):
        out, target = Augment(AugmentConfig(mixup_alpha=mixup, cutmix_alpha=cutmix), classes)(
            x, y, torch.Generator().manual_seed(seed))
        torch.testing.assert_close(target.sum(1), torch.ones(n))
        lam = target[torch.arange(n), y]
        expected = x[:, 0, 0, 0] * lam + x.flip(0)[:, 0, 0, 0] * (1 - lam)
        torch.testing.assert_close(out.mean(dim=(1, 2, 3)), expected, atol=1e-5, rtol=0)


def test_user_errors():
    with pytest.raises(VitkitError, match="hflip"):
        Augment(AugmentConfig(hflip=1.5), 10)
    with pytest.raises(VitkitError, match="scale"):
        Augment(AugmentConfig(resized_crop_scale=(0.9, 0.5)), 10)
    with pytest.raises(VitkitError, match="crop padding"):
        Augment(AugmentConfig(crop_padding=8), 10)(torch.rand(2, 3, 8, 8), torch.zeros(2, dtype=torch.int64),
                                                   torch.Generator())
    ds = ImageDataset(torch.zeros(5, 3, 2, 2, dtype=torch.uint8), torch.zeros(5, dtype=torch.int64), ["a"], "t")
    with pytest.raises(VitkitError, match="channels"):
        DeviceLoader(ds, 2, mean=[0.5], std=[0.5])
    with pytest.raises(VitkitError, match="rank"):
        DeviceLoader(ds, 2, mean=[0.5] * 3, std=[0.5] * 3, rank=2, world_size=2)


def test_more_ranks_than_samples_still_get_equal_batches():
    images = torch.arange(3, dtype=torch.uint8)[:, None, None, None].expand(3, 1, 1, 1).contiguous()
    ds = ImageDataset(images, torch.zeros(3, dtype=torch.int64), ["a"], "t")
    seen = []
    for rank in range(5):
        loader = DeviceLoader(ds, 4, mean=[0.0], std=[1 / 255], shuffle=True, rank=rank, world_size=5)
        batches = list(loader)
        assert len(batches) == len(loader) == 1 and len(batches[0][0]) == 1
        seen += batches[0][0].flatten().round().long().tolist()
    assert set(seen) == {0, 1, 2}


def test_augmented_epoch_reproduces_after_a_restart():
    images = torch.randint(0, 256, (20, 3, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    ds = ImageDataset(images, torch.arange(20) % 4, list("abcd"), "t")
    augment = Augment(AugmentConfig(hflip=0.5, crop_padding=2, trivial_augment=True, mixup_alpha=0.5), 4)

    def epoch(e):
        loader = DeviceLoader(ds, 8, mean=[0.5] * 3, std=[0.5] * 3, shuffle=True, augment=augment, seed=7)
        loader.set_epoch(e)
        return [torch.cat([x.flatten(), y.flatten()]) for x, y in loader]

    assert all(torch.equal(a, b) for a, b in zip(epoch(3), epoch(3)))
    assert not torch.equal(epoch(3)[0], epoch(4)[0])
