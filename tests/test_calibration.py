"""Calibration: the temperature is fitted on held-out images, kept in the checkpoint and every export, and used by every path."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import call, fill, leftovers, one_error_line, tiny_train_argv, train_tiny_run, write_imagefolder

from cifar_lightning import load_classifier, training
from cifar_lightning.calibration import fit_temperature
from cifar_lightning.cli import evaluate_main, export_main, predict_main, train_main
from cifar_lightning.errors import exit_status
from cifar_lightning.images import normalize
from cifar_lightning.inference import as_uint8_batch


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny 2-epoch run of the fast network, calibrated on a held-out split, in every format."""
    root = tmp_path_factory.mktemp("calibrated")
    tree, run = train_tiny_run(
        root, "--model", "fast", "--widths", "8,16,16", "--val-size", "0", "--calibrate", "heldout", "--calib-size", "10",
        "--tta", "2", "--batch-size", "16", "--log-images-every", "0", epochs=2,
    )  # fmt: skip
    paths = {"tree": tree, "run": run, "ckpt": run / "checkpoints" / "last.ckpt", "root": root}
    for fmt in ("safetensors", "onnx", "torchscript"):
        paths[fmt] = root / f"model.{fmt}"
        assert call(export_main, [str(paths["ckpt"]), "--format", fmt, "--out", str(paths[fmt])]) == 0
    paths["onnx_raw"] = root / "raw.onnx"
    assert call(export_main, [str(paths["ckpt"]), "--format", "onnx", "--out", str(paths["onnx_raw"]), "--no-calibrate"]) == 0
    return paths


def test_a_fitted_temperature_is_recovered_from_labels_drawn_at_that_temperature() -> None:
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(20_000, 10, generator=g) * 3
    for true_t in (0.5, 2.0):
        labels = torch.multinomial((logits / true_t).softmax(-1), 1, generator=g).flatten()
        assert fit_temperature(logits, labels) == pytest.approx(true_t, rel=0.05)
    # a model no better than chance: a large, finite temperature (near-uniform probabilities)
    noise = torch.randint(0, 10, (2000,), generator=g)
    assert 3 < fit_temperature(torch.randn(2000, 10, generator=g) * 5, noise) <= 100


def test_the_run_records_its_temperature_and_the_test_ece_before_and_after(calibrated) -> None:
    results = json.loads((calibrated["run"] / "results.json").read_text())
    cal = results["calibration"]
    assert cal["fitted_on"] == "heldout" and cal["images"] == 10 and cal["temperature"] > 0
    assert cal["nll_after"] <= cal["nll_before"] + 1e-9  # T minimises the NLL of the images it was fitted on
    assert 0 <= results["test_ece"] <= 1 and 0 <= results["test_ece_uncalibrated"] <= 1
    ckpt = torch.load(calibrated["ckpt"], map_location="cpu", weights_only=True)
    assert ckpt["calibration"]["temperature"] == cal["temperature"]


def test_temperature_round_trips_through_checkpoint_safetensors_onnx_and_torchscript(calibrated) -> None:
    files = sorted((calibrated["tree"] / "test").rglob("*.png"))
    t = json.loads((calibrated["run"] / "results.json").read_text())["calibration"]["temperature"]
    ckpt = load_classifier(calibrated["ckpt"])
    assert ckpt.temperature == pytest.approx(t)
    _, ref = ckpt.predict(files)
    _, raw = load_classifier(calibrated["ckpt"], calibrate=False).predict(files)
    assert not torch.allclose(ref, raw, atol=1e-3)  # the temperature changes the probabilities...
    assert torch.equal(ref.argmax(1), raw.argmax(1))  # ...and never a prediction
    for key in ("safetensors", "onnx", "onnx_raw"):
        _, probs = load_classifier(calibrated[key]).predict(files)
        assert torch.allclose(probs, ref, atol=1e-5), key
        _, raw_probs = load_classifier(calibrated[key], calibrate=False).predict(files)
        assert torch.allclose(raw_probs, raw, atol=1e-5), key
    scripted = torch.jit.load(str(calibrated["torchscript"]))
    assert torch.allclose(scripted(normalize(as_uint8_batch(files))).softmax(1), ref, atol=1e-5)
    meta = {k: json.loads((calibrated[k].parent / f"{calibrated[k].name}.json").read_text()) for k in ("safetensors", "onnx", "onnx_raw")}
    assert all(m["temperature"] == pytest.approx(t) for m in meta.values())
    assert [m["temperature_in_graph"] for m in meta.values()] == [False, True, False]


def test_predict_prints_calibrated_probabilities_unless_told_not_to(calibrated, capsys) -> None:
    image = str(sorted((calibrated["tree"] / "test").rglob("*.png"))[0])
    outs = []
    for flags in ([], ["--no-calibrate"]):
        assert call(predict_main, [str(calibrated["ckpt"]), image, "--json", *flags]) == 0
        outs.append(json.loads(capsys.readouterr().out)[0]["top_k"][0]["probability"])
    _, probs = load_classifier(calibrated["ckpt"]).predict([image])
    _, raw = load_classifier(calibrated["ckpt"], calibrate=False).predict([image])
    assert outs == [pytest.approx(float(probs.max())), pytest.approx(float(raw.max()))]


def test_evaluate_reports_ece_before_and_after_with_both_reliability_diagrams(calibrated, tmp_path: Path) -> None:
    out = tmp_path / "report"
    assert call(evaluate_main, [str(calibrated["onnx"]), "--data-dir", str(calibrated["tree"]), "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    results = json.loads((calibrated["run"] / "results.json").read_text())
    assert metrics["calibrated"] and metrics["temperature"] == pytest.approx(results["calibration"]["temperature"])
    assert metrics["ece"] == pytest.approx(results["test_ece"], abs=1e-5)
    assert metrics["ece_uncalibrated"] == pytest.approx(results["test_ece_uncalibrated"], abs=1e-5)
    report = (out / "report.md").read_text()
    assert "before calibration (T = 1)" in report and (out / "calibration.png").stat().st_size > 0
    raw_out = tmp_path / "raw"
    assert call(evaluate_main, [str(calibrated["ckpt"]), "--out", str(raw_out), "--no-calibrate"]) == 0
    raw = json.loads((raw_out / "metrics.json").read_text())
    assert not raw["calibrated"] and raw["ece"] == pytest.approx(results["test_ece_uncalibrated"], abs=1e-5)


@pytest.mark.train
def test_calibrate_none_fits_nothing_and_keeps_the_training_images(tmp_path: Path) -> None:
    _, run = train_tiny_run(tmp_path, "--calibrate", "none", "--log-images-every", "0")
    results = json.loads((run / "results.json").read_text())
    assert results["calibration"] is None and results["test_ece"] == pytest.approx(results["test_ece_uncalibrated"])
    assert load_classifier(results["best_checkpoint"]).temperature == 1.0


@pytest.mark.train
def test_calibrate_fixed_takes_the_recipes_temperature_and_holds_no_image_out(tmp_path: Path, capsys) -> None:
    """A preset can ship T (fitted once in its study) and give the 2,000 held-out images back to training."""
    _, run = train_tiny_run(tmp_path, "--calibrate", "fixed", "--temperature", "0.5", "--val-size", "0", "--log-images-every", "0")
    out = capsys.readouterr().out
    assert "(120 images seen" in out  # all 120: none held out (heldout would keep 12)
    results = json.loads((run / "results.json").read_text())
    assert results["calibration"]["temperature"] == 0.5 and results["calibration"]["images"] == 0
    assert load_classifier(results["best_checkpoint"]).temperature == 0.5
    assert "temperature 0.500 the recipe's (--temperature); test ECE" in out


@pytest.mark.train
def test_calib_jpeg_fits_the_temperature_on_the_held_out_images_and_their_jpeg_copies(tmp_path: Path) -> None:
    """Issue 34: a T fitted on clean images alone does not hold on photos; --calib-jpeg adds a
    JPEG-75 copy of each held-out image to the fit (chosen in research/photo_calibration.py)."""
    _, run = train_tiny_run(tmp_path, "--calibrate", "heldout", "--val-size", "0", "--calib-size", "10", "--calib-jpeg",
                            "--log-images-every", "0")  # fmt: skip
    results = json.loads((run / "results.json").read_text())
    entry = results["calibration"]
    assert entry["fitted_on"] == "heldout + jpeg75" and entry["images"] == 2 * 10  # the 10 held out, and a copy of each
    assert load_classifier(results["best_checkpoint"]).temperature == pytest.approx(entry["temperature"])


@pytest.mark.parametrize("calibrate", ["fixed", "none"])
def test_calib_jpeg_without_a_fit_is_refused_before_a_run(tmp_path: Path, capsys, calibrate: str) -> None:
    logs = tmp_path / "logs"
    extra = ["--calibrate", calibrate, "--calib-jpeg", *(["--temperature", "0.5"] if calibrate == "fixed" else [])]
    assert call(train_main, tiny_train_argv(write_imagefolder(tmp_path / "tree"), logs, *extra)) == 2
    assert "--calib-jpeg" in one_error_line(capsys)
    assert not logs.exists() or not list(logs.glob("version_*"))


@pytest.mark.parametrize("flags", [["--calibrate", "none"], ["--calibrate", "fixed", "--temperature", "0.5"]])
def test_a_preset_that_fits_on_jpeg_copies_still_takes_a_calibration_that_fits_none(flags: list[str]) -> None:
    """--preset 90 and photo set calib_jpeg; switching their calibration off keeps working: the
    preset's JPEG copies are dropped with the fit they belonged to, not refused."""
    from cifar_lightning.cli import resolve_train_config

    for preset in ("90", "photo"):
        assert resolve_train_config(["--preset", preset]).calib_jpeg
        cfg = resolve_train_config(["--preset", preset, *flags])
        assert not cfg.calib_jpeg
        training.check_before_start(cfg)  # no ConfigError
    assert resolve_train_config(["--preset", "90", "--calibrate", "val", "--val-size", "2000"]).calib_jpeg  # a fit: kept


def test_a_given_temperature_that_misfits_the_run_says_so_and_how_to_fit_one() -> None:
    """A preset's shipped T fits its own flags: a run changed past it (its test ECE high) is told."""
    given = {"temperature": 0.463, "fitted_on": "the recipe's (--temperature)", "images": 0}
    fits = training.calibration_line({"calibration": given, "test_ece": 0.012, "test_ece_uncalibrated": 0.2})
    misfits = training.calibration_line({"calibration": given, "test_ece": 0.031, "test_ece_uncalibrated": 0.2})
    assert "does not fit" not in fits and "--calibrate heldout" in misfits and "0.0310" in misfits
    fitted = {"temperature": 0.5, "fitted_on": "heldout", "images": 2000}  # fitted here: its ECE is what it is
    assert "does not fit" not in training.calibration_line({"calibration": fitted, "test_ece": 0.031, "test_ece_uncalibrated": 0.2})


@pytest.mark.parametrize("extra, says", [(["--calibrate", "fixed"], "--temperature"),
                                         (["--calibrate", "fixed", "--temperature", "0"], "--temperature"),
                                         (["--calibrate", "fixed", "--temperature", "1000"], "--temperature")])  # fmt: skip
def test_a_fixed_temperature_that_is_missing_or_out_of_range_is_refused_before_a_run(tmp_path: Path, capsys, extra, says) -> None:
    logs = tmp_path / "logs"
    assert call(train_main, tiny_train_argv(write_imagefolder(tmp_path / "tree"), logs, *extra)) == 2
    assert says in one_error_line(capsys)
    assert not logs.exists() or not list(logs.glob("version_*"))


@pytest.mark.parametrize("bad", [-1.0, 0.0, float("nan"), "hot"])
def test_a_damaged_temperature_is_refused_with_one_line(calibrated, tmp_path: Path, capsys, bad: object) -> None:
    ckpt = torch.load(calibrated["ckpt"], map_location="cpu", weights_only=True)
    ckpt["calibration"]["temperature"] = bad
    path = tmp_path / "bad.ckpt"
    torch.save(ckpt, path)
    image = str(sorted((calibrated["tree"] / "test").rglob("*.png"))[0])
    assert call(predict_main, [str(path), image]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "temperature" in err[0]
    side = json.loads((calibrated["root"] / "model.safetensors.json").read_text())
    side["temperature"] = bad if not isinstance(bad, float) or bad == bad else None
    if side["temperature"] is not None:
        copy = tmp_path / "m.safetensors"
        copy.write_bytes(calibrated["safetensors"].read_bytes())
        (tmp_path / "m.safetensors.json").write_text(json.dumps(side))
        assert call(predict_main, [str(copy), image]) == 2
        assert "temperature" in capsys.readouterr().err


@pytest.mark.train
def test_a_resumed_calibrated_run_refits_its_temperature_for_its_new_weights(tmp_path: Path) -> None:
    tree, run = train_tiny_run(tmp_path, "--log-images-every", "0")
    last = run / "checkpoints" / "last.ckpt"
    first = torch.load(last, map_location="cpu", weights_only=True)["calibration"]["temperature"]
    argv = tiny_train_argv(tree, tmp_path / "logs", "--resume", str(last), "--epochs", "3", "--log-images-every", "0")
    assert call(train_main, argv) == 0
    after = torch.load(last, map_location="cpu", weights_only=True)
    assert after["epoch"] == 2 and after["calibration"]["temperature"] != first
    results = json.loads((run / "results.json").read_text())
    assert results["calibration"]["temperature"] == load_classifier(results["best_checkpoint"]).temperature


@pytest.mark.train
def test_the_seed_recipe_without_a_validation_split_calibrates_on_held_out_images(tmp_path: Path, capsys) -> None:
    _, run = train_tiny_run(tmp_path, "--val-size", "0", "--log-images-every", "0")
    cal = json.loads((run / "results.json").read_text())["calibration"]
    assert cal["fitted_on"] == "heldout" and cal["images"] == 12  # a tenth of the 120 training images
    argv = tiny_train_argv(tmp_path / "tree", tmp_path / "logs2", "--val-size", "0", "--calibrate", "val")
    assert call(train_main, argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert "--calibrate val" in err[-1] and not (tmp_path / "logs2").exists()


# ----------------------------------------------------------------------------- what calibration refuses, and a full disk


def test_a_calibration_split_left_empty_is_refused_before_a_run_folder_exists(run, tmp_path: Path, capsys) -> None:
    logs = tmp_path / "logs"
    # 120 training images: 111 for validation leaves 9, and a tenth of 9 is none to calibrate on
    argv = tiny_train_argv(run["tree"], logs, "--calibrate", "heldout", "--val-size", "111")
    assert call(train_main, argv) == 2
    assert "--calibrate heldout" in one_error_line(capsys)
    assert not list(logs.glob("version_*"))


@pytest.mark.faults
@pytest.mark.disk_kib(65536)  # room for the 26 MB seed checkpoint, then filled
def test_writing_the_temperature_to_a_full_disk_says_so_and_keeps_the_checkpoint(run, small_disk: Path, capsys) -> None:
    from cifar_lightning.training import calibrate_checkpoint

    ckpt = small_disk / "last.ckpt"
    try:
        shutil.copy(run["ckpt"], ckpt)
    except OSError:
        pytest.skip("the seed checkpoint does not fit the small disk")
    before = ckpt.read_bytes()
    fill(small_disk)
    images = torch.randint(0, 256, (16, 3, 32, 32), dtype=torch.uint8)
    labels = torch.arange(16) % 10

    def body() -> int:
        calibrate_checkpoint(ckpt, images, labels, "heldout", "cpu")
        return 0

    assert exit_status("cifar-train", body, sigterm=False) == 1
    assert "no space left" in one_error_line(capsys)
    assert ckpt.read_bytes() == before and not leftovers(small_disk)
