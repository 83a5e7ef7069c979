"""Training from Python: ``cifar_lightning.train(...)`` runs cifar-train's path and raises instead of exiting."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import write_imagefolder

import cifar_lightning
from cifar_lightning.errors import ConfigError, DataError

TINY = {"val_size": 20, "batch_size": 32, "accelerator": "cpu", "progress_bar": False, "log_images_every": 0}


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, cifar_lightning.TrainResult]:
    root = tmp_path_factory.mktemp("api")
    tree = write_imagefolder(root / "tree")
    return tree, cifar_lightning.train(preset="seed", data_dir=tree, log_dir=root / "logs", epochs=1, **TINY)


@pytest.mark.train
def test_train_returns_the_run_its_tested_checkpoint_and_what_results_json_holds(trained) -> None:
    tree, result = trained
    assert result.run_dir.is_dir() and result.run_dir.name == "version_0"
    assert result.checkpoint.is_file() and result.checkpoint.parent == result.run_dir / "checkpoints"
    assert result.metrics == json.loads((result.run_dir / "results.json").read_text())
    assert result.metrics["best_checkpoint"] == str(result.checkpoint)
    assert result.metrics["config"]["epochs"] == 1 and result.metrics["config"]["preset"] == "seed"


@pytest.mark.train
def test_the_result_classifies_with_the_tested_checkpoint(trained) -> None:
    tree, result = trained
    clf = result.classifier()
    images = sorted((tree / "test" / "cat").iterdir())[:3]
    names, probs = clf.predict(images)
    assert len(names) == 3 and probs.shape == (3, 10)
    assert torch.allclose(probs.sum(1), torch.ones(3), atol=1e-5)
    assert clf.temperature == pytest.approx((result.metrics["calibration"] or {"temperature": 1.0})["temperature"])


@pytest.mark.train
def test_train_takes_a_config_file_and_tuples_as_cifar_train_takes_flags(tmp_path: Path) -> None:
    tree = write_imagefolder(tmp_path / "tree", n_train=4, n_test=1)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("epochs: 1\nwidths: 8,16,16\n")
    result = cifar_lightning.train(preset="90", data_dir=tree, config=recipe, log_dir=tmp_path / "logs", tta=0,
                                   widths=(8, 16, 8), **{**TINY, "val_size": 0, "batch_size": 16})  # fmt: skip
    assert result.metrics["config"]["widths"] == [8, 16, 8]  # the override wins over the file, as a flag would
    assert result.metrics["config"]["epochs"] == 1


@pytest.mark.parametrize(
    ("kwargs", "error", "says"),
    [
        ({"epochs": 0}, ConfigError, "--epochs"),
        ({"epoch": 2}, ConfigError, "unknown option"),
        ({"lr": float("nan")}, ConfigError, "--lr"),
        ({"augment": "sideways"}, ConfigError, "--augment"),
        ({"preset": "999"}, ConfigError, "preset"),
        ({"data_dir": "MISSING", "download": False}, DataError, "MISSING"),
    ],
    ids=["zero-epochs", "misspelt", "nan-lr", "bad-choice", "bad-preset", "no-data"],
)
def test_train_raises_the_project_errors_and_creates_no_run(tmp_path: Path, kwargs: dict, error: type, says: str) -> None:
    kwargs = {k: str(tmp_path / v) if v == "MISSING" else v for k, v in kwargs.items()}
    with pytest.raises(error, match=says):
        cifar_lightning.train(**{"data_dir": str(tmp_path / "data"), "log_dir": tmp_path / "logs", **TINY, **kwargs})
    assert not (tmp_path / "logs").exists() or not list((tmp_path / "logs").iterdir())


class CtrlCTwice(__import__("lightning").Callback):
    """Two Ctrl-C on the second training step, as a user pressing it twice."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # noqa: ANN001
        import os
        import signal

        if trainer.global_step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)


@pytest.mark.train
def test_two_ctrl_c_raise_run_interrupted_and_leave_no_handler_behind(tmp_path: Path) -> None:
    import signal

    from cifar_lightning import runs, training
    from cifar_lightning.errors import RunInterruptedError

    tree = write_imagefolder(tmp_path / "tree")
    before = (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM))
    cfg = runs.resolve_recipe({"preset": "seed", "data_dir": str(tree), "log_dir": str(tmp_path / "logs"), "epochs": 2, **TINY,
                               "batch_size": 8})  # fmt: skip
    with pytest.raises(RunInterruptedError) as stopped:
        training.run_training(cfg, callbacks=[CtrlCTwice()])
    assert stopped.value.code == 130 and "Ctrl-C" in str(stopped.value)
    assert (signal.getsignal(signal.SIGINT), signal.getsignal(signal.SIGTERM)) == before
