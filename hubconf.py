"""torch.hub entries for the bundled models: no training, no download beyond this repository.

    import torch
    clf = torch.hub.load("path/to/cifar-lightning", "classifier", name="photo", source="local")
    classes, probs = clf.predict(["cat.jpg"])
    net = torch.hub.load("path/to/cifar-lightning", "network", name="94", source="local")  # a plain nn.Module
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

    from cifar_lightning.inference import Classifier

dependencies = ["torch", "torchvision", "safetensors", "PIL"]


def classifier(name: str = "photo", device: str = "cpu", tta: int | None = None, calibrate: bool = True) -> Classifier:
    """The ``Classifier`` of a bundled model (``pretrained:NAME``): images in, classes and
    calibrated probabilities out, with the model's test-time views."""
    from cifar_lightning.inference import load_classifier

    return load_classifier(_spec(name), device=device, tta=tta, calibrate=calibrate)


def network(name: str = "photo") -> torch.nn.Module:
    """The bundled model's plain ``nn.Module`` in eval mode, float32 weights: normalised (N, 3,
    32, 32) images (``cifar_lightning.images.normalize``) to logits, without test-time views or
    the temperature."""
    from cifar_lightning.modelfile import open_model

    return open_model(_spec(name)).network


def _spec(name: str) -> str:
    from cifar_lightning.bundled import PREFIX

    return name if name.startswith(PREFIX) else PREFIX + name
