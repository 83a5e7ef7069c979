"""cifar-evaluate: the report and its folder, the inputs and --out paths it refuses, a full disk and SIGTERM."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import (
    REPO,
    call,
    copy_of_seed_run,
    fill,
    one_error_line,
    sigterm_at,
    train_tiny_run,
    tree_state,
    write_imagefolder,
    write_malicious_checkpoint,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from cifar_lightning import fileio
from cifar_lightning.cli import evaluate_main, export_main, show_data_main
from cifar_lightning.errors import ConfigError

FIGURES = ["confusion.png", "confusion_normalized.png", "predictions.png", "misclassified.png",
           "per_class.png", "calibration.png", "curves.png"]  # fmt: skip


@pytest.fixture(scope="module")
def eval_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2-epoch tiny run with TensorBoard images every epoch: (data tree, run dir)."""
    return train_tiny_run(tmp_path_factory.mktemp("eval"), "--log-images-every", "1", epochs=2)


def test_evaluate_writes_a_full_report_beside_the_run_and_never_overwrites_it(eval_run, capsys) -> None:
    _, run_dir = eval_run
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    assert call(evaluate_main, [str(ckpt), "--accelerator", "cpu", "--grid", "9"]) == 0
    out = run_dir / "report"
    for name in FIGURES:
        with Image.open(out / name) as im:
            assert im.format == "PNG" and min(im.size) > 200 and np.asarray(im.convert("L")).std() > 5, name
    metrics = json.loads((out / "metrics.json").read_text())
    cm = np.array(metrics["confusion_matrix"])
    assert cm.sum() == metrics["num_images"] == 40  # the whole test split
    assert np.trace(cm) / cm.sum() == pytest.approx(metrics["accuracy"])
    assert metrics["model"] == "seed" and metrics["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    report_md = (out / "report.md").read_text()
    assert all(f"({name})" in report_md for name in FIGURES)
    printed = capsys.readouterr().out
    assert "report.md" in printed and "airplane" in printed
    first = (out / "metrics.json").read_bytes()
    # a second evaluation goes to report_2, the first report stays as it was
    assert call(evaluate_main, [str(ckpt), "--accelerator", "cpu", "--split", "val"]) == 0
    assert (out / "metrics.json").read_bytes() == first
    assert json.loads((run_dir / "report_2" / "metrics.json").read_text())["num_images"] == 20


def test_evaluate_refuses_to_replace_an_existing_out_dir_without_overwrite(eval_run, tmp_path: Path, capsys) -> None:
    _, run_dir = eval_run
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code = call(evaluate_main, [str(run_dir / "checkpoints/last.ckpt"), "--out", str(out)])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("kind", ["foreign", "garbage", "malicious", "missing-data", "missing-ckpt"])
def test_evaluate_bad_inputs_give_one_line_and_no_report(eval_run, tmp_path: Path, capsys, kind: str) -> None:
    _, run_dir = eval_run
    ckpt, extra = run_dir / "checkpoints/last.ckpt", []
    marker = tmp_path / "pwned"
    if kind == "foreign":
        ckpt = tmp_path / "other.ckpt"
        torch.save({"state_dict": {"w": torch.zeros(2)}, "hyper_parameters": {"model": "resnet-elsewhere"}}, ckpt)
    elif kind == "garbage":
        ckpt = tmp_path / "garbage.ckpt"
        ckpt.write_bytes(b"\x00\x01garbage")
    elif kind == "malicious":
        ckpt = write_malicious_checkpoint(tmp_path / "evil.ckpt", marker)
    elif kind == "missing-data":
        extra = ["--data-dir", str(tmp_path / "nowhere"), "--no-download"]
    else:
        ckpt = tmp_path / "absent.ckpt"
    out = tmp_path / "report"
    code = call(evaluate_main, [str(ckpt), "--out", str(out), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "Traceback" not in err[0], err
    assert not out.exists() and not marker.exists()


def test_training_logs_confusion_and_prediction_images_to_tensorboard(eval_run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir = eval_run
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["images"]
    assert "val/confusion" in tags and "val/predictions" in tags
    assert len(events.Images("val/confusion")) == 2  # one per validation epoch


@pytest.mark.parametrize("augment", ["none", "seed"])
def test_show_data_draws_the_data_grid_and_keeps_existing_files(eval_run, tmp_path: Path, capsys, augment: str) -> None:
    tree, _ = eval_run
    out = tmp_path / "grid.png"
    assert call(show_data_main, ["--data-dir", str(tree), "--augment", augment, "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert min(im.size) > 300 and np.asarray(im.convert("L")).std() > 5
    before = out.read_bytes()
    assert call(show_data_main, ["--data-dir", str(tree), "--out", str(out)]) == 2
    assert "exists" in capsys.readouterr().err and out.read_bytes() == before


@pytest.mark.unit
@pytest.mark.parametrize(("extra", "says"), [
    (["--corruptions", "gaussian_noise", "--seed", "100000000000000000"], "--seed"),
    (["--corruptions", ""], "--corruptions"),
    (["--seed", "-1"], "--seed"),
])  # fmt: skip
def test_a_bad_seed_or_an_empty_corruption_list_is_refused_before_any_scoring(tmp_path: Path, capsys, extra, says) -> None:
    assert call(evaluate_main, ["pretrained:94", "--data-dir", str(tmp_path / "absent"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0] and "--data-dir" not in err[0]  # refused before the data was looked for


@pytest.mark.unit
def test_a_symlinked_out_folder_is_refused_before_the_work(tmp_path: Path, capsys) -> None:
    real = tmp_path / "real"
    real.mkdir()
    (real / "mine.txt").write_text("kept")
    link = tmp_path / "link"
    link.symlink_to(real)
    assert call(evaluate_main, ["pretrained:94", "--data-dir", str(tmp_path / "absent"), "--out", str(link), "--overwrite"]) == 2
    err = capsys.readouterr().err
    assert "symbolic link" in err and "rmtree" not in err and (real / "mine.txt").read_text() == "kept"


# ----------------------------------------------------------------------------- bad inputs


def test_a_model_scored_on_other_class_names_is_refused(run, tmp_path: Path, capsys) -> None:
    other = write_imagefolder(tmp_path / "other", n_train=1, n_test=2, classes=[f"thing{i}" for i in range(10)])
    assert call(evaluate_main, [str(run["ckpt"]), "--data-dir", str(other), "--out", str(tmp_path / "r")]) == 2
    assert "not the model's" in one_error_line(capsys)
    assert not (tmp_path / "r").exists()


def test_a_run_recorded_by_another_version_is_scored_on_its_recorded_data(seed_run_once, tmp_path: Path, capsys) -> None:
    """A config.yaml with an option this version does not know still gives its data dir and
    split: the evaluation reads them rather than falling back to ./data and a download."""
    tree, run_dir = copy_of_seed_run(seed_run_once, tmp_path / "copy")
    config = run_dir / "config.yaml"
    config.write_text(config.read_text() + "an_option_from_a_later_version: 3\n")
    cwd = os.getcwd()
    os.chdir(tmp_path)  # where a fallback to ./data would download
    try:
        assert call(evaluate_main, [str(run_dir / "checkpoints" / "last.ckpt"), "--split", "val", "--accelerator", "cpu"]) == 0
    finally:
        os.chdir(cwd)
    assert not (tmp_path / "data").exists()
    assert json.loads((run_dir / "report" / "metrics.json").read_text())["split"] == "val"
    shutil.rmtree(tree)  # the recorded data dir is gone: one line, not a download
    assert call(evaluate_main, [str(run_dir / "checkpoints" / "last.ckpt"), "--accelerator", "cpu"]) == 2
    assert "is gone; pass --data-dir" in one_error_line(capsys)


# ----------------------------------------------------------------------------- the report folder


def test_an_evaluation_never_takes_a_report_folder_another_one_claimed(run, capsys) -> None:
    claimed = run["run"] / "report"
    claimed.mkdir()  # what a concurrent cifar-evaluate has just claimed
    try:
        assert call(evaluate_main, [str(run["ckpt"]), "--accelerator", "cpu"]) == 0
        assert list(claimed.iterdir()) == []  # left to its owner
        assert (run["run"] / "report_2" / "metrics.json").is_file()
    finally:
        shutil.rmtree(claimed), shutil.rmtree(run["run"] / "report_2", ignore_errors=True)


def test_two_evaluations_choosing_at_once_get_different_report_folders(run) -> None:
    """The race itself: both choose before either writes. Each choice claims its folder."""
    from cifar_lightning.evaluate import report_dir

    first = report_dir(run["ckpt"], run["run"], None, False)
    second = report_dir(run["ckpt"], run["run"], None, False)
    try:
        assert first != second and first.is_dir() and second.is_dir()
    finally:
        first.rmdir(), second.rmdir()


# ----------------------------------------------------------------------------- --out never names an input, by any name


def test_out_that_is_or_contains_an_input_is_refused_even_with_overwrite(run, tmp_path: Path, capsys) -> None:
    before = run["ckpt"].read_bytes()
    assert call(evaluate_main, [str(run["ckpt"]), "--out", str(run["run"]), "--overwrite"]) == 2
    assert "would overwrite" in one_error_line(capsys)
    assert call(evaluate_main, [str(run["ckpt"]), "--out", str(run["tree"] / "train" / "cat" / "r"), "--overwrite"]) == 2
    assert "data dir" in one_error_line(capsys)
    assert call(export_main, [str(run["ckpt"]), "--format", "torchscript", "--out", str(run["ckpt"].with_suffix(".pt"))]) == 0
    capsys.readouterr()
    copy = tmp_path / "m.pt"
    shutil.copy(run["ckpt"], copy)
    assert call(export_main, [str(copy), "--format", "torchscript", "--out", str(copy), "--overwrite", "--data-dir", str(run["tree"])]) == 2
    assert "would overwrite the model it exports" in one_error_line(capsys)
    assert run["ckpt"].read_bytes() == before and copy.read_bytes() == before
    assert not (run["tree"] / "train" / "cat" / "r").exists()


def alias_of(kind: str, target: Path, scratch: Path) -> Path:
    """Another name for ``target`` (a file or folder): a symlinked parent, a '..' detour, a
    symlink to the thing itself, or a hard link (files only)."""
    scratch.mkdir(parents=True, exist_ok=True)
    if kind == "parent-link":
        link = scratch / "link"
        if not link.exists():
            link.symlink_to(target.parent, target_is_directory=True)
        return link / target.name
    if kind == "dotdot":
        return target.parent / "sub_that_is_not_there" / ".." / target.name
    if kind == "self-link":
        link = scratch / f"self_{target.name}"
        if not link.exists():
            link.symlink_to(target, target_is_directory=target.is_dir())
        return link
    if kind == "hard-link":
        link = scratch / f"hard_{target.name}"
        if not link.exists():
            os.link(target, link)
        return link
    raise AssertionError(kind)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["parent-link", "dotdot", "self-link", "hard-link"]), what=st.sampled_from(["checkpoint", "run", "logs"]))
def test_generated_aliases_of_an_input_are_always_refused(tmp_path: Path, kind: str, what: str) -> None:
    """An --out that names the checkpoint, its run, or a folder holding the run, by another name."""
    run = tmp_path / "logs" / "version_0"
    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.write_bytes(b"weights")
    target = {"checkpoint": ckpt, "run": run, "logs": run.parent}[what if kind != "hard-link" else "checkpoint"]
    out = alias_of(kind, target, Path(tempfile.mkdtemp(dir=tmp_path)))
    with pytest.raises(ConfigError, match="would overwrite"):
        fileio.refuse_overlap(out, {"checkpoint": ckpt, "training run": run})
    assert ckpt.read_bytes() == b"weights"


@settings(max_examples=30, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(kind=st.sampled_from(["parent-link", "dotdot", "self-link"]), name=st.sampled_from(["x.png", "cat/x.png", "dog/zz.png"]))
def test_generated_aliases_into_the_data_dir_are_always_refused(tmp_path: Path, kind: str, name: str) -> None:
    data = tmp_path / "data"
    (data / "train" / "cat").mkdir(parents=True, exist_ok=True)
    (data / "train" / "dog").mkdir(parents=True, exist_ok=True)
    out = alias_of(kind, data / "train", Path(tempfile.mkdtemp(dir=tmp_path))) / name
    with pytest.raises(ConfigError):
        fileio.refuse_overlap(out, {"data dir": data}, inside={"data dir": data})


def test_evaluate_through_a_symlinked_log_dir_never_deletes_the_run(run, tmp_path: Path, capsys) -> None:
    link = tmp_path / "LINK"
    link.symlink_to(run["logs"], target_is_directory=True)
    before = tree_state(run["run"])
    assert call(evaluate_main, [str(run["ckpt"]), "--out", str(link / run["run"].name), "--overwrite"]) == 2
    assert "would overwrite" in one_error_line(capsys)
    assert tree_state(run["run"]) == before


def test_evaluate_never_writes_its_report_into_the_data_through_an_alias(run, tmp_path: Path, capsys) -> None:
    tree = Path(shutil.copytree(run["tree"], tmp_path / "tree"))
    link = tmp_path / "T"
    link.symlink_to(tree, target_is_directory=True)
    before = tree_state(tree)
    for out in (link / "train" / "cat" / "report", tree / "x" / ".." / "train" / "dog"):
        assert call(evaluate_main, [str(run["ckpt"]), "--data-dir", str(tree), "--out", str(out), "--overwrite"]) == 2
        assert "--out" in one_error_line(capsys)
    assert tree_state(tree) == before


# ----------------------------------------------------------------------------- faults: a full disk, SIGTERM


@pytest.mark.faults
def test_a_report_to_a_full_disk_is_exit_1_and_leaves_nothing(run, small_disk: Path) -> None:
    fill(small_disk, leave=8 << 10)
    proc = subprocess.run([sys.executable, "-m", "cifar_lightning", "evaluate", str(run["ckpt"]), "--out", str(small_disk / "r")],
                          cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "no space left" in lines[-1] and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


@pytest.mark.faults
def test_sigterm_during_an_evaluation_leaves_no_claimed_folder(run, tmp_path: Path) -> None:
    _, moved = copy_of_seed_run((run["tree"], run["run"]), tmp_path / "copy")
    before = sorted(p.name for p in moved.iterdir())
    proc = sigterm_at("cifar_lightning.report.write_report", ["evaluate", str(moved / "checkpoints" / "last.ckpt")], tmp_path)
    assert proc.returncode == 128 + signal.SIGTERM and "Traceback" not in proc.stderr, proc.stderr
    assert sorted(p.name for p in moved.iterdir()) == before  # no report/, no hidden temp folder
    assert call(evaluate_main, [str(moved / "checkpoints" / "last.ckpt")]) == 0
    assert (moved / "report" / "report.md").is_file()  # the next evaluation gets report/, not report_2/
