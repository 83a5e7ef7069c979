from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from cifar_lightning import augment
from cifar_lightning.augment import BatchAugment
from cifar_lightning.data import CIFAR10DataModule
from cifar_lightning.images import normalize


def textured_batch(n: int = 16) -> torch.Tensor:
    """n copies of one image with structure everywhere, so any geometric change shows."""
    g = torch.Generator().manual_seed(0)
    one = torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8, generator=g)
    return one.repeat(n, 1, 1, 1)


@pytest.mark.parametrize("mode", ["seed", "standard"])
def test_augmentation_is_random_per_sample(mode: str) -> None:
    torch.manual_seed(0)
    out = BatchAugment(mode)(textured_batch(16)).float()
    assert out.shape == (16, 3, 32, 32)
    distinct = {tuple(o.flatten()[:200].round(decimals=3).tolist()) for o in out}
    assert len(distinct) >= 8, "copies of one image should come out different"


def test_seed_ops_each_change_the_image_and_zero_ranges_are_identity() -> None:
    x = textured_batch(8)
    base = x.float() / 255
    torch.manual_seed(0)
    assert torch.allclose(augment.random_affine(x, 0, 0, 0), base)
    assert torch.allclose(augment.random_brightness(x, 0), base)
    assert not torch.allclose(augment.random_affine(x, shift=0.1), base)
    assert not torch.allclose(augment.random_affine(x, rotation=15), base)
    assert not torch.allclose(augment.random_affine(x, zoom=0.2), base)
    bright = augment.random_brightness(x, 0.3)
    ratio = (bright.mean(dim=(1, 2, 3)) / base.mean(dim=(1, 2, 3)))
    assert ratio.std() > 0.01 and bright.min() >= 0 and bright.max() <= 1
    assert torch.equal(augment.random_flip(x, 1.0), x.flip(-1))
    assert torch.equal(augment.random_flip(x, 0.0), x)


def test_standard_crop_is_a_window_of_the_reflect_padded_image() -> None:
    x = textured_batch(6)
    torch.manual_seed(1)
    out = augment.random_crop(x, padding=4)
    assert out.dtype == torch.uint8
    padded = torch.nn.functional.pad(x.float(), (4, 4, 4, 4), mode="reflect").to(torch.uint8)
    for img, pad in zip(out, padded, strict=True):
        windows = [(dy, dx) for dy in range(9) for dx in range(9) if torch.equal(pad[:, dy:dy + 32, dx:dx + 32], img)]
        assert windows, "each output must be one 32x32 window of the padded image"
    assert torch.equal(augment.random_crop(x, padding=0), x)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.float32])
def test_cutout_sets_one_square_per_image_to_the_mean_colour(dtype: torch.dtype) -> None:
    x = torch.full((64, 3, 32, 32), 3, dtype=torch.uint8)
    x = x if dtype == torch.uint8 else x.float() / 255
    torch.manual_seed(0)
    out = augment.random_cutout(x, 12)
    assert out.dtype == dtype and out.shape == x.shape
    changed = (out != x).all(1)  # the mean colour differs from the constant image in every channel
    assert (changed.sum((1, 2)) == 144).all(), "exactly one 12x12 square per image"
    for mask in changed:  # a square: its bounding box holds nothing else
        rows, cols = mask.any(1).nonzero().flatten(), mask.any(0).nonzero().flatten()
        assert rows[-1] - rows[0] == 11 and cols[-1] - cols[0] == 11
    corners = {(int(m.any(1).nonzero()[0]), int(m.any(0).nonzero()[0])) for m in changed}
    assert len(corners) > 20, "placed at random"
    filled = out[0][:, changed[0]]  # (3, 144): one colour
    assert (filled == filled[:, :1]).all()
    assert normalize(filled[:, :1].reshape(1, 3, 1, 1)).abs().max() < 0.01, "the mean colour: normalises to 0"
    assert torch.equal(augment.random_cutout(x, 0), x)
    torch.manual_seed(0)
    assert torch.equal(BatchAugment("standard", crop_padding=0, flip=0, cutout=12)(x), out)


def test_bad_ranges_and_options_are_refused() -> None:
    with pytest.raises(ValueError, match="unknown augmentation"):
        BatchAugment("heavy")
    with pytest.raises(ValueError, match="takes no option"):
        BatchAugment("standard", rotation=10)
    with pytest.raises(ValueError, match="out of range"):
        BatchAugment("seed", flip=2)


def _hook(dm: CIFAR10DataModule, batch, training: bool):
    dm.trainer = SimpleNamespace(training=training)
    return dm.on_after_batch_transfer(batch, 0)


def test_augmentation_keeps_labels_and_only_touches_training_batches(imagefolder: Path) -> None:
    dm = CIFAR10DataModule(str(imagefolder), augment="seed", val_size=20)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    torch.manual_seed(0)
    xt, yt = _hook(dm, (x, y.clone()), training=True)
    assert torch.equal(yt, y)
    assert xt.dtype == torch.float32 and not torch.allclose(xt, normalize(x))
    # validation / test / predict batches: normalised only, never augmented
    xv, yv = _hook(dm, (x, y.clone()), training=False)
    assert torch.equal(xv, normalize(x)) and torch.equal(yv, y)


def test_no_augmentation_by_default(imagefolder: Path) -> None:
    dm = CIFAR10DataModule(str(imagefolder), val_size=20)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    xt, _ = _hook(dm, (x, y), training=True)
    assert torch.equal(xt, normalize(x))


def test_jpeg_quality_min_narrows_the_qualities_robust_draws() -> None:
    """With every image re-encoded and the range narrowed to 95 alone, each comes out as its
    quality-95 JPEG; the default range (30-95) comes out different from it."""
    from torchvision.io import decode_jpeg, encode_jpeg

    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    q95 = torch.stack(decode_jpeg(encode_jpeg(list(images), quality=95)))
    narrow = BatchAugment("robust", crop_padding=0, flip=0, jpeg=1, noise=0, blur=0, jpeg_quality_min=95)
    wide = BatchAugment("robust", crop_padding=0, flip=0, jpeg=1, noise=0, blur=0)
    torch.manual_seed(0)
    assert torch.equal(narrow(images), q95)
    torch.manual_seed(0)
    assert not torch.equal(wide(images), q95)
    with pytest.raises(ValueError, match="jpeg_quality_min"):
        BatchAugment("robust", jpeg_quality_min=100)


def test_without_photo_ops_robust_is_its_crop_and_flip_only() -> None:
    images = textured_batch(16)
    torch.manual_seed(3)
    plain = BatchAugment("robust", jpeg=1, noise=1, blur=1)(images, photo_ops=False)
    torch.manual_seed(3)
    standard = BatchAugment("standard", crop_padding=4)(images)
    assert torch.equal(plain, standard)


@pytest.mark.parametrize(("epoch", "photo"), [(0, False), (1, False), (2, True), (3, True)])
def test_robust_from_delays_the_photo_ops_to_its_share_of_the_epochs(epoch: int, photo: bool, monkeypatch) -> None:
    dm = CIFAR10DataModule(augment="robust", augment_options={"jpeg": 1.0, "noise": 0.0, "blur": 0.0}, robust_from=0.5)
    seen = []
    monkeypatch.setattr(dm.augmenter, "__class__", type("Spy", (BatchAugment,), {
        "__call__": lambda self, images, photo_ops=True: seen.append(photo_ops) or images}))  # fmt: skip
    dm.trainer = SimpleNamespace(training=True, current_epoch=epoch, max_epochs=4)
    dm.on_after_batch_transfer((textured_batch(4), torch.zeros(4, dtype=torch.long)), 0)
    assert seen == [photo]


def test_robust_from_without_robust_augmentation_is_refused_before_a_run() -> None:
    from cifar_lightning import recipes, training
    from cifar_lightning.errors import ConfigError

    with pytest.raises(ConfigError, match="--robust-from"):
        training.check_before_start(recipes.build({"preset": "94", "robust_from": 0.5}))
    training.check_before_start(recipes.build({"preset": "94", "augment": "robust", "robust_from": 0.5, "accelerator": "cpu"}))
