"""Ready-made models: ``pretrained:NAME`` in every command, and the bundled files checked
against their records (SHA-256, and accuracy on 2,000 real test images)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import CLASSES, REAL_DATA, REPO, call, copy_of_seed_run, tiny_train_argv
from safetensors.torch import load_file

from cifar_lightning import bundled, recipes, runs, training
from cifar_lightning.cli import evaluate_main, export_main, predict_main, train_main
from cifar_lightning.errors import ModelError
from cifar_lightning.fileio import sha256_of
from cifar_lightning.inference import load_classifier
from cifar_lightning.module import ImageClassifier
from cifar_lightning.recipes import read_yaml

SHIPPED = bundled.index()


@pytest.fixture
def fake_bundle(tmp_path_factory: pytest.TempPathFactory, seed_run_once, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    """The tiny seed run exported in float16 as the only bundled model, 'tiny'."""
    root = tmp_path_factory.mktemp("bundle")
    tree, run = copy_of_seed_run(seed_run_once, root / "run")
    weights = root / "weights"
    weights.mkdir()
    out = weights / "tiny.safetensors"
    assert call(export_main, [str(run / "checkpoints" / "last.ckpt"), "--format", "safetensors", "--half", "--out", str(out)]) == 0
    record = {"file": out.name, "sha256": sha256_of(out), "size_bytes": out.stat().st_size,
              "sidecar_sha256": sha256_of(runs.sidecar_path(out)), "test_acc": 0.5}  # fmt: skip
    (weights / "index.json").write_text(json.dumps({"tiny": record}))
    monkeypatch.setattr(bundled, "folder", lambda: weights)
    monkeypatch.setattr(bundled, "DEFAULT_ORDER", ("photo", "tiny"))
    return {"tree": tree, "run": run, "file": out, "weights": weights}


@pytest.mark.train
def test_a_bundled_model_loads_by_name_and_predicts_as_its_file_does(fake_bundle) -> None:
    by_name, by_file = load_classifier("pretrained:tiny"), load_classifier(fake_bundle["file"])
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8)
    assert torch.equal(by_name.probabilities(images), by_file.probabilities(images))


@pytest.mark.train
@pytest.mark.parametrize("change", ["zeroed-weights", "sidecar-temperature", "wrong-record"])
def test_a_changed_bundled_file_is_refused_at_load_saying_reinstall(fake_bundle, change: str, capsys) -> None:
    out, side = fake_bundle["file"], runs.sidecar_path(fake_bundle["file"])
    if change == "zeroed-weights":  # the same size, other bytes: what a damaged copy looks like
        data = bytearray(out.read_bytes())
        data[-4096:] = bytes(4096)
        out.write_bytes(bytes(data))
    elif change == "sidecar-temperature":
        side.write_text(json.dumps({**json.loads(side.read_text()), "temperature": 50.0}))
    else:
        index = fake_bundle["weights"] / "index.json"
        index.write_text(json.dumps({"tiny": {**json.loads(index.read_text())["tiny"], "sha256": "0" * 64}}))
    with pytest.raises(ModelError, match="reinstall cifar-lightning"):
        load_classifier("pretrained:tiny")
    images = sorted((fake_bundle["tree"] / "test" / "cat").iterdir())[:1]
    assert call(predict_main, ["pretrained:tiny", str(images[0])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "reinstall" in err[0]


@pytest.mark.train
def test_predict_without_a_model_uses_the_bundled_default_and_says_so(fake_bundle, capsys) -> None:
    images = sorted((fake_bundle["tree"] / "test" / "cat").iterdir())[:2]
    assert call(predict_main, [str(p) for p in images]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("model: pretrained:tiny (bundled; 50.00%")
    assert all(str(p) in out for p in images)
    assert call(predict_main, ["pretrained:tiny", *map(str, images), "--json"]) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) == 2 and "model: pretrained:tiny" in captured.err


@pytest.mark.train
def test_evaluate_a_bundled_model_reports_in_the_current_folder_never_the_package(fake_bundle, tmp_path: Path, monkeypatch,
                                                                                   capsys) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    assert call(evaluate_main, ["pretrained:tiny", "--data-dir", str(fake_bundle["tree"])]) == 0
    assert (tmp_path / "pretrained_tiny_report" / "report.md").is_file()
    assert sorted(p.name for p in fake_bundle["weights"].iterdir()) == ["index.json", "tiny.safetensors", "tiny.safetensors.json"]


@pytest.mark.train
def test_a_run_can_start_from_a_bundled_model(fake_bundle, tmp_path: Path) -> None:
    """--init-from pretrained:NAME (what --preset photo does): the float16 weights, widened to
    float32, are where training starts; the name is recorded as given, not made a path."""
    cfg = runs.resolve_recipe({"preset": "seed", "init_from": "pretrained:tiny", "data_dir": str(fake_bundle["tree"])})
    assert cfg.init_from == "pretrained:tiny"
    module = ImageClassifier.from_config(cfg, list(CLASSES))
    training.load_init_weights(module, cfg)
    shipped = load_file(str(fake_bundle["file"]))
    own = module.net.state_dict()
    assert all(own[k].dtype == torch.float32 and torch.equal(own[k], v.float()) for k, v in shipped.items() if v.is_floating_point())
    logs = tmp_path / "logs"
    assert call(train_main, tiny_train_argv(fake_bundle["tree"], logs, "--init-from", "pretrained:tiny")) == 0
    assert read_yaml(logs / "version_0" / "config.yaml")["init_from"] == "pretrained:tiny"


@pytest.mark.skipif("photo" not in SHIPPED, reason="built without the photo model")
def test_the_photo_preset_trains_the_network_its_bundled_model_is() -> None:
    """pretrained:photo was trained by --preset photo: the preset's network takes its weights as
    they are, and the preset holds its temperature images out and fits T on their JPEG copies too."""
    cfg = runs.resolve_recipe({"preset": "photo"})
    assert (cfg.init_from, cfg.augment, cfg.val_size, cfg.calibrate, cfg.calib_jpeg) == (None, "robust", 0, "heldout", True)
    module = ImageClassifier.from_config(cfg, list(CLASSES))
    training.load_init_weights(module, cfg.model_copy(update={"init_from": "pretrained:photo"}))  # strict: every key fits
    shipped = load_file(str(bundled.resolve("pretrained:photo")))
    own = module.net.state_dict()
    assert all(torch.equal(own[k], v.float()) for k, v in shipped.items() if v.is_floating_point())


@pytest.mark.skipif("photo" not in SHIPPED, reason="built without the photo model")
def test_photo_is_the_default_and_its_record_says_what_it_started_from() -> None:
    assert bundled.default_name() == "photo"
    record = SHIPPED["photo"]
    assert (record["preset"], record["starts_from"]) == ("photo", recipes.preset("photo").get("init_from"))
    assert record["command"].startswith("cifar-train --preset photo --seed ")


def test_a_bundled_model_is_its_preset_trained_only_if_its_command_sets_nothing_else(monkeypatch) -> None:
    """A model trained before its preset changed records the old recipe in flags (as 94's does):
    it is not what the preset trains now."""
    records = {"a": {"file": "a.safetensors", "command": "cifar-train --preset 95 --seed 8 --data-dir d"},
               "b": {"file": "b.safetensors", "command": "cifar-train --preset 94 --seed 0 --optimizer sgd --data-dir d"}}
    monkeypatch.setattr(bundled, "index", lambda: records)
    assert [bundled.trained(p) for p in ("95", "94", "90", None)] == ["pretrained:a", None, None, None]


@pytest.mark.parametrize("spec, says", [("pretrained:nope", "no such bundled model"),
                                        ("pretrained:tiny", "a 'seed' network cannot initialise")])  # fmt: skip
def test_a_bundled_start_that_cannot_be_is_one_line_before_any_run(fake_bundle, tmp_path: Path, capsys, spec: str, says: str) -> None:
    argv = tiny_train_argv(fake_bundle["tree"], tmp_path / "logs", "--init-from", spec)
    if spec == "pretrained:tiny":
        argv += ["--preset", "94"]  # the fast network, which a seed network's weights cannot start
    assert call(train_main, argv) == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "logs").exists() or not any((tmp_path / "logs").glob("version_*"))


def test_an_unknown_bundled_name_is_one_clear_error(fake_bundle) -> None:
    with pytest.raises(ModelError, match="no such bundled model; choose from pretrained:tiny"):
        load_classifier("pretrained:nope")


def test_without_any_bundled_model_a_command_asks_for_a_model_file(monkeypatch, tmp_path: Path, capsys) -> None:
    monkeypatch.setattr(bundled, "folder", lambda: tmp_path)
    with pytest.raises(ModelError, match="holds no bundled model"):
        bundled.default_name()


def test_the_check_subset_is_fixed() -> None:
    subset = bundled.check_subset(10_000)
    assert len(subset) == 2000 == len(set(subset)) and subset == bundled.check_subset(10_000) and max(subset) < 10_000


# ----------------------------------------------------------------------------- the shipped files


@pytest.mark.parametrize("name", sorted(SHIPPED) or [pytest.param("none", marks=pytest.mark.skip("no bundled model in this tree"))])
def test_a_shipped_file_matches_its_recorded_sha256_and_size(name: str) -> None:
    record = SHIPPED[name]
    path = bundled.folder() / record["file"]
    assert sha256_of(path) == record["sha256"] and os.path.getsize(path) == record["size_bytes"]
    assert sha256_of(path.with_name(path.name + ".json")) == record["sidecar_sha256"]
    assert record["weights_dtype"] == "float16" and record["size_bytes"] < 20 << 20  # a few MB


@pytest.mark.real_data
@pytest.mark.skipif(not REAL_DATA.is_dir(), reason="needs ../shared/data/cifar10")
@pytest.mark.parametrize("name", sorted(SHIPPED) or [pytest.param("none", marks=pytest.mark.skip("no bundled model in this tree"))])
def test_a_shipped_model_scores_its_recorded_accuracy_on_2000_real_test_images(name: str) -> None:
    from cifar_lightning.data import load_splits

    test = load_splits(str(REAL_DATA), download=False)["test"]
    subset = torch.tensor(bundled.check_subset(len(test.labels)))
    probs = load_classifier(f"pretrained:{name}").probabilities(test.images[subset], batch_size=500)
    acc = float((probs.argmax(1) == test.labels[subset]).float().mean())
    assert abs(acc - SHIPPED[name]["check_acc"]) <= 0.005, (acc, SHIPPED[name]["check_acc"])
    assert abs(acc - SHIPPED[name]["test_acc"]) <= 0.02  # the subset stands for the whole test set


@pytest.mark.subprocess
def test_the_built_package_carries_the_bundled_files(tmp_path: Path) -> None:
    """What `pip install .` installs: a wheel built from this tree holds every bundled file and the index."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path), str(REPO)],
                   check=True, capture_output=True, timeout=300)  # fmt: skip
    wheel = next(tmp_path.glob("cifar_lightning-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "cifar_lightning/weights/index.json" in names
    for record in SHIPPED.values():
        assert {f"cifar_lightning/weights/{record['file']}", f"cifar_lightning/weights/{record['file']}.json"} <= names
