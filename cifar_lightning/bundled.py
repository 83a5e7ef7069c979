"""The ready-made models shipped inside the package, named ``pretrained:NAME``.

    cifar-predict cat.jpg                      # no model given: the bundled default
    cifar-evaluate pretrained:94
    load_classifier("pretrained:photo")

Each is a float16 safetensors export with its JSON sidecar in ``cifar_lightning/weights/``, and
a record in ``weights/index.json``: the command and seed that trained it, its figures and the
file's SHA-256 (docs/pretrained.md says the same for readers). Imports nothing heavy: the
command-line help lists the names.
"""

from __future__ import annotations

import json
import random
from importlib import resources
from pathlib import Path
from typing import Any

from cifar_lightning.errors import ModelError
from cifar_lightning.fileio import sha256_of

PREFIX = "pretrained:"
#: the model a command uses when given none: the first of these that the package holds
DEFAULT_ORDER = ("photo", "94")
#: each record's ``check_acc`` is measured on these test images, so a test can re-measure it quickly
CHECK_IMAGES, CHECK_SEED = 2000, 0


def check_subset(n_test: int) -> list[int]:
    """The indices of the test images ``check_acc`` was measured on (fixed: Python's own seeded RNG)."""
    return sorted(random.Random(CHECK_SEED).sample(range(n_test), min(CHECK_IMAGES, n_test)))


def folder() -> Path:
    return Path(str(resources.files("cifar_lightning").joinpath("weights")))


def index() -> dict[str, dict[str, Any]]:
    """name -> its record; {} when the package was built without weights."""
    path = folder() / "index.json"
    try:
        records = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return {}
    if not isinstance(records, dict):
        return {}
    return {str(k): v for k, v in records.items() if isinstance(v, dict) and isinstance(v.get("file"), str)}


def names() -> list[str]:
    return list(index())


def default_name() -> str:
    held = index()
    for name in DEFAULT_ORDER:
        if name in held:
            return name
    raise ModelError("this installation holds no bundled model; give a model file (a .ckpt, .safetensors or .onnx)")


def is_bundled(spec: str | Path) -> bool:
    return isinstance(spec, str) and spec.startswith(PREFIX)


def resolve(spec: str | Path) -> Path:
    """The file a model argument names: ``pretrained:NAME`` -> the bundled file; a path as it is."""
    if not is_bundled(spec):
        return Path(spec)
    name = str(spec)[len(PREFIX):]
    record = index().get(name)
    if record is None:
        known = ", ".join(PREFIX + n for n in names()) or "none in this installation"
        raise ModelError(f"{str(spec)[:80]!r}: no such bundled model; choose from {known}")
    path = folder() / record["file"]
    if not path.is_file():
        raise ModelError(f"{spec}: its file {path} is missing from this installation (reinstall cifar-lightning)")
    verify(str(spec), path, record)
    return path


def verify(spec: str, path: Path, record: dict[str, Any]) -> None:
    """The bundled weights and sidecar are the files index.json records (size and SHA-256),
    checked at every load: a changed copy (zeroed weights, another temperature) would still
    claim the recorded accuracy. Hashing the 4 MB and its sidecar takes about 6 ms (BENCHMARKS.md, "Export check")."""
    side = path.with_name(path.name + ".json")
    try:
        ok = (path.stat().st_size == record.get("size_bytes") and sha256_of(path) == record.get("sha256")
              and side.is_file() and sha256_of(side) == record.get("sidecar_sha256"))  # fmt: skip
    except OSError:
        ok = False
    if not ok:
        raise ModelError(f"{spec}: its files in {path.parent} are not the ones this installation records (changed or damaged); "
                         "reinstall cifar-lightning")  # fmt: skip


def record_of(spec: str | Path) -> dict[str, Any]:
    """The index record a ``pretrained:NAME`` names; {} for a path or an unknown name."""
    return index().get(str(spec)[len(PREFIX):], {}) if is_bundled(spec) else {}


def recipe_of(spec: str) -> dict[str, Any]:
    """What a fine-tune from a bundled model continues: the preset that trained it."""
    record = record_of(spec)
    return {"preset": record["preset"]} if isinstance(record.get("preset"), str) else {}


def trained(preset: str | None) -> str | None:
    """The bundled model that is ``--preset PRESET`` as it is now, already trained: one whose record's
    command sets nothing but the preset, a seed and the data folder. A model trained before its
    preset changed has its old recipe written out in flags (as ``94``'s record does), so it is none."""
    for name, record in index().items():
        words = str(record.get("command", "")).split()
        if preset and words[:3] == ["cifar-train", "--preset", preset] and set(words[3::2]) <= {"--seed", "--data-dir"}:
            return PREFIX + name
    return None


def test_accuracy(spec: str | Path) -> float | None:
    """A bundled model's test accuracy as measured through its file (its record's); None for a path."""
    acc = record_of(spec).get("test_acc")
    return acc if isinstance(acc, float) else None


def describe(spec: str | Path) -> str:
    """How a command names the model it uses: the bundled name with its recorded accuracy, or the path."""
    acc = test_accuracy(spec)
    return f"{spec} (bundled; {acc:.2%} on the CIFAR-10 test set)" if acc is not None else str(spec)
