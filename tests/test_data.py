from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from cifar_lightning import data, images
from cifar_lightning.data import CIFAR10DataModule
from cifar_lightning.errors import DataError
from cifar_lightning.images import CLASSES, normalize


def test_imagefolder_decodes_to_uint8_tensors_with_sorted_class_labels(imagefolder: Path) -> None:
    splits = data.load_imagefolder(imagefolder)
    train, test = splits["train"], splits["test"]
    assert train.images.shape == (120, 3, 32, 32) and train.images.dtype == torch.uint8
    assert test.images.shape == (40, 3, 32, 32)
    assert train.classes == CLASSES  # sorted folder names are the canonical CIFAR-10 order
    assert torch.equal(torch.bincount(train.labels), torch.full((10,), 12))
    # pixel values survive decoding exactly (PNG is lossless)
    first = torch.from_numpy(np.array(Image.open(imagefolder / "train/airplane/airplane_0000.png")))
    assert torch.equal(train.images[0], first.permute(2, 0, 1))


def test_second_load_reads_the_cache_without_decoding(imagefolder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = data.load_imagefolder(imagefolder)

    def no_decoding(*a, **k):
        raise AssertionError("decoded again although the cache was fresh")

    monkeypatch.setattr(data, "decode_image", no_decoding)
    second = data.load_imagefolder(imagefolder)
    assert torch.equal(first["train"].images, second["train"].images)


def test_stale_cache_is_rebuilt_when_an_image_changes(imagefolder: Path) -> None:
    data.load_imagefolder(imagefolder)
    changed = imagefolder / "train/cat/cat_0000.png"
    Image.new("RGB", (32, 32), (1, 2, 3)).save(changed)
    os.utime(changed, ns=(1, 1))  # a different mtime, whatever the clock says
    again = data.load_imagefolder(imagefolder)
    cat0 = again["train"].images[3 * 12]
    assert cat0[:, 0, 0].tolist() == [1, 2, 3]


def test_corrupt_cache_is_rebuilt(imagefolder: Path, private_cache: Path) -> None:
    data.load_imagefolder(imagefolder)
    (cache_file,) = private_cache.glob("*.pt")
    cache_file.write_bytes(b"garbage" * 10)
    again = data.load_imagefolder(imagefolder)
    assert again["train"].images.shape == (120, 3, 32, 32)
    assert cache_file.stat().st_size > 1000  # rewritten


def test_nothing_is_written_inside_the_data_dir(imagefolder: Path) -> None:
    before = sorted(p.relative_to(imagefolder) for p in imagefolder.rglob("*"))
    dm = CIFAR10DataModule(str(imagefolder), val_size=20)
    dm.prepare_data()
    dm.setup("fit")
    assert sorted(p.relative_to(imagefolder) for p in imagefolder.rglob("*")) == before


def test_unwritable_cache_dir_still_loads(imagefolder: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache dir should be")
    splits = data.load_imagefolder(imagefolder, cache_dir=blocker / "cache")
    assert splits["train"].images.shape[0] == 120


def test_split_is_seeded_disjoint_and_independent_of_the_training_seed(imagefolder: Path) -> None:
    def split(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(seed * 7 + 1)  # the global (training) seed must not matter
        dm = CIFAR10DataModule(str(imagefolder), val_size=30)
        dm.setup("fit")
        return dm.train_set.images, dm.val_set.images

    (t1, v1), (t2, v2) = split(0), split(1)
    assert torch.equal(t1, t2) and torch.equal(v1, v2)
    assert len(t1) == 90 and len(v1) == 30
    a, b, c = data.seeded_split(120, 30, seed=0)
    assert set(a.tolist()).isdisjoint(b.tolist()) and len(set(a.tolist()) | set(b.tolist())) == 120
    assert len(c) == 0
    assert not torch.equal(data.seeded_split(120, 30, seed=1)[1], b)


def test_calibration_split_never_overlaps_train_validation_or_test(imagefolder: Path) -> None:
    """The images that fit the temperature are training images no step trained on, apart from
    the validation split, and never test images; holding them out leaves validation as it was."""
    plain = CIFAR10DataModule(str(imagefolder), val_size=30)
    plain.setup()
    dm = CIFAR10DataModule(str(imagefolder), val_size=30, calib_size=2000)  # capped at a tenth of the 90 left
    dm.setup()
    assert len(dm.calib_set) == 9 and len(dm.train_set) == 81 and torch.equal(dm.val_set.images, plain.val_set.images)
    train_idx, val_idx, calib_idx = data.seeded_split(120, 30, seed=0, calib_size=20)
    ids = [set(t.tolist()) for t in (train_idx, val_idx, calib_idx)]
    assert ids[0].isdisjoint(ids[1]) and ids[0].isdisjoint(ids[2]) and ids[1].isdisjoint(ids[2])
    assert len(ids[0] | ids[1] | ids[2]) == 120
    # By content too: no calibration image is a training, validation or test image.
    def rows(ds: object) -> set[bytes]:
        return {im.numpy().tobytes() for im in ds.images}

    calib = rows(dm.calib_set)
    assert calib.isdisjoint(rows(dm.train_set)) and calib.isdisjoint(rows(dm.val_set)) and calib.isdisjoint(rows(dm.test_set))
    with pytest.raises(DataError, match="--calib-size"):
        data.seeded_split(120, 30, seed=0, calib_size=90)


def test_limit_train_images_takes_the_first_n_of_the_split(imagefolder: Path) -> None:
    full = CIFAR10DataModule(str(imagefolder), val_size=30)
    full.setup("fit")
    limited = CIFAR10DataModule(str(imagefolder), val_size=30, limit_train_images=25)
    limited.setup("fit")
    assert torch.equal(limited.train_set.images, full.train_set.images[:25])
    assert torch.equal(limited.val_set.images, full.val_set.images)


def test_loaders_keep_every_eval_image_and_batch_whole_tensors(imagefolder: Path) -> None:
    dm = CIFAR10DataModule(str(imagefolder), val_size=33, batch_size=16, eval_batch_size=10)
    dm.setup("fit")
    dm.setup("test")
    assert sum(len(y) for _, y in dm.val_dataloader()) == 33  # no drop_last on evaluation
    assert sum(len(y) for _, y in dm.test_dataloader()) == 40
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 3, 32, 32) and x.dtype == torch.uint8 and y.dtype == torch.long


def test_normalisation_uses_the_train_set_statistics() -> None:
    assert images.MEAN == (0.4914, 0.4822, 0.4465)
    assert images.STD == (0.2470, 0.2435, 0.2616)
    img = torch.full((1, 3, 1, 1), 255, dtype=torch.uint8)
    out = normalize(img).flatten().tolist()
    assert out == pytest.approx([(1 - m) / s for m, s in zip(images.MEAN, images.STD, strict=True)])


def test_jpeg_and_odd_sizes_are_converted_to_32x32_rgb(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    for split in ("train", "test"):
        for cls in ("a", "b"):
            (root / split / cls).mkdir(parents=True)
            Image.new("L", (50, 40), 128).save(root / split / cls / "x.jpg")
            Image.new("RGBA", (32, 32), (10, 20, 30, 40)).save(root / split / cls / "y.png")
    splits = data.load_imagefolder(root)
    assert splits["train"].images.shape == (4, 3, 32, 32)
    assert splits["train"].classes == ("a", "b")


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda r: (r / "test" / "cat").rename(r / "test" / "kitten"), "train and test class folders differ"),
        (lambda r: [p.unlink() for p in (r / "train" / "dog").iterdir()], "holds no images"),
        (lambda r: (r / "train" / "cat" / "cat_0001.png").write_bytes(b"\x89PNG broken"), "cat_0001.png: not a readable image"),
        (lambda r: (r / "train" / "cat" / "cat_0002.png").write_bytes(b""), "cat_0002.png: not a readable image"),
        (lambda r: __import__("shutil").rmtree(r / "test"), "test: missing"),
    ],
)
def test_malformed_trees_give_a_clear_error(imagefolder: Path, damage, message: str) -> None:
    damage(imagefolder)
    dm = CIFAR10DataModule(str(imagefolder), download=False)
    with pytest.raises(DataError, match=message):
        dm.prepare_data()
        dm.setup("fit")


def test_missing_data_dir_is_a_clear_error(tmp_path: Path) -> None:
    dm = CIFAR10DataModule(str(tmp_path / "nowhere"), source="imagefolder")
    with pytest.raises(DataError, match="no such directory"):
        dm.setup("fit")


def test_torchvision_download_verifies_and_loads_the_archive(tmp_path: Path, fake_cifar10_server: str) -> None:
    dm = CIFAR10DataModule(str(tmp_path / "dl"), val_size=10)
    assert dm.source == "cifar10"
    dm.prepare_data()
    assert (tmp_path / "dl" / "cifar-10-python.tar.gz").is_file()
    dm.setup("fit")
    dm.setup("test")
    assert len(dm.train_set) == 40 and len(dm.val_set) == 10 and len(dm.test_set) == 20
    assert dm.train_set.images.dtype == torch.uint8 and dm.train_set.images.shape[1:] == (3, 32, 32)
    assert dm.classes == CLASSES
    # a second prepare_data finds the verified files and does not download again
    (tmp_path / "dl" / "cifar-10-python.tar.gz").unlink()
    dm.prepare_data()
    assert not (tmp_path / "dl" / "cifar-10-python.tar.gz").exists()


def test_download_with_a_wrong_checksum_is_refused(tmp_path: Path, fake_cifar10_server: str, monkeypatch) -> None:
    from torchvision.datasets import CIFAR10

    monkeypatch.setattr(CIFAR10, "tgz_md5", "0" * 32)
    with pytest.raises(DataError, match="could not download CIFAR-10"):
        CIFAR10DataModule(str(tmp_path / "dl")).prepare_data()


def test_a_cache_whose_labels_exceed_the_classes_is_rebuilt_not_trained_on(imagefolder: Path, private_cache: Path) -> None:
    first = data.load_imagefolder(imagefolder)
    (cache_file,) = private_cache.glob("*.pt")
    blob = torch.load(cache_file, weights_only=True)
    blob["train_labels"] = torch.full_like(blob["train_labels"], 99)
    torch.save(blob, cache_file)
    again = data.load_imagefolder(imagefolder)
    assert torch.equal(again["train"].labels, first["train"].labels)


def test_a_float_image_of_nans_is_refused_not_read_as_black(tmp_path: Path) -> None:
    from cifar_lightning.errors import ImageError

    path = tmp_path / "nan.tiff"
    Image.fromarray(np.full((8, 8), np.nan, dtype=np.float32), mode="F").save(path)
    with pytest.raises(ImageError, match="NaN"):
        images.load_image(path)


def test_download_without_network_says_how_to_use_a_local_copy(tmp_path: Path, monkeypatch) -> None:
    import socket

    from torchvision.datasets import CIFAR10

    with socket.socket() as s:  # a port nobody listens on: connection refused, like no network
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(CIFAR10, "url", f"http://127.0.0.1:{port}/cifar-10-python.tar.gz")
    with pytest.raises(DataError, match=r"could not download CIFAR-10 .*point --data-dir at a local copy"):
        CIFAR10DataModule(str(tmp_path / "dl")).prepare_data()
    with pytest.raises(DataError):  # a mistyped --data-dir leaves no empty folder at the typo
        CIFAR10DataModule(str(tmp_path / "typo" / "cifar")).prepare_data()
    assert not (tmp_path / "dl").exists() and not (tmp_path / "typo").exists()


def test_alternating_flip_mirrors_a_seeded_half_first_then_every_image_every_other_epoch() -> None:
    from cifar_lightning.augment import alternating_flip

    n = 4000
    images = torch.arange(n * 3 * 2 * 4, dtype=torch.int32).remainder(251).to(torch.uint8).view(n, 3, 2, 4)
    index = torch.randperm(n)
    base = torch.randint(0, 2, (n,), generator=torch.Generator().manual_seed(0)).bool()
    flipped = []
    for epoch in range(4):
        out = alternating_flip(images[index], index, base, epoch)
        is_flipped = (out != images[index]).flatten(1).any(1)
        assert torch.equal(out[is_flipped], images[index][is_flipped].flip(-1))
        flipped.append(torch.zeros(n, dtype=torch.bool).index_put_((index,), is_flipped))
    assert abs(flipped[0].float().mean().item() - 0.5) < 0.03  # a random half first
    assert torch.equal(flipped[0], base)
    for a, b in zip(flipped[:-1], flipped[1:], strict=True):
        assert torch.equal(a ^ b, torch.ones(n, dtype=torch.bool))  # each image once in any two epochs
    assert torch.equal(flipped[0], flipped[2]) and torch.equal(flipped[1], flipped[3])


def test_the_data_module_applies_the_alternating_flip_to_training_batches_only(imagefolder: Path) -> None:
    from types import SimpleNamespace

    dm = CIFAR10DataModule(str(imagefolder), val_size=20, batch_size=16, augment="standard",
                           augment_options={"crop_padding": 0, "flip": 0.0}, alternate_flip=True, shuffle_seed=3)  # fmt: skip
    dm.setup("fit")
    again = CIFAR10DataModule(str(imagefolder), val_size=20, alternate_flip=True, shuffle_seed=3)
    again.setup("fit")
    assert torch.equal(dm.flip_base, again.flip_base) and len(dm.flip_base) == len(dm.train_set)
    images, labels, index = next(iter(dm.train_dataloader()))
    assert torch.equal(images, dm.train_set.images[index]) and torch.equal(labels, dm.train_set.labels[index])
    for epoch in (0, 1):
        dm.trainer = SimpleNamespace(training=True, current_epoch=epoch, world_size=1)
        x, y = dm.on_after_batch_transfer((images, labels, index), 0)
        mirror = (dm.flip_base[index] ^ bool(epoch)).view(-1, 1, 1, 1)
        assert torch.equal(x, normalize(torch.where(mirror, images.flip(-1), images)))
        assert torch.equal(y, labels)
    dm.trainer = SimpleNamespace(training=False, current_epoch=1, world_size=1)
    val_images, val_labels = next(iter(dm.val_dataloader()))  # evaluation batches carry no index
    assert torch.equal(dm.on_after_batch_transfer((val_images, val_labels), 0)[0], normalize(val_images))
