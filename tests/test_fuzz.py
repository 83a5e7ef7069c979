"""Generated inputs against the public entry points: only the project's own errors may escape.

Property-based (hypothesis), seeded and bounded: a fixed number of examples per property,
derandomized, so CI runs the same inputs every time in well under a minute. An example that
ever fails is kept below as a regular regression test."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from cifar_lightning import cli, recipes, runs
from cifar_lightning.errors import ConfigError, ImageError, ModelError, UserError
from cifar_lightning.images import load_image
from cifar_lightning.inference import load_classifier

FUZZ = settings(max_examples=60, derandomize=True, deadline=None, suppress_health_check=[HealthCheck.too_slow])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4),
    max_leaves=12,
)


def _image_bytes(fmt: str, w: int, h: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(w * 1000 + h).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format=fmt)
    return buf.getvalue()


SEEDS = {fmt: _image_bytes(fmt, 37, 23) for fmt in ("PNG", "JPEG", "BMP", "GIF", "WEBP")}


@st.composite
def mutated_images(draw: st.DrawFn) -> bytes:
    """A valid image of some format, then truncated, with bytes overwritten, or both."""
    data = bytearray(SEEDS[draw(st.sampled_from(sorted(SEEDS)))])
    for _ in range(draw(st.integers(0, 6))):
        data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    return bytes(data)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A seed network exported to safetensors + sidecar, and saved as a checkpoint."""
    from cifar_lightning.export import export
    from cifar_lightning.module import ImageClassifier

    root = tmp_path_factory.mktemp("fuzz")
    module = ImageClassifier(model="seed", class_names=list(recipes_classes()))
    ckpt = root / "model.ckpt"
    torch.save({"state_dict": module.state_dict(), "hyper_parameters": dict(module.hparams)}, ckpt)
    export(module, ckpt, "safetensors", root / "model.safetensors", torch.randn(4, 3, 32, 32))
    return root


def recipes_classes() -> tuple[str, ...]:
    from cifar_lightning.images import CLASSES

    return CLASSES


@FUZZ
@given(st.one_of(mutated_images(), st.binary(max_size=300)))
def test_any_bytes_decode_to_a_cifar_image_or_an_image_error(tmp_path_factory: pytest.TempPathFactory, data: bytes) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz_image.png"
    path.write_bytes(data)
    try:
        out = load_image(path)
    except ImageError as e:
        assert str(path) in str(e) and "\n" not in str(e)
        return
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8


def _probe(clf_path: Path) -> None:
    """Either a clear ModelError, or a classifier whose probabilities are real probabilities."""
    try:
        clf = load_classifier(clf_path)
    except ModelError as e:
        assert "\n" not in str(e)
        return
    _, probs = clf.predict([np.zeros((32, 32, 3), np.uint8)])
    assert bool(torch.isfinite(probs).all()) and torch.allclose(probs.sum(1), torch.ones(1), atol=1e-4)
    json.dumps(clf.top_k(probs, 3), allow_nan=False)


@FUZZ
@given(st.dictionaries(st.sampled_from(["model", "model_args", "class_names", "mean", "std", "tta", "format", "input_size"]), JSON))
@example(changes={"mean": None})  # found by this test: a null mean reached the classifier
@example(changes={"class_names": "airplane"})  # a string, not a list
@example(changes={"std": [0, 0, 0]})
@example(changes={"mean": [1e999, 0, 0]})
@example(changes={"model": ["seed"]})
def test_any_sidecar_gives_a_model_error_or_a_working_classifier(export_dir: Path, changes: dict) -> None:
    base = json.loads((export_dir / "model.safetensors.json").read_text())
    case = export_dir / "case"
    case.mkdir(exist_ok=True)
    shutil.copy(export_dir / "model.safetensors", case / "m.safetensors")
    (case / "m.safetensors.json").write_text(json.dumps({**base, **changes}))
    _probe(case / "m.safetensors")


@FUZZ
@given(st.dictionaries(st.sampled_from(["model", "model_args", "class_names", "num_classes", "tta", "lr", "optimizer"]), JSON))
@example(changes={"class_names": ["a", "b"]})  # too short for a 10-class network
@example(changes={"model_args": {"scaling_factor": 0}})
def test_any_checkpoint_hyper_parameters_give_a_model_error_or_a_working_classifier(export_dir: Path, changes: dict) -> None:
    ckpt = torch.load(export_dir / "model.ckpt", weights_only=True)
    path = export_dir / "case.ckpt"
    torch.save({**ckpt, "hyper_parameters": {**ckpt["hyper_parameters"], **changes}}, path)
    _probe(path)


@FUZZ
@given(st.dictionaries(st.sampled_from(sorted(recipes.FIELDS)), JSON, max_size=5))
def test_any_yaml_recipe_gives_a_config_error_or_a_valid_recipe(tmp_path_factory: pytest.TempPathFactory, values: dict) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz.yaml"
    path.write_text(yaml.safe_dump(values))
    values.pop("resume", None), values.pop("init_from", None)  # files: their checks need real ones
    try:
        cfg = runs.resolve_recipe({k: v for k, v in recipes.read_yaml(path).items() if k not in ("resume", "init_from")})
    except (ConfigError, UserError) as e:
        assert "\n" not in str(e)
        return
    assert cfg.epochs >= 1 and cfg.batch_size >= 1
    # what --print-config writes reads back, checked, as the same recipe
    assert recipes.TrainConfig(**recipes.check_values(yaml.safe_load(cfg.to_yaml()))) == cfg


@FUZZ
@given(st.text(max_size=200))
def test_any_yaml_text_given_to_the_cli_exits_0_or_2(tmp_path_factory: pytest.TempPathFactory, text: str) -> None:
    path = tmp_path_factory.getbasetemp() / "fuzz_cli.yaml"
    path.write_text(text)
    assert cli.train_main(["--config", str(path), "--print-config"]) in (0, 2)
