"""cifar-predict: image files and folders -> each one's top classes, through the one scoring
path (``inference.Classifier``).

    cifar-predict cat.jpg photos/                  # the bundled default model
    cifar-predict model.pt2 cat.jpg --json
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from cifar_lightning import bundled
from cifar_lightning.devices import device_for
from cifar_lightning.errors import ConfigError, ImageError, printable
from cifar_lightning.images import IMAGE_SUFFIXES, is_image_file, load_image
from cifar_lightning.inference import Classifier, load_classifier
from cifar_lightning.modelfile import looks_like_model


def split_model_argument(args: list[str]) -> tuple[str | None, list[str]]:
    """(model, image paths): the first argument is the model when it names one
    (``modelfile.looks_like_model``), or when it is a file that is no image followed by more
    paths (then refused as a model of an unknown kind); else every argument is an image."""
    first = Path(args[0])
    if not args[0].strip():
        raise ConfigError("an empty model or path argument; give a model file or pretrained:NAME, then image files or folders")
    named = looks_like_model(args[0])
    if len(args) > 1 and (named or (first.is_file() and first.suffix.lower() not in IMAGE_SUFFIXES)):
        return args[0], args[1:]
    if named:
        raise ConfigError(f"{args[0]}: a model but no image to classify; give image files or folders after it")
    return None, args


def predict_files(clf: Classifier, files: Sequence[Path], top_k: int = 3, batch_size: int = 256) -> list[dict[str, Any]]:
    """One result per file, in order: {"path", "top_k": [{"class", "probability"}...]}, or
    {"path", "error"} for a file that is not a usable image (the others are still predicted)."""
    results: list[dict[str, Any]] = []
    good, images = [], []
    for f in files:
        try:
            images.append(torch.from_numpy(load_image(f)).permute(2, 0, 1))
            good.append(len(results))
            results.append({"path": printable(f)})
        except ImageError as e:
            results.append({"path": printable(f), "error": str(e)})
    if images:
        probs = clf.probabilities(torch.stack(images), batch_size)
        for i, top in zip(good, clf.top_k(probs, top_k), strict=True):
            results[i]["top_k"] = top
    return results


def expand_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given; folders searched recursively for image files (sorted). An empty argument
    is refused: it would name the current folder."""
    out: list[Path] = []
    for p in paths:
        if not str(p).strip():
            raise ConfigError("an empty path; give image files or folders")
        p = Path(p)
        out.extend(sorted(f for f in p.rglob("*") if is_image_file(f)) if p.is_dir() else [p])
    return out


def predict_command(model: str | Path | None, paths: Sequence[str | Path], top_k: int = 3, as_json: bool = False, batch_size: int = 256,
                    accelerator: str = "cpu", calibrate: bool = True) -> int:  # fmt: skip
    """Print each file's top classes (or one JSON list). Returns the exit status: 0 when every
    input was predicted, 1 when some were not images (the others still are). Without a model,
    the bundled default; the first line (stderr with --json) says which."""
    spec = model if model is not None else bundled.PREFIX + bundled.default_name()
    files = expand_inputs(paths)
    clf = load_classifier(spec, device=device_for(accelerator), calibrate=calibrate)
    if not files:
        raise ConfigError("no image files found in the given paths")
    results = predict_files(clf, files, top_k, batch_size)
    print(f"model: {printable(bundled.describe(spec))}", file=sys.stderr if as_json else sys.stdout)
    if as_json:
        print(json.dumps(results, indent=2, allow_nan=False))
    for r in results if not as_json else []:
        if "error" in r:
            print(f"error: {r['error']}", file=sys.stderr)
            continue
        print(r["path"] + "".join(f"\n  {t['class']:<12} {t['probability']:.4f}" for t in r["top_k"]))
    return 0 if all("top_k" in r for r in results) else 1
