"""Lightning DDP on the CPU (gloo): a two-process run works, and its validation and test metrics
equal single-process metrics on the same data (no image counted twice by sampler padding)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
from conftest import REPO, tiny_train_argv, write_imagefolder

from cifar_lightning import load_classifier
from cifar_lightning.checkpoint import load_checkpoint
from cifar_lightning.data import CIFAR10DataModule
from cifar_lightning.images import CLASSES
from cifar_lightning.module import ImageClassifier

pytestmark = pytest.mark.subprocess


def single_process_metrics(ckpt: Path, tree: Path, stage: str) -> dict[str, float]:
    dm = CIFAR10DataModule(str(tree), val_size=21, eval_batch_size=4)
    if stage == "test":  # the one scoring path, as cifar-evaluate scores the checkpoint in one process
        dm.setup("test")
        s = load_classifier(ckpt).score(dm.test_set.images, dm.test_set.labels)
        return {"test_acc": s["accuracy"], "test_loss": s["loss"]}
    module = ImageClassifier.from_checkpoint(ckpt)
    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_model_summary=False)
    return {k: float(v) for k, v in trainer.validate(module, datamodule=dm, verbose=False)[0].items()}


def test_two_process_ddp_run_reports_the_single_process_metrics(tmp_path: Path) -> None:
    # 9 classes x 3 test images = 27 and 21 validation images: odd counts, so a padding sampler
    # would repeat an image on one of the two processes.
    tree = write_imagefolder(tmp_path / "tree", n_train=8, n_test=3, classes=CLASSES[:9])
    logs = tmp_path / "logs"
    env = {**os.environ, "CIFAR_LIGHTNING_CACHE": str(tmp_path / "cache"), "PYTHONPATH": str(REPO)}
    argv = tiny_train_argv(tree, logs, "--batch-size", "8", "--val-size", "21", "--devices", "2", "--strategy", "ddp",
                           "--log-images-every", "0", epochs=2)  # fmt: skip
    proc = subprocess.run(
        [sys.executable, "-m", "cifar_lightning", "train", *argv],
        env=env, capture_output=True, text=True, timeout=600, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in logs.iterdir()) == ["version_0"]  # one run directory for both processes
    results = json.loads((logs / "version_0" / "results.json").read_text())
    tested = Path(results["best_checkpoint"])
    single = single_process_metrics(tested, tree, "test")
    assert results["test_acc"] == pytest.approx(single["test_acc"], abs=1e-7)
    assert results["test_loss"] == pytest.approx(single["test_loss"], abs=1e-5)
    # The best checkpoint's validation accuracy, logged under DDP, is that of a single process.
    best_val = load_checkpoint(tested)["callbacks"]
    score = next(v["best_model_score"] for k, v in best_val.items() if "val_acc" in k and v.get("best_model_score") is not None)
    assert float(score) == pytest.approx(single_process_metrics(tested, tree, "val")["val_acc"], abs=1e-7)
