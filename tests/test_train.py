"""cifar-train: a run's files, init-from, resume, recipes, and the flags and inputs it refuses before a run exists."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from conftest import call, copy_of_seed_run, one_error_line, probe_memory, tiny_train_argv, tree_state, write_imagefolder
from hypothesis import given, settings
from hypothesis import strategies as st

from cifar_lightning import bundled, load_classifier, recipes, training
from cifar_lightning.cli import evaluate_main, export_main, train_main
from cifar_lightning.errors import ConfigError, shown
from cifar_lightning.inference import as_uint8_batch
from cifar_lightning.recipes import read_yaml


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


@pytest.mark.unit
def test_a_refit_of_a_run_recorded_by_another_version_keeps_its_preset(tmp_path: Path) -> None:
    """An option this version does not know (a later version's) must not turn the run's record
    into nothing: a refit would then silently train the default recipe on the seed network's
    weights. It keeps the preset the record names; a resume, which needs all of it, refuses."""
    from cifar_lightning import runs
    from cifar_lightning.recipes import build

    run = tmp_path / "logs" / "version_0"
    (run / "checkpoints").mkdir(parents=True)
    (run / "checkpoints" / "last.ckpt").write_bytes(b"x")
    (run / "config.yaml").write_text(build({"preset": "seed"}).to_yaml() + "an_option_from_a_later_version: 3\n")
    cfg = runs.resolve_recipe({"init_from": str(run / "checkpoints" / "last.ckpt")})
    assert (cfg.preset, cfg.model, cfg.optimizer) == ("seed", "seed", "adam")
    with pytest.raises(ConfigError, match="config.yaml"):
        runs.resolve_recipe({"resume": str(run / "checkpoints" / "last.ckpt")})


# ----------------------------------------------------------------------------- relative paths


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


# ----------------------------------------------------------------------------- options and inputs checked before anything is created


def test_non_finite_hyper_parameters_are_refused_up_front(run, tmp_path: Path, capsys) -> None:
    for flag in ("--lr", "--weight-decay", "--momentum"):
        assert call(train_main, tiny_train_argv(run["tree"], tmp_path / "logs", flag, "inf")) == 2
        assert flag in one_error_line(capsys)
    assert not (tmp_path / "logs").exists()


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


def test_a_data_or_log_dir_whose_name_is_not_utf8_is_refused_before_training(tmp_path: Path, capsys) -> None:
    odd = os.fsdecode(os.path.join(os.fsencode(tmp_path), b"caf\xe9"))  # a name a run record (YAML, JSON) cannot hold
    for flag in ("--data-dir", "--log-dir"):
        argv = tiny_train_argv(tmp_path / "tree", tmp_path / "logs", flag, odd)
        assert call(train_main, argv) == 2
        line = one_error_line(capsys)
        assert flag in line and "UTF-8" in line
        line.encode("utf-8")  # the message itself is printable
    assert not (tmp_path / "logs").exists()


def test_a_log_dir_inside_the_data_is_refused_before_anything_is_written(run, tmp_path: Path, capsys) -> None:
    tree = Path(shutil.copytree(run["tree"], tmp_path / "tree"))
    link = tmp_path / "T"
    link.symlink_to(tree, target_is_directory=True)
    before = tree_state(tree)
    for logs in (tree / "train", link / "train" / "cat", tree / "x" / ".." / "test"):
        assert call(train_main, tiny_train_argv(tree, logs)) == 2
        line = one_error_line(capsys)
        assert "--log-dir" in line and "inside the data dir" in line
    assert tree_state(tree) == before and sorted(p.name for p in (tree / "train").iterdir()) == sorted(os.listdir(run["tree"] / "train"))


@pytest.mark.parametrize(("extra", "says"), [(["--data-dir", "ELEVEN"], "11 ("), (["--lr", "0.5"], "--lr")],
                         ids=["eleven-classes", "other-lr"])  # fmt: skip
def test_a_resume_that_cannot_go_ahead_leaves_the_run_as_it_was(run, tmp_path: Path, capsys, extra: list[str], says: str) -> None:
    _, moved = copy_of_seed_run((run["tree"], run["run"]), tmp_path / "copy")
    eleven = write_imagefolder(tmp_path / "eleven", n_train=3, n_test=1, classes=[*sorted(os.listdir(run["tree"] / "train")), "zebra"])
    extra = [str(eleven) if a == "ELEVEN" else a for a in extra]
    before = tree_state(moved)
    assert call(train_main, ["--resume", str(moved / "checkpoints" / "last.ckpt"), "--epochs", "2", "--no-progress-bar", *extra]) == 2
    assert says in one_error_line(capsys)
    assert tree_state(moved) == before


def test_a_diverging_run_never_writes_a_checkpoint_with_non_finite_weights(run, tmp_path: Path, capsys) -> None:
    logs = tmp_path / "logs"
    code = call(train_main, tiny_train_argv(run["tree"], logs, "--lr", "1e30", "--optimizer", "sgd", "--epochs", "2"))
    assert code == 1 and "non-finite" in capsys.readouterr().err.lower().replace("nan", "non-finite")
    for ckpt in logs.rglob("*.ckpt"):
        state = torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]
        assert all(bool(torch.isfinite(v).all()) for v in state.values() if v.is_floating_point()), ckpt


# ----------------------------------------------------------------------------- recipes of untrusted size


BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{n}: &{n} [{', '.join([f'*{p}'] * 9)}]\n" for p, n in zip("abcdef", "bcdefg", strict=True)
) + "epochs: [*g, *g, *g, *g, *g, *g, *g, *g, *g]\n"


def test_a_yaml_with_aliases_is_refused_at_once(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    t0 = time.perf_counter()
    with pytest.raises(ConfigError, match="aliases") as e:
        read_yaml(path)
    assert time.perf_counter() - t0 < 2 and len(str(e.value)) < 300


@settings(max_examples=40, deadline=None)
@given(depth=st.integers(1, 6), fan=st.integers(1, 9), key=st.sampled_from(["epochs", "lr", "widths", "data_dir", "preset"]))
def test_generated_yaml_with_aliases_is_refused_and_the_error_is_short(tmp_path_factory, depth: int, fan: int, key: str) -> None:
    lines = ["l0: &l0 [lol]"] + [f"l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * fan)}]" for i in range(1, depth + 1)]
    path = tmp_path_factory.mktemp("yaml") / "r.yaml"
    path.write_text("\n".join([*lines, f"{key}: *l{depth}"]) + "\n")
    with pytest.raises(ConfigError) as e:
        read_yaml(path)
    assert len(str(e.value)) < 300


def test_a_huge_value_is_quoted_bounded() -> None:
    nested: list = ["lol"] * 9
    for _ in range(8):
        nested = [nested] * 9  # 9**9 items if walked: shown() must not walk them
    assert len(shown(nested)) <= 80 and len(shown("x" * 10_000_000)) <= 80


def test_a_recipe_over_a_megabyte_is_refused_unparsed(tmp_path: Path) -> None:
    path = tmp_path / "big.yaml"
    path.write_text("epochs: 3\n" + "# padding\n" * 200_000)
    with pytest.raises(ConfigError, match="MB"):
        read_yaml(path)


@pytest.mark.subprocess
def test_a_yaml_bomb_is_one_line_within_a_gigabyte(tmp_path: Path) -> None:
    path = tmp_path / "bomb.yaml"
    path.write_text(BOMB)
    proc = probe_memory("train_main", ["--config", str(path), "--print-config"])
    assert proc.returncode == 2 and "aliases" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def test_the_printed_flops_price_the_whitening_bias_only_while_it_trains() -> None:
    """The whitening bias trains for the first whiten_bias_epochs only; after that its gradient
    (and the first conv's input gradient it needs) is never computed, so it is not counted."""
    from cifar_lightning.callbacks import phase_flops, training_flops_per_image
    from cifar_lightning.module import ImageClassifier

    def module(epochs_of_bias: int) -> ImageClassifier:
        return ImageClassifier(model="fast", model_args={"widths": [8, 16, 16]}, whiten_bias_epochs=epochs_of_bias)

    m = module(2)
    trained, frozen = training_flops_per_image(m.net, whiten_bias=True), training_flops_per_image(m.net, whiten_bias=False)
    assert trained > frozen > 0
    assert phase_flops(m, 5) == [(2, trained), (3, frozen)]
    assert phase_flops(m, 1) == [(1, trained)]  # a run shorter than the bias phase
    assert phase_flops(module(0), 5) == [(5, trained)]  # 0: the bias trains throughout
    assert m.net.whiten.bias.requires_grad  # the count touched a copy only


def test_the_run_estimate_scales_each_phase_by_its_flops() -> None:
    """Timed while the whitening bias still trains, the later (cheaper) steps count at their
    FLOPs' share; timed after, every step left costs the same."""
    from types import SimpleNamespace

    from cifar_lightning.callbacks import RunEstimate

    est = RunEstimate()
    est._phases = [(3, 110), (8, 100)]  # epochs, FLOPs per image: 11 epochs of 47 steps
    assert est.relative_steps(SimpleNamespace(current_epoch=0), 517, 0) == pytest.approx(141 + 376 * 100 / 110)
    assert est.relative_steps(SimpleNamespace(current_epoch=5), 517, 235) == pytest.approx(517 - 235)
    assert est.relative_steps(SimpleNamespace(current_epoch=1), 517, 60) == pytest.approx(141 - 60 + 376 * 100 / 110)
    est._phases = [(11, 100)]
    assert est.relative_steps(SimpleNamespace(current_epoch=4), 517, 200) == pytest.approx(317)


def test_the_time_left_after_a_resume_prices_steps_not_the_partial_epoch(monkeypatch, capsys) -> None:  # noqa: ANN001
    """A run resumed in epoch 6 of 13 times only the part of epoch 6 it trains: the time left is
    that part's time per step over the steps left, not its (short) time per epoch."""
    from types import SimpleNamespace

    from cifar_lightning import callbacks

    clock = iter([1000.0, 1060.0])  # the resumed part: 30 steps in 60 s
    monkeypatch.setattr(callbacks.time, "perf_counter", lambda: next(clock))
    report = callbacks.EpochReport()
    module = SimpleNamespace(total_steps=lambda: 1300, log=lambda *a, **k: None)  # 13 epochs of 100 steps
    trainer = SimpleNamespace(global_step=570, current_epoch=5, max_epochs=13, is_global_zero=True, callback_metrics={})
    report.on_train_start(trainer, module)
    trainer.global_step = 600
    report.on_train_epoch_end(trainer, module)
    assert "about 23m20s left" in capsys.readouterr().out  # 700 steps at 2 s


def test_a_long_run_names_a_preset_that_costs_clearly_less() -> None:
    """93 costs about what the Muon 94 does (0.27 against 0.265 PFLOP): a long 94 run names 90."""
    names = {p: training.long_run_hint(recipes.build({"preset": p})) for p in ("96", "95", "94", "93", "90", "seed")}
    assert names == {p: f"for a quicker run try --preset {q}" for p, q in (("96", "95"), ("95", "94"), ("94", "90"), ("93", "90"))} | {
        "90": None, "seed": None}


@pytest.mark.skipif("photo" not in bundled.index(), reason="built without the photo model")
def test_a_long_photo_run_says_its_recipe_is_bundled_already_trained_unless_it_changes_the_recipe() -> None:
    """--preset photo is pretrained:photo's recipe: its seed, data folder and trainer may differ;
    another epoch count is another recipe, and photo has no quicker preset to name."""
    same = recipes.build({"preset": "photo", "seed": 3, "data_dir": "/elsewhere", "log_dir": "/runs", "precision": "32-true"})
    assert training.long_run_hint(same) == "pretrained:photo is this recipe, already trained"
    assert training.long_run_hint(recipes.build({"preset": "photo", "epochs": 5})) is None
    assert training.long_run_hint(recipes.build({"preset": "photo", "augment": "standard"})) is None
