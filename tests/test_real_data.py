"""Smoke tests on the real CIFAR-10 in ../shared/data/cifar10 (skipped only where it is absent)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cifar_lightning.cli import train_main

REAL_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar10"
pytestmark = pytest.mark.skipif(not REAL_DATA.is_dir(), reason=f"{REAL_DATA} is absent")


def test_seed_network_one_epoch_on_5000_real_images_beats_35_percent(tmp_path: Path) -> None:
    code = train_main([
        "--data-dir", str(REAL_DATA), "--model", "seed", "--epochs", "1", "--limit-train-images", "5000",
        "--log-dir", str(tmp_path / "logs"), "--accelerator", "cpu", "--no-progress-bar",
    ])  # fmt: skip
    assert code == 0
    results = json.loads((tmp_path / "logs/version_0/results.json").read_text())
    assert results["best_val_acc"] > 0.35, results
    assert results["test_acc"] > 0.35, results


def test_fast_network_one_epoch_on_5000_real_images_beats_FLOOR_percent(tmp_path: Path) -> None:
    """The default recipe's network, one epoch of 20 steps: a broken whitening layer, schedule
    or optimiser grouping shows up here as chance-level accuracy."""
    code = train_main([
        "--data-dir", str(REAL_DATA), "--preset", "94", "--epochs", "1", "--limit-train-images", "5000",
        "--val-size", "5000", "--batch-size", "256", "--log-dir", str(tmp_path / "logs"), "--accelerator", "cpu",
        "--no-progress-bar",
    ])  # fmt: skip
    assert code == 0
    results = json.loads((tmp_path / "logs/version_0/results.json").read_text())
    assert results["best_val_acc"] > FLOOR, results
    assert results["test_acc"] > FLOOR, results
