"""benchmarks/keras.py: the Keras benchmark without Keras installed, and its torch side taking turns; benchmarks/inference.py --views."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, write_imagefolder


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


def test_the_views_benchmark_scores_each_level_and_runs_fewer_images_at_2(tmp_path: Path, capsys) -> None:
    """benchmarks.inference --views: levels 3, 2, 1 on a test set, each with the images it ran."""
    from benchmarks import inference

    tree = write_imagefolder(tmp_path / "tree", n_train=1, n_test=6)
    inference.views("pretrained:94", str(tree))
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line[:1] in "123" and "%" in line]
    assert [r[0] for r in rows] == ["3", "2", "1"]
    per_image = {r[0]: float(r[3]) for r in rows}
    assert per_image["3"] == 6 and per_image["1"] == 2 and 2 <= per_image["2"] <= 6


def test_the_engines_benchmark_times_each_engine_of_a_checkpoint(trained, capsys, monkeypatch) -> None:
    from benchmarks import inference

    monkeypatch.setattr(sys, "argv", ["inference", str(trained["ckpt"]), "--seconds", "0.05", "--batch-sizes", "2"])
    inference.main()
    engines = [line.split()[0] for line in capsys.readouterr().out.splitlines() if line.rstrip().endswith("x")]
    assert engines == ["eager", "eager", "TorchScript", "onnxruntime"]


def test_the_trust_sweep_reads_back_a_finished_job_and_resumes_a_stopped_one(tmp_path: Path, monkeypatch) -> None:
    """A study cut off by a session's end goes on: a job with results and a report is read back
    without running anything, and one with only a last.ckpt resumes it (its recipe from its record)."""
    import argparse

    from benchmarks import trust

    calls: list[list[str]] = []
    monkeypatch.setattr(trust.subprocess, "call", lambda argv, **kw: calls.append([str(a) for a in argv]) or 1)
    args = argparse.Namespace(out=tmp_path, data_dir="data", accelerator="cpu", corruptions=True, split="test")
    done = tmp_path / "v" / "seed8"
    (done / "version_0").mkdir(parents=True)
    (done / "version_0" / "results.json").write_text(json.dumps(
        {"test_acc": 0.94, "best_checkpoint": "b.ckpt", "train_seconds": [1.0, 2.0], "config": {}}))  # fmt: skip
    (done / "report").mkdir()
    (done / "report" / "metrics.json").write_text(json.dumps(
        {"accuracy": 0.94, "ece": 0.01, "corruption_mean_accuracy": 0.86, "corruption_mean_ece": 0.04,
         "corruptions": {"jpeg": [{"label": "q75", "accuracy": 0.92}]}}))  # fmt: skip
    r = trust.run_job("v", "--preset 95", 8, args, {})
    assert calls == [] and r["test_acc"] == 0.94 and r["jpeg75_accuracy"] == 0.92 and r["train_seconds"] == 3.0
    stopped = tmp_path / "v" / "seed9" / "version_0" / "checkpoints"
    stopped.mkdir(parents=True)
    (stopped / "last.ckpt").write_bytes(b"")
    r = trust.run_job("v", "--preset 95", 9, args, {})
    assert r["resumed"] and r["train_exit"] == 1 and len(calls) == 1
    assert calls[0][-2:] == ["--resume", "last"] and "--seed" not in calls[0] and "--preset" not in calls[0]
    trust.run_job("v", "--preset 95", 10, args, {})  # nothing there yet: a new run with its seed and flags
    assert calls[1][-4:] == ["--seed", "10", "--preset", "95"]
