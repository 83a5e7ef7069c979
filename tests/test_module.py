from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from conftest import write_malicious_checkpoint

from cifar_lightning.data import CIFAR10DataModule
from cifar_lightning.errors import CheckpointError
from cifar_lightning.module import ImageClassifier


def first_batch_loss(tree: Path, seed: int) -> float:
    L.seed_everything(seed, verbose=False)
    dm = CIFAR10DataModule(str(tree), val_size=20, batch_size=16, augment="seed")
    dm.setup("fit")
    model = ImageClassifier()
    x, y = next(iter(dm.train_dataloader()))
    dm.trainer = type("T", (), {"training": True})()
    x, y = dm.on_after_batch_transfer((x, y), 0)
    model.train()
    return F.cross_entropy(model(x), y).item()


def test_same_seed_gives_the_same_first_batch_loss(imagefolder: Path) -> None:
    a, b, c = first_batch_loss(imagefolder, 3), first_batch_loss(imagefolder, 3), first_batch_loss(imagefolder, 4)
    assert a == b
    assert a != c


def test_forward_returns_logits_and_predict_step_probabilities() -> None:
    model = ImageClassifier().eval()
    x = torch.randn(4, 3, 32, 32)
    logits = model(x)
    probs = model.predict_step((x, torch.zeros(4, dtype=torch.long)), 0)
    assert logits.shape == probs.shape == (4, 10)
    assert torch.allclose(probs.sum(1), torch.ones(4)) and torch.allclose(probs, logits.softmax(1))


def test_bad_hyperparameters_are_refused() -> None:
    with pytest.raises(ValueError, match="--optimizer"):
        ImageClassifier(optimizer="rmsprop-ish")
    with pytest.raises(ValueError, match="--lr"):
        ImageClassifier(lr=0)


def _save_checkpoint(path: Path, model: ImageClassifier) -> None:
    torch.save({"state_dict": model.state_dict(), "hyper_parameters": dict(model.hparams)}, path)


def test_checkpoint_round_trip_rebuilds_the_network(tmp_path: Path) -> None:
    model = ImageClassifier(class_names=[str(i) for i in range(10)]).eval()
    _save_checkpoint(tmp_path / "m.ckpt", model)
    again = ImageClassifier.from_checkpoint(tmp_path / "m.ckpt").eval()
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(model(x), again(x))


BAD_CHECKPOINTS = ["missing", "random", "empty", "truncated", "foreign", "malicious", "malicious-raw-pickle", "wrong-shapes"]


@pytest.mark.parametrize("kind", BAD_CHECKPOINTS)
def test_unusable_checkpoints_raise_one_clear_error(tmp_path: Path, kind: str) -> None:
    path = tmp_path / f"{kind}.ckpt"
    marker = tmp_path / "pwned"
    good = ImageClassifier()
    if kind == "random":
        path.write_bytes(bytes(range(256)) * 10)
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        _save_checkpoint(path, good)
        path.write_bytes(path.read_bytes()[:5000])
    elif kind == "foreign":
        torch.save({"weights": torch.zeros(3)}, path)
    elif kind == "malicious-raw-pickle":
        write_malicious_checkpoint(path, marker, raw_pickle=True)
    elif kind == "malicious":
        write_malicious_checkpoint(path, marker)
    elif kind == "wrong-shapes":
        ckpt = {"state_dict": good.state_dict(), "hyper_parameters": {**good.hparams, "num_classes": 7}}
        torch.save(ckpt, path)
    with pytest.raises(CheckpointError) as err:
        ImageClassifier.from_checkpoint(path)
    assert str(path.name) in str(err.value) and "\n" not in str(err.value)
    if kind == "malicious":
        assert "refused to load: it asks to import" in str(err.value)
    assert not marker.exists()
