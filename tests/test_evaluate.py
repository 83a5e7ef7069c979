"""cifar-evaluate and cifar-show-data end to end on tiny synthetic data, and the TensorBoard
images logged during training."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import call, train_tiny_run, write_malicious_checkpoint
from PIL import Image

from cifar_lightning.cli import evaluate_main, show_data_main

FIGURES = ["confusion.png", "confusion_normalized.png", "predictions.png", "misclassified.png",
           "per_class.png", "calibration.png", "curves.png"]  # fmt: skip


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A 2-epoch tiny run with TensorBoard images every epoch: (data tree, run dir)."""
    return train_tiny_run(tmp_path_factory.mktemp("eval"), "--log-images-every", "1", epochs=2)


def test_evaluate_writes_a_full_report_beside_the_run_and_never_overwrites_it(run, capsys) -> None:
    _, run_dir = run
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


def test_evaluate_refuses_to_replace_an_existing_out_dir_without_overwrite(run, tmp_path: Path, capsys) -> None:
    _, run_dir = run
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    code = call(evaluate_main, [str(run_dir / "checkpoints/last.ckpt"), "--out", str(out)])
    assert code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "keep me"


@pytest.mark.parametrize("kind", ["foreign", "garbage", "malicious", "missing-data", "missing-ckpt"])
def test_evaluate_bad_inputs_give_one_line_and_no_report(run, tmp_path: Path, capsys, kind: str) -> None:
    _, run_dir = run
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


def test_training_logs_confusion_and_prediction_images_to_tensorboard(run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _, run_dir = run
    events = EventAccumulator(str(run_dir), size_guidance={"images": 0})
    events.Reload()
    tags = events.Tags()["images"]
    assert "val/confusion" in tags and "val/predictions" in tags
    assert len(events.Images("val/confusion")) == 2  # one per validation epoch


@pytest.mark.parametrize("augment", ["none", "seed"])
def test_show_data_draws_the_data_grid_and_keeps_existing_files(run, tmp_path: Path, capsys, augment: str) -> None:
    tree, _ = run
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
