"""cifar-export: every format and its sidecar, and the --out paths, disks and signals it must survive."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, call, fill, leftovers, one_error_line, sample_images, sigterm_at

from cifar_lightning import fileio, load_classifier
from cifar_lightning.cli import export_main
from cifar_lightning.errors import ConfigError, ModelError, exit_status
from cifar_lightning.images import normalize
from cifar_lightning.inference import as_uint8_batch


def test_every_export_predicts_what_the_checkpoint_predicts(trained) -> None:
    files = sample_images(trained["tree"])
    ref_classes, ref = load_classifier(trained["ckpt"]).predict(files)
    for fmt in ("safetensors", "onnx", "pt2"):
        classes, probs = load_classifier(trained[fmt]).predict(files)
        assert classes == ref_classes and torch.allclose(probs, ref, atol=1e-5), fmt
    scripted = torch.jit.load(str(trained["torchscript"]))
    x = normalize(as_uint8_batch(files))
    assert torch.allclose(scripted(x).softmax(1), ref, atol=1e-5)


def test_sidecar_carries_what_is_needed_to_use_the_model(trained) -> None:
    meta = json.loads((trained["root"] / "model.safetensors.json").read_text())
    assert meta["model"] == "seed" and meta["model_args"]["num_classes"] == 10
    assert meta["class_names"][0] == "airplane" and meta["input_size"] == [3, 32, 32]
    assert meta["mean"] == [0.4914, 0.4822, 0.4465] and meta["std"] == [0.2470, 0.2435, 0.2616]
    assert meta["source_sha256"] == hashlib.sha256(trained["ckpt"].read_bytes()).hexdigest()
    # the exported checkpoint is the one the run tested: the sidecar carries that run's test accuracy
    results = json.loads((trained["run"] / "results.json").read_text())
    assert Path(results["best_checkpoint"]) == trained["ckpt"]
    assert meta["test_accuracy"] == pytest.approx(results["test_acc"])
    onnx_meta = json.loads((trained["root"] / "model.onnx.json").read_text())
    assert onnx_meta["check"]["max_abs_logit_diff"] < 1e-4 and onnx_meta["check"]["same_top1"] == onnx_meta["check"]["images"]


def test_onnx_export_takes_any_batch_size(trained) -> None:
    import onnxruntime as ort

    session = ort.InferenceSession(str(trained["onnx"]), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        out = session.run(None, {session.get_inputs()[0].name: np.zeros((n, 3, 32, 32), np.float32)})[0]
        assert out.shape == (n, 10)


def test_an_export_gets_its_suffix_and_a_renamed_model_is_recognised_by_content(run, tmp_path: Path, capsys) -> None:
    assert call(export_main, [str(run["ckpt"]), "--format", "onnx", "--out", str(tmp_path / "model")]) == 0
    assert (tmp_path / "model.onnx").is_file() and (tmp_path / "model.onnx.json").is_file()
    assert call(export_main, [str(run["ckpt"]), "--format", "onnx", "--out", str(tmp_path / "m.safetensors")]) == 2
    assert "safetensors" in one_error_line(capsys)
    shutil.copy(tmp_path / "model.onnx", tmp_path / "renamed")
    shutil.copy(run["ckpt"], tmp_path / "weights.bin")
    for path in (tmp_path / "renamed", tmp_path / "weights.bin"):
        classes, _ = load_classifier(path).predict([run["good"]])
        assert classes == load_classifier(run["ckpt"]).predict([run["good"]])[0], path.name


def test_exports_are_as_readable_as_other_outputs_and_errors_name_the_tensor_and_folder(run, tmp_path: Path, capsys) -> None:
    assert call(export_main, [str(run["ckpt"]), "--format", "safetensors", "--out", str(tmp_path / "m.safetensors")]) == 0
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "m.safetensors").stat().st_mode & 0o777 == 0o666 & ~umask
    assert (tmp_path / "m.safetensors.json").stat().st_mode & 0o777 == 0o666 & ~umask
    ckpt = torch.load(run["ckpt"], map_location="cpu", weights_only=True)
    name = next(k for k in ckpt["state_dict"] if k.endswith("weight"))
    ckpt["state_dict"][name] = ckpt["state_dict"][name][:1]
    torch.save(ckpt, tmp_path / "shape.ckpt")
    with pytest.raises(ModelError, match=name.removeprefix("net.").split(".")[0]):
        load_classifier(tmp_path / "shape.ckpt")
    with pytest.raises(ModelError, match="is a folder"):
        load_classifier(tmp_path)
    assert np.isfinite(load_classifier(run["ckpt"]).predict([run["good"]])[1].numpy()).all()


# ----------------------------------------------------------------------------- what an export never replaces, and the checks it makes first


def test_export_never_replaces_an_existing_file_without_overwrite(trained, capsys) -> None:
    before = trained["onnx"].read_bytes()
    assert call(export_main, [str(trained["ckpt"]), "--format", "onnx", "--out", str(trained["onnx"])]) == 2
    assert "--overwrite" in capsys.readouterr().err and trained["onnx"].read_bytes() == before


def test_export_never_replaces_a_users_file_at_the_sidecar_path(trained, tmp_path: Path, capsys) -> None:
    out = tmp_path / "m.safetensors"
    side = tmp_path / "m.safetensors.json"
    side.write_text("my own notes")
    assert call(export_main, [str(trained["ckpt"]), "--format", "safetensors", "--out", str(out)]) == 2
    assert side.read_text() == "my own notes" and not out.exists()
    assert "m.safetensors.json exists" in capsys.readouterr().err
    side.unlink()
    side.mkdir()  # a folder where the sidecar would go: refused before anything is written
    assert call(export_main, [str(trained["ckpt"]), "--format", "safetensors", "--out", str(out)]) == 2
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_a_re_export_keeps_the_mode_of_the_file_it_replaces(trained, tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"
    assert call(export_main, [str(trained["ckpt"]), "--format", "onnx", "--out", str(out)]) == 0
    out.chmod(0o600)
    assert call(export_main, [str(trained["ckpt"]), "--format", "onnx", "--out", str(out), "--overwrite"]) == 0
    assert out.stat().st_mode & 0o777 == 0o600


def test_a_bundled_model_and_a_safetensors_export_export_to_graphs_with_their_views_and_temperature(trained, tmp_path: Path,
                                                                                                     capsys) -> None:  # fmt: skip
    out = tmp_path / "b.onnx"
    assert call(export_main, ["pretrained:94", "--format", "onnx", "--out", str(out)]) == 2
    assert "--data-dir" in one_error_line(capsys) and not out.exists()  # no run, no recorded data: the check asks
    assert call(export_main, ["pretrained:nope", "--format", "onnx", "--out", str(out), "--random-check"]) == 2
    assert "choose from pretrained:94" in one_error_line(capsys) and not out.exists()
    assert call(export_main, ["pretrained:94", "--format", "onnx", "--out", str(out), "--random-check"]) == 0
    meta, bundled = json.loads((tmp_path / "b.onnx.json").read_text()), load_classifier("pretrained:94")
    assert meta["tta_in_graph"] and meta["temperature_in_graph"] and meta["temperature"] == bundled.temperature
    assert meta["test_accuracy"] is not None  # the bundled record's, for the same views
    x = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(load_classifier(out).probabilities(x), bundled.probabilities(x), atol=1e-5)
    # a safetensors export is a source too; a graph is not: its views and temperature are baked in
    assert call(export_main, [str(trained["safetensors"]), "--format", "pt2", "--out", str(tmp_path / "s.pt2"),
                              "--data-dir", str(trained["tree"])]) == 0  # fmt: skip
    assert torch.allclose(load_classifier(tmp_path / "s.pt2").probabilities(x), load_classifier(trained["safetensors"]).probabilities(x),
                          atol=1e-5)  # fmt: skip
    assert call(export_main, [str(trained["onnx"]), "--format", "pt2", "--out", str(tmp_path / "g.pt2")]) == 2
    assert "a graph export (onnx)" in one_error_line(capsys) and not (tmp_path / "g.pt2").exists()
    lone = tmp_path / "lone.safetensors"  # weights without their sidecar, then with another normalisation
    shutil.copy(trained["safetensors"], lone)
    assert call(export_main, [str(lone), "--format", "onnx", "--out", str(tmp_path / "l.onnx"), "--random-check"]) == 2
    assert "lone.safetensors.json is missing" in one_error_line(capsys)
    meta = json.loads(Path(f"{trained['safetensors']}.json").read_text())
    (tmp_path / "lone.safetensors.json").write_text(json.dumps({**meta, "mean": [0.5, 0.5, 0.5]}))
    assert call(export_main, [str(lone), "--format", "onnx", "--out", str(tmp_path / "l.onnx"), "--random-check"]) == 2
    assert "another mean/std" in one_error_line(capsys) and not (tmp_path / "l.onnx").exists()


def test_an_export_check_never_falls_back_to_random_images_silently(run, tmp_path: Path, capsys) -> None:
    ckpt = tmp_path / "lone.ckpt"  # a checkpoint outside its run: no data dir is known
    shutil.copy(run["ckpt"], ckpt)
    assert call(export_main, [str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "--random-check" in one_error_line(capsys) and not (tmp_path / "m.onnx").exists()
    assert call(export_main, [str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--random-check"]) == 0
    assert "random images" in capsys.readouterr().out


def test_export_through_a_symlinked_folder_never_replaces_its_checkpoint(run, tmp_path: Path, capsys) -> None:
    folder = tmp_path / "DIR"
    folder.mkdir()
    ckpt = folder / "m.pt"
    shutil.copy(run["ckpt"], ckpt)
    before = ckpt.read_bytes()
    link = tmp_path / "LINK"
    link.symlink_to(folder, target_is_directory=True)
    for out in (link / "m.pt", folder / "x" / ".." / "m.pt"):
        assert call(export_main, [str(ckpt), "--format", "torchscript", "--out", str(out), "--overwrite", "--random-check"]) == 2
        assert "would overwrite" in one_error_line(capsys)
    assert ckpt.read_bytes() == before


def test_a_file_that_appears_while_an_export_is_written_is_kept(tmp_path: Path) -> None:
    out = tmp_path / "m.onnx"

    def write(tmp: Path) -> None:
        tmp.write_bytes(b"mine")
        out.write_bytes(b"theirs")  # another process, given the same --out, finished first

    with pytest.raises(ConfigError, match="appeared while"):
        fileio.atomic_write(out, write, replace=False)
    assert out.read_bytes() == b"theirs"
    assert not leftovers(tmp_path)


def test_two_exports_to_one_name_at_once_never_replace_each_other(run, tmp_path: Path) -> None:
    """Two real cifar-export processes, same --out, no --overwrite: one writes, the other is refused."""
    out = tmp_path / "m.safetensors"
    cmd = [sys.executable, "-m", "cifar_lightning", "export", str(run["ckpt"]), "--format", "safetensors", "--out", str(out),
           "--random-check"]  # fmt: skip
    procs = [subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    codes = sorted(p.wait(timeout=300) for p in procs)
    assert codes[0] == 0 and codes[1] == 2, [p.stderr.read() for p in procs]
    assert not leftovers(tmp_path)


# ----------------------------------------------------------------------------- faults: a full disk, SIGTERM


def test_a_full_disk_error_says_so_in_one_line(capsys) -> None:
    def body() -> int:
        raise OSError(errno.ENOSPC, "No space left on device", "/somewhere/m.onnx")

    assert exit_status("cifar-export", body) == 1
    line = one_error_line(capsys)
    assert "no space left" in line and "/somewhere/m.onnx" in line


@pytest.mark.faults
@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "safetensors"])
def test_an_export_to_a_full_disk_is_exit_1_one_line_and_leaves_nothing(run, small_disk: Path, fmt: str) -> None:
    fill(small_disk, leave=16 << 10)
    out = small_disk / "m"
    proc = subprocess.run([sys.executable, "-m", "cifar_lightning", "export", str(run["ckpt"]), "--format", fmt, "--out", str(out),
                           "--random-check"], cwd=REPO, capture_output=True, text=True, timeout=300)  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "no space left" in lines[0], proc.stderr
    assert sorted(p.name for p in small_disk.iterdir()) == ["filler"]


@pytest.mark.faults
def test_sigterm_during_an_export_leaves_no_temp_file(run, tmp_path: Path) -> None:
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    argv = ["export", str(run["ckpt"]), "--format", "onnx", "--out", str(out_dir / "m.onnx"), "--random-check"]
    proc = sigterm_at("cifar_lightning.export.verify", argv, tmp_path)  # the temp file is written and being checked
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 128 + signal.SIGTERM and "SIGTERM" in lines[-1] and "Traceback" not in proc.stderr, proc.stderr
    assert list(out_dir.iterdir()) == []
