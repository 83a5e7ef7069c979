from __future__ import annotations

import pytest
import torch

from cifar_lightning import models


def test_seed_network_maps_images_to_ten_logits() -> None:
    net = models.build("seed").eval()
    out = net(torch.randn(5, 3, 32, 32))
    assert out.shape == (5, 10)
    assert models.build("seed", num_classes=3)(torch.randn(2, 3, 32, 32)).shape == (2, 3)


def test_seed_network_has_the_keras_notebooks_parameter_count() -> None:
    # Keras model.summary() of the notebook's network: 896 + 9,248 + 18,496 + 36,928
    # + 2,097,664 + 5,130 trainable parameters.
    net = models.build("seed")
    assert sum(p.numel() for p in net.parameters()) == 2_168_362
    kinds = [type(m).__name__ for m in net.modules() if not isinstance(m, torch.nn.Sequential)][1:]
    assert kinds == [
        "Conv2d", "ReLU", "Conv2d", "ReLU", "MaxPool2d", "Dropout",
        "Conv2d", "ReLU", "Conv2d", "ReLU", "AvgPool2d", "Dropout",
        "Flatten", "Linear", "ReLU", "Dropout", "Linear",
    ]  # fmt: skip


def test_unknown_model_names_the_choices() -> None:
    with pytest.raises(ValueError, match="unknown model 'resnet9000'; choose from .*seed"):
        models.build("resnet9000")
