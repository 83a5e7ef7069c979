"""hubconf.py: torch.hub gives a bundled model's Classifier and its plain network, offline."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cifar_lightning.errors import ModelError
from cifar_lightning.images import normalize

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.unit


def test_hub_classifier_is_the_bundled_models_classifier() -> None:
    clf = torch.hub.load(str(REPO), "classifier", name="photo", source="local", trust_repo=True)
    images = torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    from cifar_lightning.inference import load_classifier

    assert torch.equal(clf.probabilities(images), load_classifier("pretrained:photo").probabilities(images))
    assert clf.info["name"] == "pretrained:photo"


def test_hub_network_is_a_plain_module_giving_logits() -> None:
    net = torch.hub.load(str(REPO), "network", name="94", source="local", trust_repo=True)
    assert isinstance(net, torch.nn.Module) and not net.training
    images = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8)
    with torch.inference_mode():
        logits = net(normalize(images))
    assert logits.shape == (2, 10) and logits.dtype == torch.float32


def test_hub_refuses_an_unknown_name_in_one_line() -> None:
    with pytest.raises(ModelError, match="no such bundled model"):
        torch.hub.load(str(REPO), "classifier", name="nope", source="local", trust_repo=True)
