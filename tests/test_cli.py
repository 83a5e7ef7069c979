"""cifar-train end to end on tiny synthetic data: files written, init-from, resume, errors."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import REPO, call, tiny_train_argv, write_imagefolder

from cifar_lightning import load_classifier
from cifar_lightning.cli import train_main
from cifar_lightning.inference import as_uint8_batch


def run_train(argv: list[str]) -> int:
    return call(train_main, argv)


def digest(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() for p in folder.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, subprocess.CompletedProcess]:
    """One real subprocess run of `python -m cifar_lightning train`, shared by the tests that read its files."""
    root = tmp_path_factory.mktemp("cli")
    tree = write_imagefolder(root / "tree")
    logs = root / "logs"
    env = {**os.environ, "CIFAR_LIGHTNING_CACHE": str(root / "cache")}
    proc = subprocess.run(
        [sys.executable, "-m", "cifar_lightning", "train", *tiny_train_argv(tree, logs)],
        capture_output=True, text=True, timeout=600, env=env, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    return tree, logs, proc


@pytest.mark.subprocess
def test_cli_run_writes_checkpoints_tensorboard_events_and_true_results(trained_run) -> None:
    tree, logs, proc = trained_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = logs / "version_0"
    ckpts = sorted(p.name for p in (run / "checkpoints").iterdir())
    assert "last.ckpt" in ckpts and any(n.startswith("best-") for n in ckpts)
    assert list(run.glob("events.out.tfevents.*"))
    results = json.loads((run / "results.json").read_text())
    # results.json tells the truth: the checkpoint it names, evaluated again here on the test
    # split, has the accuracy and mean loss it reports.
    assert Path(results["best_checkpoint"]).parent == run / "checkpoints"
    clf = load_classifier(results["best_checkpoint"])
    files = sorted((tree / "test").rglob("*.png"))
    assert len(files) == 40
    labels = torch.tensor([clf.class_names.index(f.parent.name) for f in files])
    probs = clf.probabilities(as_uint8_batch(files))  # with the run's fitted temperature, as its test scored them
    assert results["test_acc"] == pytest.approx((probs.argmax(1) == labels).double().mean().item(), abs=1e-6)
    assert results["test_loss"] == pytest.approx(F.nll_loss(probs.log(), labels).item(), rel=1e-4)
    assert f"tensorboard --logdir {logs}" in proc.stdout
    assert "test accuracy" in proc.stdout and results["best_checkpoint"] in proc.stdout
    assert yaml.safe_load((run / "config.yaml").read_text())["epochs"] == 1


@pytest.mark.subprocess
def test_checkpoint_loads_with_weights_only_and_plain_hyperparameters(trained_run) -> None:
    _, logs, _ = trained_run
    ckpt = torch.load(logs / "version_0/checkpoints/last.ckpt", map_location="cpu", weights_only=True)
    hp = ckpt["hyper_parameters"]
    assert hp["model"] == "seed" and hp["num_classes"] == 10 and hp["lr"] == 1e-3
    assert all(isinstance(v, (str, int, float, bool, list, type(None))) for v in hp.values())


@pytest.mark.subprocess
def test_init_from_starts_a_new_run_from_those_weights_and_leaves_the_old_run_alone(trained_run) -> None:
    tree, logs, _ = trained_run
    source = logs / "version_0/checkpoints/last.ckpt"
    before = digest(logs / "version_0")
    # lr so small that the refit's weights stay those of the source checkpoint
    code = run_train(tiny_train_argv(tree, logs, "--init-from", str(source), "--augment", "seed", "--lr", "1e-12"))
    assert code == 0
    assert digest(logs / "version_0") == before
    new = sorted(p.name for p in logs.iterdir() if p.name.startswith("version_"))[-1]
    assert new != "version_0"
    refit = torch.load(logs / new / "checkpoints/last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    start = torch.load(source, map_location="cpu", weights_only=True)["state_dict"]
    assert all(torch.allclose(refit[k], start[k], atol=1e-6) for k in start if k.startswith("net."))
    assert yaml.safe_load((logs / new / "config.yaml").read_text())["augment"] == "seed"


@pytest.mark.train
def test_resume_last_continues_the_same_run_without_repeating_epochs(imagefolder: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    assert run_train(tiny_train_argv(imagefolder, logs)) == 0
    assert run_train(["--resume", "last", "--log-dir", str(logs), "--epochs", "2"]) == 0
    assert sorted(p.name for p in logs.iterdir()) == ["version_0"]
    results = json.loads((logs / "version_0/results.json").read_text())
    assert results["epochs_run"] == 2
    assert len(results["train_seconds"]) == 1  # only the second epoch ran in the resumed session
    assert results["config"]["data_dir"] == str(imagefolder)  # taken from the run's saved config


def test_yaml_config_sets_options_and_flags_override_it(imagefolder: Path, tmp_path: Path) -> None:
    from cifar_lightning.cli import resolve_train_config

    cfg_file = tmp_path / "c.yaml"
    cfg_file.write_text("epochs: 7\nbatch-size: 16\naugment: standard\n")
    cfg = resolve_train_config(["--config", str(cfg_file), "--epochs", "3"])
    assert (cfg.epochs, cfg.batch_size, cfg.augment, cfg.lr) == (3, 16, "standard", 1.5)  # lr: the default preset's
    cfg_file.write_text("preset: seed\nbatch-size: 16\n")
    cfg = resolve_train_config(["--config", str(cfg_file)])
    assert (cfg.preset, cfg.model, cfg.batch_size, cfg.lr) == ("seed", "seed", 16, 1e-3)


BAD = [
    (["--epochs", "-1"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--model", "nope"], "--model 'nope'"),
    (["--augment", "sideways"], "--augment"),
    (["--accelerator", "tpu9"], "--accelerator"),
    (["--lr", "-3"], "--lr"),
    (["--max-time", "soon"], "--max-time"),
    (["--augment", "standard", "--rotation", "10"], "takes no option"),
    (["--resume", "last"], "no run with checkpoints/last.ckpt"),
    (["--resume", "x.ckpt", "--init-from", "y.ckpt"], "exclude each other"),
]


@pytest.mark.parametrize("extra, message", BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_flags_give_one_clean_error_line(imagefolder: Path, tmp_path: Path, capsys, extra, message) -> None:
    logs = tmp_path / "logs"
    code = run_train(tiny_train_argv(imagefolder, logs, *extra))
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0], err
    assert not list(logs.glob("version_*"))  # nothing half-made left behind


@pytest.mark.parametrize("kind", ["missing-dir", "garbage-ckpt", "bad-yaml", "gpu-without-gpu"])
def test_bad_inputs_give_one_clean_error_line(imagefolder: Path, tmp_path: Path, capsys, kind: str) -> None:
    logs = tmp_path / "logs"
    if kind == "missing-dir":
        argv = tiny_train_argv(tmp_path / "nowhere", logs, "--no-download")
        message = "nowhere"
    elif kind == "garbage-ckpt":
        (tmp_path / "g.ckpt").write_bytes(b"not a checkpoint at all")
        argv = tiny_train_argv(imagefolder, logs, "--init-from", str(tmp_path / "g.ckpt"))
        message = "g.ckpt: not a readable checkpoint"
    elif kind == "bad-yaml":
        (tmp_path / "c.yaml").write_text("epochs: [1,\n")
        argv = tiny_train_argv(imagefolder, logs, "--config", str(tmp_path / "c.yaml"))
        message = "not valid YAML"
    else:
        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
        argv = tiny_train_argv(imagefolder, logs, "--accelerator", "gpu")
        message = "gpu"
    code = run_train(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code != 0
    assert len(err) == 1 and message.lower() in err[0].lower() and "Traceback" not in err[0], err
    assert not list(logs.glob("version_*"))


@pytest.mark.subprocess
def test_a_bad_flag_in_a_real_subprocess_prints_no_traceback(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cifar_lightning", "train", "--epochs", "zero"],
        capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "--epochs" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.train
def test_last_checkpoint_is_the_latest_epoch_even_when_validation_stops_improving(imagefolder: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    # lr so small that val_acc never improves after the first epoch
    assert run_train(tiny_train_argv(imagefolder, logs, "--epochs", "3", "--lr", "1e-12")) == 0
    ckpts = logs / "version_0" / "checkpoints"
    last = torch.load(ckpts / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 2
    (best,) = ckpts.glob("best-*.ckpt")
    assert torch.load(best, map_location="cpu", weights_only=True)["epoch"] == 0


@pytest.mark.train
def test_a_refit_run_can_itself_be_resumed(imagefolder: Path, tmp_path: Path) -> None:
    logs = tmp_path / "logs"
    assert run_train(tiny_train_argv(imagefolder, logs)) == 0
    assert run_train(tiny_train_argv(imagefolder, logs, "--init-from", str(logs / "version_0/checkpoints/last.ckpt"))) == 0
    assert run_train(["--resume", "last", "--log-dir", str(logs), "--epochs", "2"]) == 0
    results = json.loads((logs / "version_1/results.json").read_text())
    assert results["epochs_run"] == 2 and results["config"]["init_from"].endswith("version_0/checkpoints/last.ckpt")


@pytest.mark.subprocess
def test_the_keras_benchmark_says_how_to_install_keras_when_it_is_missing() -> None:
    probe = (
        "import runpy, sys\n"
        "sys.modules['keras'] = None\n"  # as if the optional extra were not installed
        "sys.argv = ['benchmarks.keras', '--data-dir', 'nowhere']\n"
        "runpy.run_module('benchmarks.keras', run_name='__main__', alter_sys=True)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 2 and "pip install -e '.[keras]'" in out.stderr


@pytest.mark.subprocess
def test_the_keras_benchmarks_torch_side_trains_one_epoch_per_turn(tmp_path: Path) -> None:
    """The two systems take turns: each child trains an epoch only when told 'go', and stops
    cleanly when its turns run out (the Keras side follows the same wait_turn)."""
    tree = write_imagefolder(tmp_path / "tree", n_train=4, n_test=2)
    argv = [sys.executable, "-m", "benchmarks.keras", "--data-dir", str(tree), "--epochs", "3",
            "--batch-size", "8", "--log-dir", str(tmp_path / "logs"), "--system", "ours", "--ours", "accelerator=cpu"]  # fmt: skip
    out = subprocess.run(argv, input="go\ngo\n", capture_output=True, text=True, cwd=REPO, timeout=300)
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert out.returncode == 0, out.stderr[-2000:]
    assert [(r["system"], r["epoch"], r["images"]) for r in rows] == [("ours", 1, 40), ("ours", 2, 40)]
    assert all(r["seconds"] > 0 and 0 <= r["test_acc"] <= 1 for r in rows)


@pytest.mark.train
def test_a_run_trains_with_the_alternating_flip_and_refuses_it_without_crop_flip_augmentation(tmp_path: Path) -> None:
    tree = write_imagefolder(tmp_path / "tree", n_train=4, n_test=2)
    argv = tiny_train_argv(tree, tmp_path / "logs", "--augment", "standard", "--alternate-flip", epochs=2)
    assert call(train_main, argv) == 0
    config = yaml.safe_load((tmp_path / "logs/version_0/config.yaml").read_text())
    assert config["alternate_flip"] is True
    assert call(train_main, tiny_train_argv(tree, tmp_path / "logs2", "--alternate-flip")) == 2
    assert not (tmp_path / "logs2").exists()


@pytest.mark.unit
def test_swapping_the_photo_augmentation_drops_the_ranges_only_robust_uses() -> None:
    from cifar_lightning.cli import resolve_train_config

    cfg = resolve_train_config(["--preset", "photo", "--augment", "standard"])
    assert cfg.augment == "standard" and cfg.jpeg_quality_min is None and cfg.crop_padding == 2
    kept = resolve_train_config(["--preset", "photo", "--augment", "standard", "--jpeg-quality-min", "60"])
    assert kept.jpeg_quality_min == 60  # given, so kept (and refused by the augmentation, by name)


@pytest.mark.unit
@pytest.mark.parametrize(("argv", "says"), [
    (["--preset", "photo", "--robust-from", "0.9", "--epochs", "1"], "--robust-from 0.9 of 1 epoch"),
    (["--data-dir", "{tree}", "--log-dir", "{tree}"], "--log-dir"),
])  # fmt: skip
def test_a_recipe_that_cannot_do_what_it_says_is_refused_before_a_run(tmp_path: Path, capsys, argv, says) -> None:
    tree = write_imagefolder(tmp_path / "tree")
    argv = [a.format(tree=tree) for a in argv]
    assert run_train([*argv, "--data-dir", str(tree)] if "--data-dir" not in argv else argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and says in err[0]
    assert not [p for p in tree.rglob("version_*")]


@pytest.mark.unit
def test_a_resume_keeps_its_preset_and_needs_its_config(tmp_path: Path) -> None:
    from cifar_lightning import runs
    from cifar_lightning.errors import ConfigError
    from cifar_lightning.recipes import build

    run = tmp_path / "logs" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (run / "config.yaml").write_text(build({"preset": "seed"}).to_yaml())
    with pytest.raises(ConfigError, match="keeps its own recipe"):
        runs.resolve_recipe({"resume": str(run / "checkpoints" / "last.ckpt"), "preset": "90"})
    assert runs.resolve_recipe({"resume": str(run / "checkpoints" / "last.ckpt")}).preset == "seed"
    stray = tmp_path / "elsewhere" / "last.ckpt"
    stray.parent.mkdir()
    stray.write_bytes(b"x")
    with pytest.raises(ConfigError, match="config.yaml"):
        runs.resolve_recipe({"resume": str(stray)})
