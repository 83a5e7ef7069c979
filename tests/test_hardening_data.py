"""Data and figures under hostile conditions: a cache dir on a full disk, file and folder names
that are not UTF-8, class names that matplotlib would read as math markup."""

from __future__ import annotations

import errno
import io
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import matplotlib.cbook
import numpy as np
import pytest
import torch
from conftest import call, tiny_train_argv, write_imagefolder
from PIL import Image

from cifar_lightning import data, fileio, report, show_data
from cifar_lightning.cli import train_main
from cifar_lightning.errors import DataError, printable

CLASSES_2 = ("apple", "pear")


def tree_of(root: Path, classes: tuple[str, ...] = CLASSES_2, n_train: int = 3, n_test: int = 1) -> Path:
    return write_imagefolder(root, n_train=n_train, n_test=n_test, classes=classes)


def warnings_in(err: str) -> list[str]:
    return [line for line in err.splitlines() if "warning" in line.lower()]


def left_in(folder: Path) -> list[str]:
    """Every entry under folder, hidden temporary files included."""
    return sorted(os.fsdecode(p) for p in os.listdir(folder)) if folder.is_dir() else []


# ----------------------------------------------------------------------------- a full cache disk


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


# ----------------------------------------------------------------------------- names matplotlib reads as math

MARKUP_NAMES = ["$x$", "$$", "a$b$c", "back\\slash", "^_", "$^_$", "$\\frac{$", "a$b", "x" * 255, "last"]
NAME_SETS = {
    "dollars": MARKUP_NAMES,
    "one-dollar-pair": ["$cat$", "dog"],
    "only-dollars": ["$", "$$", "$$$", "$$$$"],
    "not-utf8": [os.fsdecode(b"caf\xe9"), "$\\alpha$"],
}


def _predictions(n_classes: int, n: int = 20) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return images, torch.arange(n) % n_classes, torch.rand(n, n_classes, generator=g).softmax(1)


def _draw(fig) -> None:
    """Draw as TensorBoard's add_figure does (outside report.py), then as a PNG file."""
    fig.canvas.draw()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    assert buf.getvalue().startswith(b"\x89PNG")
    report.plt.close(fig)


@pytest.mark.parametrize("names", NAME_SETS.values(), ids=NAME_SETS.keys())
def test_figures_draw_class_names_with_markup_characters_literally(names: list[str], tmp_path: Path) -> None:
    images, labels, probs = _predictions(len(names))
    metrics = report.compute_metrics(probs, labels, names)
    _draw(report.confusion_figure(metrics["confusion_matrix"], names))
    _draw(report.confusion_figure(metrics["confusion_matrix"], names, normalize=True))
    _draw(report.per_class_figure(metrics))
    _draw(report.prediction_grid(images, labels, probs, names, title="$HOME/runs/$x$: a$b$c"))
    _draw(report.data_grid_figure(images, labels, names, per_class=2))
    _draw(report.corruption_figure({"$noise$": [{"accuracy": 0.5, "label": "σ $0.1$"}]}))
    if printable("".join(names)) == "".join(names):
        # (a class name that is not UTF-8 never reaches a report: data.py refuses its folder)
        m = report.write_report(tmp_path / "r", probs, labels, images, names, {"model": "seed"}, grid=9)
        assert list(m["per_class"]) == names  # the records keep the names as they are
        assert all((tmp_path / "r" / f).is_file() for f in ("confusion.png", "per_class.png", "predictions.png"))


@pytest.mark.parametrize("name", [*MARKUP_NAMES, "plain", "\\$", "a\\$b$"])
def test_literal_text_is_never_math_and_draws_back_to_the_name(name: str) -> None:
    text = report.literal(name, max_chars=1000)
    assert not matplotlib.cbook.is_math_text(text)
    assert text.replace("\\$", "$") == name  # what matplotlib draws for a text that is not math
    assert len(report.literal("y" * 255)) <= report.MAX_LABEL


def test_the_drawn_tick_labels_are_the_class_names_as_typed() -> None:
    names = ["$x$", "a$b$c", "^_"]
    fig = report.confusion_figure(np.eye(3), names)
    fig.canvas.draw()
    ax = fig.axes[0]
    drawn = [t._preprocess_math(t.get_text()) for t in ax.get_xticklabels()]  # what the renderer gets
    assert drawn == [(n, False) for n in names]
    report.plt.close(fig)


def test_show_data_draws_class_folders_named_with_markup(tmp_path: Path, capsys) -> None:
    tree = tree_of(tmp_path / "tree", classes=("$$", "$x$", "^_", "a$b$c", "back\\slash"), n_train=2)
    out = tmp_path / "grid.png"
    assert show_data.show_data_command(str(tree), out=str(out)) == out
    with Image.open(out) as im:
        assert im.format == "PNG" and min(im.size) > 100
    out_aug = tmp_path / "grid_seed.png"
    assert show_data.show_data_command(str(tree), augment="seed", out=str(out_aug)) == out_aug
    assert out_aug.is_file()
