"""cifar-show-data: class names drawn literally, and never a write into its data or a file left on a full disk."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, call, fill, one_error_line, tree_of, tree_state
from PIL import Image

from cifar_lightning import show_data
from cifar_lightning.cli import show_data_main


def test_show_data_draws_class_folders_named_with_markup(tmp_path: Path, capsys) -> None:
    tree = tree_of(tmp_path / "tree", classes=("$$", "$x$", "^_", "a$b$c", "back\\slash"), n_train=2)
    out = tmp_path / "grid.png"
    assert show_data.show_data_command(str(tree), out=str(out)) == out
    with Image.open(out) as im:
        assert im.format == "PNG" and min(im.size) > 100
    out_aug = tmp_path / "grid_seed.png"
    assert show_data.show_data_command(str(tree), augment="seed", out=str(out_aug)) == out_aug
    assert out_aug.is_file()


def test_show_data_never_writes_into_its_data_through_an_alias(run, tmp_path: Path, capsys) -> None:
    tree = Path(shutil.copytree(run["tree"], tmp_path / "tree"))
    link = tmp_path / "T"
    link.symlink_to(tree, target_is_directory=True)
    before = tree_state(tree)
    victim = next((tree / "train" / "cat").iterdir())
    for out in (link / "train" / "cat" / victim.name, link / "train" / "dog" / "zz.png", tree / "nothere" / ".." / "train" / "x.png"):
        assert call(show_data_main, ["--data-dir", str(tree), "--out", str(out), "--overwrite"]) == 2
        assert "--out" in one_error_line(capsys)
    assert tree_state(tree) == before


@pytest.mark.faults
def test_show_data_to_a_full_disk_is_exit_1_and_leaves_nothing(run, small_disk: Path) -> None:
    fill(small_disk, leave=4 << 10)
    argv = ["show-data", "--data-dir", str(run["tree"]), "--out", str(small_disk / "g.png")]
    proc = subprocess.run([sys.executable, "-m", "cifar_lightning", *argv], cwd=REPO, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "no space left" in lines[0], proc.stderr
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]
