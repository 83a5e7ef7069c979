"""load_classifier and Classifier from Python: the one scoring path's bad values and edges."""

from __future__ import annotations

import pytest
import torch

from cifar_lightning import load_classifier
from cifar_lightning.errors import ConfigError

pytestmark = pytest.mark.unit


@pytest.fixture(scope="module")
def clf():  # noqa: ANN201
    return load_classifier("pretrained:94")


def test_an_empty_list_of_images_is_an_empty_answer(clf) -> None:
    classes, probs = clf.predict([])
    assert classes == [] and probs.shape == (0, 10)


@pytest.mark.parametrize("batch_size", [0, -3, 2.5, True])
def test_a_bad_batch_size_is_a_config_error(clf, batch_size) -> None:
    with pytest.raises(ConfigError, match="batch_size"):
        clf.predict(torch.zeros(2, 32, 32, 3, dtype=torch.uint8).numpy(), batch_size=batch_size)


@pytest.mark.parametrize("tta", [7, -1, True, 1.0])
def test_a_bad_tta_is_refused(tta) -> None:
    with pytest.raises(ConfigError, match="tta"):
        load_classifier("pretrained:94", tta=tta)


@pytest.mark.parametrize("device", ["cuda:7" if torch.cuda.is_available() else "cuda", "tpu", "not a device", 3.5, None])
def test_a_device_this_machine_lacks_or_no_device_is_a_config_error(device) -> None:
    with pytest.raises(ConfigError, match="device="):
        load_classifier("pretrained:94", device=device)


def test_score_gives_what_a_run_and_evaluate_report(clf) -> None:
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(20) % 10
    s = clf.score(images, labels, batch_size=7)
    assert s["accuracy"] == float((s["probs"].argmax(1) == labels).float().mean())
    assert 0 <= s["ece"] <= 1 and 0 <= s["ece_uncalibrated"] <= 1 and s["images"] == 20
    assert torch.allclose(s["probs"], clf.probabilities(images, batch_size=500), atol=1e-5)
