"""Networks by name. A network knows nothing of training: it maps normalised (N, 3, 32, 32)
floats to (N, num_classes) logits, and is rebuilt from (name, plain keyword arguments) alone.

    python -c "from cifar_lightning.models import build; print(build('seed'))"
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

MODELS: dict[str, Callable[..., nn.Module]] = {}


def register(name: str) -> Callable:
    def add(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        MODELS[name] = factory
        return factory

    return add


def build(name: str, **kwargs: object) -> nn.Module:
    """A fresh network; raises ValueError naming the choices for an unknown name."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(sorted(MODELS))}")
    return MODELS[name](**kwargs)


def keras_init(module: nn.Module) -> None:
    """Keras defaults (Glorot-uniform weights, zero biases), part of reproducing the notebook:
    PyTorch's default Kaiming-uniform(a=sqrt(5)) init trains this network differently."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


@register("seed")
class SeedCNN(nn.Module):
    """The Keras notebook's CNN, layer for layer:
    Conv(32)-Conv(32)-MaxPool-Drop(.25)-Conv(64)-Conv(64)-AvgPool-Drop(.25)-Dense(512)-Drop(.5)-Dense(10).
    """

    def __init__(self, num_classes: int = 10, width: int = 32, hidden: int = 512, image_size: int = 32) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            nn.Conv2d(3, w, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(inplace=True),
            nn.MaxPool2d(2), nn.Dropout(0.25),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(inplace=True),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(inplace=True),
            nn.AvgPool2d(2), nn.Dropout(0.25),
        )  # fmt: skip
        flat = 2 * w * (image_size // 4) ** 2
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(inplace=True), nn.Dropout(0.5),
            nn.Linear(hidden, num_classes),
        )  # fmt: skip
        keras_init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
