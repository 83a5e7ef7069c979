"""cifar-lightning: CIFAR-10 classifiers with PyTorch Lightning.

Names are imported on first use, so that ``cifar-train --help`` loads neither torch nor
Lightning and predicting with an ONNX export never loads Lightning.
"""

from __future__ import annotations

from importlib import import_module
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "CLASSES": "cifar_lightning.images",
    "MEAN": "cifar_lightning.images",
    "STD": "cifar_lightning.images",
    "CIFAR10DataModule": "cifar_lightning.data",
    "ImageClassifier": "cifar_lightning.module",
    "TrainConfig": "cifar_lightning.recipes",
    "load_classifier": "cifar_lightning.inference",
    "train": "cifar_lightning.training",
    "TrainResult": "cifar_lightning.training",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name in _PUBLIC:
        return getattr(import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'cifar_lightning' has no attribute {name!r}")
