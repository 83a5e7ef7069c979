"""Regressions of an adversarial pass: each test names the defect it keeps fixed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, call, copy_of_seed_run, png_bomb, tiny_train_argv

from cifar_lightning import load_classifier
from cifar_lightning.cli import evaluate_main, export_main, predict_main, train_main
from cifar_lightning.errors import ModelError


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory, seed_run_once: tuple[Path, Path]) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hard")
    tree, run_dir = copy_of_seed_run(seed_run_once, root)
    return {"root": root, "tree": tree, "run": run_dir, "ckpt": run_dir / "checkpoints" / "last.ckpt",
            "good": next((tree / "test" / "cat").iterdir()), "good2": next((tree / "test" / "dog").iterdir())}  # fmt: skip


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(err) == 1 and "Traceback" not in err[0], err
    return err[0]


# 1. decompression bombs


def test_a_decompression_bomb_is_one_bad_input_and_the_others_are_still_predicted(run, tmp_path: Path, capsys) -> None:
    bomb = png_bomb(tmp_path / "bomb.png")
    code = call(predict_main, [str(run["ckpt"]), str(run["good"]), str(bomb), str(run["good2"]), "--json"])
    out = json.loads(capsys.readouterr().out)
    assert code == 1
    assert [("top_k" in r, "error" in r) for r in out] == [(True, False), (False, True), (True, False)]
    assert "bomb.png" in out[1]["error"]


def test_a_decompression_bomb_in_a_training_folder_is_named(run, tmp_path: Path, capsys) -> None:
    tree = Path(shutil.copytree(run["tree"], tmp_path / "tree"))
    png_bomb(tree / "train" / "cat" / "zz_bomb.png")
    assert call(train_main, tiny_train_argv(tree, tmp_path / "logs")) == 2
    assert "zz_bomb.png" in one_error_line(capsys)
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").glob("version_*"))


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


# 2. non-finite weights


def test_non_finite_hyper_parameters_are_refused_up_front(run, tmp_path: Path, capsys) -> None:
    for flag in ("--lr", "--weight-decay", "--momentum"):
        assert call(train_main, tiny_train_argv(run["tree"], tmp_path / "logs", flag, "inf")) == 2
        assert flag in one_error_line(capsys)
    assert not (tmp_path / "logs").exists()


def test_a_diverging_run_never_writes_a_checkpoint_with_non_finite_weights(run, tmp_path: Path, capsys) -> None:
    logs = tmp_path / "logs"
    code = call(train_main, tiny_train_argv(run["tree"], logs, "--lr", "1e30", "--optimizer", "sgd", "--epochs", "2"))
    assert code == 1 and "non-finite" in capsys.readouterr().err.lower().replace("nan", "non-finite")
    for ckpt in logs.rglob("*.ckpt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()), ckpt


def test_loading_a_checkpoint_or_export_with_non_finite_weights_is_refused(run, tmp_path: Path, capsys) -> None:
    ckpt = torch.load(run["ckpt"], map_location="cpu", weights_only=True)
    name = next(k for k, v in ckpt["state_dict"].items() if v.is_floating_point())
    ckpt["state_dict"][name] = torch.full_like(ckpt["state_dict"][name], float("nan"))
    poisoned = tmp_path / "poisoned.ckpt"
    torch.save(ckpt, poisoned)
    with pytest.raises(ModelError, match="NaN or infinite"):
        load_classifier(poisoned)
    assert call(evaluate_main, [str(poisoned), "--data-dir", str(run["tree"]), "--out", str(tmp_path / "r")]) == 2
    assert name in one_error_line(capsys)
    assert call(export_main, [str(poisoned), "--format", "onnx", "--out", str(tmp_path / "p.onnx")]) == 2
    assert not (tmp_path / "p.onnx").exists()


# 3. two evaluations at once


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


# 4. export metadata is input


def test_predict_json_never_contains_nan(run, tmp_path: Path, capsys) -> None:
    assert call(export_main, [str(run["ckpt"]), "--format", "safetensors", "--out", str(tmp_path / "m.safetensors")]) == 0
    capsys.readouterr()
    meta = json.loads((tmp_path / "m.safetensors.json").read_text())
    for bad in ({"std": [0, 0, 0]}, {"mean": [1e308 * 10, 0, 0]}, {"class_names": "cat"}, {"model": ["seed"]}, {"mean": [0.5, 0.5]}):
        (tmp_path / "m.safetensors.json").write_text(json.dumps({**meta, **bad}))
        assert call(predict_main, [str(tmp_path / "m.safetensors"), str(run["good"]), "--json"]) == 2, bad
        assert "unusable export metadata" in one_error_line(capsys), bad
    nested = "[" * 100_000 + "0" + "]" * 100_000  # a deeply nested sidecar
    (tmp_path / "m.safetensors.json").write_text(json.dumps(meta)[:-1] + f', "class_names": {nested}}}')
    assert call(predict_main, [str(tmp_path / "m.safetensors"), str(run["good"])]) == 2
    one_error_line(capsys)


# 5. flags that pass the parser but failed late


@pytest.mark.parametrize(
    "extra, says",
    [
        (["--label-smoothing", "1.5"], "--label-smoothing"),
        (["--precision", "16-true"], "--precision 16-true"),
        (["--strategy", "nosuch"], "--strategy"),
        (["--seed", "100000000000000000000"], "--seed"),
        (["--max-time", "inf"], "--max-time"),
        (["--num-nodes", "2"], "--num-nodes"),
    ],
)
def test_options_are_checked_before_anything_is_created(run, tmp_path: Path, capsys, extra: list[str], says: str) -> None:
    for key in ("WORLD_SIZE", "SLURM_NTASKS", "MASTER_ADDR", "NODE_RANK"):
        assert key not in os.environ  # the multi-node case relies on no launcher being present
    assert call(train_main, tiny_train_argv(run["tree"], tmp_path / "logs", *extra)) == 2
    assert says in one_error_line(capsys)
    assert not (tmp_path / "logs").exists()


def test_a_yaml_value_of_the_wrong_type_names_its_option(run, tmp_path: Path, capsys) -> None:
    (tmp_path / "r.yaml").write_text("lr: abc\n")
    assert call(train_main, [*tiny_train_argv(run["tree"], tmp_path / "logs"), "--config", str(tmp_path / "r.yaml")]) == 2
    assert "--lr" in one_error_line(capsys)


# 6. relative paths


def test_a_run_started_elsewhere_evaluates_and_exports_from_any_directory(run, tmp_path: Path, monkeypatch, capsys) -> None:
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    shutil.copytree(run["tree"], tmp_path / "a" / "tree")
    monkeypatch.chdir(tmp_path / "a")
    assert call(train_main, tiny_train_argv("tree", "logs", "--precision", "64-true")) == 0  # relative paths, 64-bit weights
    monkeypatch.chdir(tmp_path / "b")
    ckpt = tmp_path / "a" / "logs" / "version_0" / "checkpoints" / "last.ckpt"
    assert call(evaluate_main, [str(ckpt), "--no-download", "--accelerator", "cpu"]) == 0
    assert call(export_main, [str(ckpt), "--format", "onnx", "--out", "m.onnx"]) == 0
    assert f"test images of {tmp_path / 'a' / 'tree'}" in capsys.readouterr().out
    assert sorted(p.name for p in (tmp_path / "b").iterdir()) == ["m.onnx", "m.onnx.json"]


def test_an_export_check_never_falls_back_to_random_images_silently(run, tmp_path: Path, capsys) -> None:
    ckpt = tmp_path / "lone.ckpt"  # a checkpoint outside its run: no data dir is known
    shutil.copy(run["ckpt"], ckpt)
    assert call(export_main, [str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx")]) == 2
    assert "--random-check" in one_error_line(capsys) and not (tmp_path / "m.onnx").exists()
    assert call(export_main, [str(ckpt), "--format", "onnx", "--out", str(tmp_path / "m.onnx"), "--random-check"]) == 0
    assert "random images" in capsys.readouterr().out


# 7. --out never destroys an input


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
    assert "would overwrite the checkpoint" in one_error_line(capsys)
    assert run["ckpt"].read_bytes() == before and copy.read_bytes() == before
    assert not (run["tree"] / "train" / "cat" / "r").exists()


# 8. an export named without its suffix


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


# 9. an ONNX graph with a fixed batch of one


def test_an_onnx_model_with_a_fixed_batch_of_one_classifies_many_images(run, tmp_path: Path) -> None:
    net = load_classifier(run["ckpt"]).network.eval()
    torch.onnx.export(net, (torch.zeros(1, 3, 32, 32),), str(tmp_path / "b1.onnx"), dynamo=False)
    files = sorted((run["tree"] / "test").rglob("*.png"))[:5]
    classes, probs = load_classifier(tmp_path / "b1.onnx").predict(files)
    assert classes == load_classifier(run["ckpt"]).predict(files)[0] and probs.shape == (5, 10)


# 10. minor


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
