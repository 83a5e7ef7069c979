"""The data module: image folders, their decoded-image cache, image decoding, splits and the CIFAR-10 download."""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, call, one_error_line, png_bomb, tiny_train_argv, tree_of, write_imagefolder
from PIL import Image

from cifar_lightning import data, fileio, images
from cifar_lightning.cli import train_main
from cifar_lightning.data import CIFAR10DataModule
from cifar_lightning.errors import DataError, printable
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


# ----------------------------------------------------------------------------- images too big to decode whole


@pytest.mark.subprocess
def test_a_huge_jpeg_decodes_in_bounded_memory(tmp_path: Path) -> None:
    big = tmp_path / "big.jpg"
    subprocess.run([sys.executable, "-c", f"from PIL import Image; Image.new('RGB', (9000, 9000), (200, 30, 40)).save({str(big)!r})"],
                   check=True)  # fmt: skip
    probe = (
        "import resource, sys\n"
        "from cifar_lightning.images import load_image\n"
        "base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "a = load_image(sys.argv[1])\n"
        "print(a.shape, (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)"
    )
    out = subprocess.run([sys.executable, "-c", probe, str(big)], capture_output=True, text=True, check=True, cwd=REPO).stdout
    shape, grown_mb = out.strip().rsplit(" ", 1)
    assert shape == "(32, 32, 3)"
    assert int(grown_mb) < 60  # a full decode needs 243 MB


def test_a_decompression_bomb_in_a_training_folder_is_named(run, tmp_path: Path, capsys) -> None:
    tree = Path(shutil.copytree(run["tree"], tmp_path / "tree"))
    png_bomb(tree / "train" / "cat" / "zz_bomb.png")
    assert call(train_main, tiny_train_argv(tree, tmp_path / "logs")) == 2
    assert "zz_bomb.png" in one_error_line(capsys)
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").glob("version_*"))


# ----------------------------------------------------------------------------- a cache that cannot be written


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if "warning" in line.lower()]


def left_in(folder: Path) -> list[str]:
    """Every entry under folder, hidden temporary files included."""
    return sorted(os.fsdecode(p) for p in os.listdir(folder)) if folder.is_dir() else []


@pytest.fixture
def full_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: far too small for any decoded-image cache, so writing one fails with a
    real ENOSPC part-way. Mounting needs root; elsewhere the test is skipped."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    mount = tmp_path / "full_disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(mount)], capture_output=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.decode(errors='replace').strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_full_cache_disk_warns_once_and_the_images_still_load(full_disk: Path, tmp_path: Path, capsys) -> None:
    tree = write_imagefolder(tmp_path / "tree", n_train=12, n_test=4)  # ~0.5 MB decoded: 8x the disk
    splits = data.load_imagefolder(tree, cache_dir=full_disk)
    assert splits["train"].images.shape == (120, 3, 32, 32) and splits["test"].images.shape == (40, 3, 32, 32)
    warned = warnings_in(capsys.readouterr().err)
    assert len(warned) == 1 and "No space left on device" in warned[0]
    assert left_in(full_disk) == []  # no partial temp file takes the little space there is
    again = data.load_imagefolder(tree, cache_dir=full_disk)  # and again: decoded afresh, same pixels
    assert torch.equal(again["train"].images, splits["train"].images)


@pytest.mark.faults
def test_training_with_its_cache_on_a_full_disk_goes_on(full_disk: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    tree = write_imagefolder(tmp_path / "tree")
    monkeypatch.setenv("CIFAR_LIGHTNING_CACHE", str(full_disk))
    assert call(train_main, tiny_train_argv(tree, tmp_path / "logs", "--log-images-every", "0")) == 0
    assert len([w for w in warnings_in(capsys.readouterr().err) if "cache" in w]) == 1
    assert left_in(full_disk) == []
    assert (tmp_path / "logs" / "version_0" / "results.json").is_file()


def _half_written_then(exc: BaseException):
    """A stand-in for fileio.atomic_write whose write puts half the bytes into the temporary
    file and then fails as a full disk (or torch's zip writer on one) does."""
    real = fileio.atomic_write

    def atomic_write(path, write, *args, **kwargs):
        def failing(tmp: Path) -> None:
            tmp.write_bytes(b"PK\x03\x04" + b"\0" * 1000)
            raise exc

        return real(path, failing, *args, **kwargs)

    return atomic_write


CACHE_WRITE_FAILURES = {
    "ENOSPC": OSError(errno.ENOSPC, "No space left on device"),
    "EDQUOT": OSError(errno.EDQUOT, "Disk quota exceeded"),
    "EIO": OSError(errno.EIO, "Input/output error"),
    "torch's writer": RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1280 vs 1174"),
}


@pytest.mark.parametrize("exc", CACHE_WRITE_FAILURES.values(), ids=CACHE_WRITE_FAILURES.keys())
def test_any_failure_to_write_the_cache_is_one_warning_and_no_temp_file(
    exc: BaseException, tmp_path: Path, monkeypatch, capsys
) -> None:
    tree, cache = tree_of(tmp_path / "tree"), tmp_path / "cache"
    monkeypatch.setattr(data, "atomic_write", _half_written_then(exc))
    splits = data.load_imagefolder(tree, cache_dir=cache)
    assert splits["train"].images.shape == (6, 3, 32, 32) and splits["test"].labels.tolist() == [0, 1]
    assert len(warnings_in(capsys.readouterr().err)) == 1
    assert left_in(cache) == []


def test_torch_save_failing_is_one_warning_too(tmp_path: Path, monkeypatch, capsys) -> None:
    def failing_save(*a, **k):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file")

    monkeypatch.setattr(torch, "save", failing_save)
    splits = data.load_imagefolder(tree_of(tmp_path / "tree"), cache_dir=tmp_path / "cache")
    assert len(splits["train"].labels) == 6
    assert len(warnings_in(capsys.readouterr().err)) == 1 and left_in(tmp_path / "cache") == []


def test_an_unwritable_cache_dir_is_one_warning(tmp_path: Path, capsys) -> None:
    blocker = tmp_path / "not_a_dir"
    blocker.write_text("a file where the cache dir should be")
    assert len(data.load_imagefolder(tree_of(tmp_path / "tree"), cache_dir=blocker / "cache")["train"].labels) == 6
    assert len(warnings_in(capsys.readouterr().err)) == 1


@pytest.mark.parametrize("keep", [0, 100, 0.5, -1], ids=["empty", "header", "half", "one-byte-short"])
def test_a_truncated_cache_file_is_treated_as_absent(keep: float, tmp_path: Path, capsys) -> None:
    tree, cache = tree_of(tmp_path / "tree"), tmp_path / "cache"
    first = data.load_imagefolder(tree, cache_dir=cache)
    (cache_file,) = cache.glob("*.pt")
    whole = cache_file.read_bytes()
    cache_file.write_bytes(whole[: int(len(whole) * keep) if isinstance(keep, float) else keep])
    again = data.load_imagefolder(tree, cache_dir=cache)
    assert torch.equal(again["train"].images, first["train"].images)
    assert cache_file.read_bytes() == whole  # rebuilt whole
    assert warnings_in(capsys.readouterr().err) == []


# ----------------------------------------------------------------------------- names that are not UTF-8


NOT_UTF8 = b"caf\xe9.png"  # Latin-1 bytes: a valid POSIX file name, not UTF-8


def _copy_bytes_named(src: Path, folder: Path, name: bytes) -> Path:
    with open(os.path.join(os.fsencode(folder), name), "wb") as f:
        f.write(src.read_bytes())
    return Path(os.fsdecode(os.path.join(os.fsencode(folder), name)))


@pytest.fixture
def latin1_tree(tmp_path: Path) -> Path:
    tree = tree_of(tmp_path / "tree")
    try:
        _copy_bytes_named(tree / "train/apple/apple_0000.png", tree / "train/apple", NOT_UTF8)
        nested = os.path.join(os.fsencode(tree / "train/pear"), b"sub\xff")
        os.mkdir(nested)
        _copy_bytes_named(tree / "train/pear/pear_0000.png", Path(os.fsdecode(nested)), b"\xfe\xfd.png")
    except (OSError, UnicodeError) as e:  # e.g. a file system that only takes UTF-8 names
        pytest.skip(f"this file system refuses names that are not UTF-8 ({e})")
    return tree


def test_an_image_whose_name_is_not_utf8_loads_and_is_cached(latin1_tree: Path, tmp_path: Path, monkeypatch) -> None:
    cache = tmp_path / "cache"
    splits = data.load_imagefolder(latin1_tree, cache_dir=cache)
    assert torch.bincount(splits["train"].labels).tolist() == [4, 4]
    original = np.array(Image.open(latin1_tree / "train/apple/apple_0000.png"))
    assert any(torch.equal(im, torch.from_numpy(original).permute(2, 0, 1)) for im in splits["train"].images)
    listing = data.imagefolder_listing(latin1_tree)
    fp = data.listing_fingerprint(listing, latin1_tree)
    assert len(fp) == 64 and fp == data.listing_fingerprint(listing, latin1_tree)

    monkeypatch.setattr(data, "decode_image", lambda *a: pytest.fail("decoded again although the cache was fresh"))
    assert torch.equal(data.load_imagefolder(latin1_tree, cache_dir=cache)["train"].images, splits["train"].images)


def test_renaming_to_a_name_that_is_not_utf8_makes_the_cache_stale(tmp_path: Path) -> None:
    tree = tree_of(tmp_path / "tree")
    before = data.listing_fingerprint(data.imagefolder_listing(tree), tree)
    os.rename(tree / "train/apple/apple_0001.png", os.path.join(os.fsencode(tree / "train/apple"), NOT_UTF8))
    assert data.listing_fingerprint(data.imagefolder_listing(tree), tree) != before


def test_a_data_dir_whose_name_is_not_utf8_loads(tmp_path: Path) -> None:
    root = Path(os.fsdecode(os.path.join(os.fsencode(tmp_path), b"d\xe9ta")))
    tree = tree_of(root)
    assert len(data.load_imagefolder(tree, cache_dir=tmp_path / "cache")["test"].labels) == 2
    assert data.cache_path_for(tree, tmp_path / "cache").parent == tmp_path / "cache"


def test_an_unreadable_image_whose_name_is_not_utf8_is_a_printable_data_error(tmp_path: Path) -> None:
    tree = tree_of(tmp_path / "tree")
    with open(os.path.join(os.fsencode(tree / "train/apple"), NOT_UTF8), "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n broken")
    with pytest.raises(DataError) as caught:
        data.load_imagefolder(tree, cache_dir=tmp_path / "cache")
    message = str(caught.value)
    assert "caf\\xe9.png" in message and "\n" not in message
    message.encode("utf-8")  # printable anywhere: a terminal, a log, JSON, YAML


def test_a_class_folder_whose_name_is_not_utf8_is_refused_in_one_clear_line(tmp_path: Path, capsys) -> None:
    """Class names go into results.json, config.yaml, checkpoints and figures: refused up front."""
    tree = tree_of(tmp_path / "tree")
    for split in ("train", "test"):
        os.rename(tree / split / "pear", os.path.join(os.fsencode(tree / split), b"p\xeaar"))
    with pytest.raises(DataError, match=r"p\\xeaar.*not valid UTF-8"):
        data.imagefolder_listing(tree)
    assert call(train_main, tiny_train_argv(tree, tmp_path / "logs")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "p\\xeaar" in err[0] and "UTF-8" in err[0]
    err[0].encode("utf-8")


@pytest.mark.train
def test_training_on_a_tree_with_names_that_are_not_utf8_succeeds(latin1_tree: Path, tmp_path: Path) -> None:
    assert call(train_main, tiny_train_argv(latin1_tree, tmp_path / "logs", "--val-size", "2")) == 0


def test_printable_shows_bytes_that_are_not_utf8_escaped_and_leaves_the_rest() -> None:
    assert printable(os.fsdecode(b"/data/caf\xe9.png")) == "/data/caf\\xe9.png"
    assert printable(Path("/données/猫.png")) == "/données/猫.png"
    assert printable("lone \ud800 surrogate").encode("utf-8")
