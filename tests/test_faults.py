"""Faults during training: kills at any moment, signals, non-finite losses, full disks.

Training runs in a real subprocess on tiny data. A small driver (below) slows the chosen phase
down and announces it with a marker file, so the test can SIGKILL the process exactly there:
mid-epoch, during validation, or halfway through writing a checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, tiny_train_argv, write_imagefolder

from cifar_lightning.checkpoint import load_checkpoint

pytestmark = pytest.mark.faults

# Runs cifar-train; PAUSE_AT=train:N|val:N|save:N makes the N-th training step, validation
# batch or checkpoint write announce itself in MARKER and sleep, so the test can kill it there.
DRIVER = r"""
import os, sys, time
from pathlib import Path
pause = os.environ.get("PAUSE_AT", "")
marker = Path(os.environ.get("MARKER", "marker"))
kind, _, nth = pause.partition(":")
count = {"n": 0}

def hold(what):
    count["n"] += 1
    if count["n"] == int(nth):
        marker.write_text(what)
        for _ in range(1200):  # until killed, or the test removes the marker (signals: go on)
            time.sleep(0.05)
            if not marker.exists():
                break

from cifar_lightning import module
if kind == "train":
    step = module.ImageClassifier.on_train_batch_start
    def on_train_batch_start(self, batch, batch_idx):
        hold("train")
        return step(self, batch, batch_idx)
    module.ImageClassifier.on_train_batch_start = on_train_batch_start
elif kind == "val":
    val = module.ImageClassifier.validation_step
    def validation_step(self, batch, batch_idx):
        hold("val")
        return val(self, batch, batch_idx)
    module.ImageClassifier.validation_step = validation_step
elif kind == "save":
    import torch
    real_save = torch.save
    def slow_save(obj, f, *a, **k):
        real_save(obj, f, *a, **k)
        if hasattr(f, "flush"):
            f.flush()
            hold("save")
    module.torch.save = slow_save
from cifar_lightning.cli import train_main
sys.exit(train_main(sys.argv[1:]))
"""


# The fault runs: 3 epochs of batches of 16, seeded and deterministic, so a resumed run must end
# on exactly the metrics of an unbroken one. EVERY_STEP adds a checkpoint after every step.
FAULT_FLAGS = ("--batch-size", "16", "--seed", "7", "--deterministic", "--log-images-every", "0")
EVERY_STEP = ("--checkpoint-every-steps", "1")


def train_args(tree: Path, logs: Path, *extra: str, every_step: bool = True) -> list[str]:
    return tiny_train_argv(tree, logs, *FAULT_FLAGS, *(EVERY_STEP if every_step else ()), *extra, epochs=3)


def run(argv: list[str], env: dict, pause: str = "", marker: Path | None = None, kill: int | None = None):  # noqa: ANN201
    env = {**env, "PAUSE_AT": pause, "MARKER": str(marker or "")}
    proc = subprocess.Popen([sys.executable, "-c", DRIVER, *argv], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, stdin=subprocess.DEVNULL)  # fmt: skip
    if kill is not None:
        deadline = time.monotonic() + 300
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never reached the pause point"
            time.sleep(0.05)
        os.kill(proc.pid, kill)
        marker.unlink()
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    root = tmp_path_factory.mktemp("faults")
    tree = write_imagefolder(root / "tree", n_train=10, n_test=3)  # 80 train (5 steps/epoch), 20 val, 30 test
    env = {**os.environ, "CIFAR_LIGHTNING_CACHE": str(root / "cache"), "PYTHONPATH": str(REPO)}
    return tree, env


@pytest.fixture(scope="module")
def unbroken(tiny, tmp_path_factory: pytest.TempPathFactory) -> dict:
    tree, env = tiny
    logs = tmp_path_factory.mktemp("unbroken")
    code, out, err = run(train_args(tree, logs), env)
    assert code == 0, err[-2000:]
    return json.loads((logs / "version_0" / "results.json").read_text())


@pytest.mark.parametrize("pause", ["train:3", "train:12", "val:2", "val:3", "save:4", "save:11"])
def test_resume_after_sigkill_finishes_with_the_metrics_of_an_unbroken_run(tiny, unbroken, tmp_path: Path, pause: str) -> None:
    tree, env = tiny
    logs = tmp_path / "logs"
    marker = tmp_path / "marker"
    code, _, _ = run(train_args(tree, logs), env, pause=pause, marker=marker, kill=signal.SIGKILL)
    assert code == -signal.SIGKILL
    last = logs / "version_0" / "checkpoints" / "last.ckpt"
    load_checkpoint(last)  # whatever the moment of the kill, last.ckpt is a whole checkpoint
    code, out, err = run(["--resume", "last", "--log-dir", str(logs)], env)
    assert code == 0, err[-2000:]
    results = json.loads((logs / "version_0" / "results.json").read_text())
    assert results["epochs_run"] == 3
    assert sorted(p.name for p in logs.iterdir()) == ["version_0"]  # resumed in place, no second run
    assert results["test_acc"] == unbroken["test_acc"]
    assert results["test_loss"] == pytest.approx(unbroken["test_loss"], abs=1e-6)
    assert not list((logs / "version_0" / "checkpoints").glob(".*.tmp-*"))  # the killed write's leftovers are gone


@pytest.mark.parametrize(("sig", "step"), [(signal.SIGTERM, 7), (signal.SIGINT, 7), (signal.SIGTERM, 5), (signal.SIGINT, 10)])
def test_sigterm_and_ctrl_c_save_a_checkpoint_and_exit_naming_it(tiny, unbroken, tmp_path: Path, sig: int, step: int) -> None:
    tree, env = tiny
    logs, marker = tmp_path / "logs", tmp_path / "marker"
    # No periodic checkpoints: the one on disk after the signal is the one the signal saved.
    code, out, err = run(train_args(tree, logs, every_step=False), env, pause=f"train:{step}", marker=marker, kill=sig)
    last = logs / "version_0" / "checkpoints" / "last.ckpt"
    assert code == 128 + sig, err[-2000:]
    lines = err.strip().splitlines()
    assert f"saved {last}" in lines[-1] and "resume with: cifar-train --resume" in lines[-1] and "Traceback" not in err
    assert load_checkpoint(last)["global_step"] == step  # the step that was running when the signal came
    code, _, err = run(["--resume", str(last)], env)
    assert code == 0, err[-2000:]
    results = json.loads((logs / "version_0" / "results.json").read_text())
    assert results["test_acc"] == unbroken["test_acc"]
    assert results["test_loss"] == pytest.approx(unbroken["test_loss"], abs=1e-6)


def test_a_non_finite_loss_stops_naming_the_step_and_keeps_the_last_good_checkpoint(tiny, tmp_path: Path) -> None:
    tree, env = tiny
    logs = tmp_path / "logs"
    # lr 1e30: the first step's weights are huge but finite, the next step's loss is not. With a
    # checkpoint after every step, the run has a good checkpoint when the loss breaks.
    code, _, err = run(train_args(tree, logs, "--lr", "1e30", "--epochs", "5"), env)
    assert code == 1
    line = err.strip().splitlines()[-1]
    assert "the training loss became" in line and "Traceback" not in err
    last = logs / "version_0" / "checkpoints" / "last.ckpt"
    assert line.endswith(f"; stopped, the last good checkpoint is {last}"), line
    step = re.search(r" at step (\d+) ", line)
    assert step, line
    kept = load_checkpoint(last)
    assert kept["global_step"] == int(step.group(1))  # saved right before the step whose loss broke
    assert all(torch.isfinite(v).all() for v in kept["state_dict"].values() if v.is_floating_point())


def test_a_full_disk_is_one_clear_line_and_earlier_checkpoints_stay_intact(tiny, tmp_path: Path) -> None:
    tree, env = tiny
    logs = tmp_path / "logs"
    assert run(train_args(tree, logs, "--epochs", "1", every_step=False), env)[0] == 0
    last = logs / "version_0" / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    # The resumed run's next checkpoint write fails as a full disk would.
    full = DRIVER.replace("from cifar_lightning.cli import train_main", (
        "import errno, torch\n"
        "def no_space(*a, **k):\n"
        "    raise OSError(errno.ENOSPC, 'No space left on device')\n"
        "module.torch.save = no_space\n"
        "from cifar_lightning.cli import train_main"
    ))  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", full, "--resume", str(last), "--epochs", "2"], env=env, capture_output=True,
                          text=True, stdin=subprocess.DEVNULL, timeout=600)  # fmt: skip
    assert proc.returncode == 1
    line = proc.stderr.strip().splitlines()[-1]
    assert "No space left on device" in line and "Traceback" not in proc.stderr
    assert last.read_bytes() == before
    assert not list(last.parent.glob(".*.tmp-*"))


def test_a_log_dir_that_cannot_be_created_is_one_clear_line(tiny, tmp_path: Path) -> None:
    tree, env = tiny
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code, _, err = run(train_args(tree, blocker / "logs"), env)
    assert code == 2 and "--log-dir" in err.strip().splitlines()[-1] and "Traceback" not in err
    assert blocker.read_text() == "not a folder"


MUON = ("--preset", "94", "--widths", "8,16,16", "--optimizer", "muon", "--lookahead", "--batch-size", "16", "--tta", "0")


@pytest.mark.parametrize("flags", [("--augment", "standard", "--alternate-flip"), (*MUON, "--alternate-flip")], ids=["flip", "muon"])
def test_a_run_with_the_alternating_flip_resumes_after_sigkill_to_the_unbroken_metrics(tiny, tmp_path: Path, flags) -> None:  # noqa: ANN001
    """The flip is a function of (image, epoch): killed in its second epoch (odd parity), the
    resumed run mirrors the same images an unbroken one does. With Muon and Lookahead too: both
    optimizers' momenta and the slow weights come back from the checkpoint."""
    tree, env = tiny
    code, _, err = run(train_args(tree, tmp_path / "unbroken", *flags), env)
    assert code == 0, err[-2000:]
    unbroken = json.loads((tmp_path / "unbroken" / "version_0" / "results.json").read_text())
    logs, marker = tmp_path / "logs", tmp_path / "marker"
    code, _, _ = run(train_args(tree, logs, *flags), env, pause="train:7", marker=marker, kill=signal.SIGKILL)
    assert code == -signal.SIGKILL
    code, _, err = run(["--resume", "last", "--log-dir", str(logs)], env)
    assert code == 0, err[-2000:]
    results = json.loads((logs / "version_0" / "results.json").read_text())
    assert results["config"]["alternate_flip"] is True
    assert results["config"]["optimizer"] == unbroken["config"]["optimizer"]
    assert results["test_acc"] == unbroken["test_acc"]
    assert results["test_loss"] == pytest.approx(unbroken["test_loss"], abs=1e-6)
