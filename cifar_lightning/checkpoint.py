"""Checkpoints and files: safe loading, and the one way this project writes a file or folder.

Every file the project writes (checkpoints, exports and their metadata, the decoded-image
cache, reports, run records) goes through ``atomic_write`` or ``atomic_dir``: the bytes go to a
hidden temporary sibling first and only a complete, checked result replaces the target with
``os.replace`` (atomic on POSIX and Windows). A kill, a full disk or a failed check never leaves
a half-written file, nor destroys the one that was there.

Loading a checkpoint never unpickles arbitrary objects (``torch.load(weights_only=True)``).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from cifar_lightning.errors import CheckpointError, ConfigError

if TYPE_CHECKING:
    from cifar_lightning.module import ImageClassifier

T = TypeVar("T")
SIDECAR_FORMAT = "cifar-lightning-export"


def sidecar_path(model_path: Path) -> Path:
    """model.onnx -> model.onnx.json: one metadata file beside every exported model."""
    return model_path.with_name(model_path.name + ".json")


def temp_sibling(path: Path) -> Path:
    """A hidden name beside ``path`` (same folder, so the final rename never crosses file
    systems); its suffix is kept because some writers choose the format from it."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}{path.suffix}")


def is_temp_sibling(path: Path) -> bool:
    """A file ``temp_sibling`` made, e.g. left behind by a run killed mid-write."""
    return path.name.startswith(".") and ".tmp-" in path.name


def atomic_write(
    path: str | Path, write: Callable[[Path], None], check: Callable[[Path], T] | None = None, fsync: bool = False
) -> T | None:
    """write(tmp); result = check(tmp); then tmp replaces ``path``. Returns check's result.

    ``fsync`` flushes the bytes to disk before the rename (for checkpoints: the file a resumed
    run needs must survive a power cut, not just a kill)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(path)
    try:
        write(tmp)
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        result = check(tmp) if check else None
        os.replace(tmp, path)
        return result
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def atomic_dir(path: str | Path, write: Callable[[Path], T], replace: bool = False) -> T:
    """write(tmp_dir) fills a hidden temporary folder, which then becomes ``path``. An existing
    ``path`` is replaced only when ``replace`` is set, and only once the new one is whole."""
    path = Path(path)
    tmp = temp_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        result = write(tmp)
        if replace and path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)  # fails (FileExistsError/OSError) if someone else took path meanwhile
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def sha256_of(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Read a Lightning checkpoint of this project without unpickling arbitrary objects.

    ``weights_only=True`` refuses any pickle that would build an object other than tensors and
    plain containers, so a malicious file fails here instead of running code; ``map_location``
    lets a checkpoint saved on a GPU load on a CPU-only machine.
    """
    import torch

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
        if found:
            raise CheckpointError(
                f"{path}: refused to load: it asks to import {found.group(1)}, which could run code; "
                "only plain-weights checkpoints are loaded"
            ) from None
        detail = re.search(r"WeightsUnpickler error: \s*([^\n]+)", text)
        reason = detail.group(1).strip() if detail else _first_line(e)
        raise CheckpointError(f"{path}: not a readable checkpoint (weights-only unpickler: {reason})") from None
    except Exception as e:  # truncated zip, random bytes, empty file, permission...
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "model" not in (ckpt.get("hyper_parameters") or {}):
        raise CheckpointError(f"{path}: not a cifar-lightning ImageClassifier checkpoint (no state_dict / model name)")
    return ckpt


def classifier_from_checkpoint(ckpt: dict, path: str | Path = "checkpoint") -> ImageClassifier:
    """Rebuild the network from the checkpoint's hyperparameters and load its weights."""
    from cifar_lightning import models
    from cifar_lightning.module import ImageClassifier

    name = ckpt["hyper_parameters"]["model"]
    if not isinstance(name, str) or name not in models.MODELS:
        raise CheckpointError(f"{path}: a checkpoint of network {name!r}, which this version does not know ({', '.join(models.MODELS)})")
    try:
        module = ImageClassifier(**ckpt["hyper_parameters"])
        module.load_state_dict(ckpt["state_dict"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: weights do not fit the network it names ({str(e).splitlines()[0]})") from None
    return module


def run_dir_of(ckpt_path: Path) -> Path | None:
    """LOG_DIR/version_N for a checkpoint in LOG_DIR/version_N/checkpoints/ (with its
    config.yaml), else None."""
    run = ckpt_path.parent.parent
    if ckpt_path.parent.name == "checkpoints" and (run / "config.yaml").is_file():
        return run
    return None


# ----------------------------------------------------------------------------- run directories


def version_of(run_dir: Path) -> int | None:
    m = re.fullmatch(r"version_(\d+)", run_dir.name)
    return int(m.group(1)) if m else None


def find_last_checkpoint(log_dir: Path) -> Path:
    """The newest run's last.ckpt under log_dir (for --resume last)."""
    runs = sorted((v, p) for p in (log_dir.iterdir() if log_dir.is_dir() else []) if (v := version_of(p)) is not None)
    for _, run in reversed(runs):
        if (run / "checkpoints" / "last.ckpt").is_file():
            return run / "checkpoints" / "last.ckpt"
    raise CheckpointError(f"--resume last: no run with checkpoints/last.ckpt under {log_dir}")


def claim_new_dir(parent: Path, name: str, what: str) -> Path:
    """Create parent/<name> with the first free N in ``name.format(N)``; mkdir is atomic, so two
    processes started at once never share (and overwrite) a folder."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        pattern = re.compile(re.escape(name).replace(r"\{\}", r"(\d+)"))
        taken = [int(m.group(1)) for p in parent.iterdir() if (m := pattern.fullmatch(p.name))]
    except OSError as e:
        raise ConfigError(f"{what} {parent}: cannot create or read it ({e.strerror})") from None
    n = max(taken, default=-1) + 1
    while True:
        candidate = parent / name.format(n)
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            n += 1
        except OSError as e:
            raise ConfigError(f"{what} {parent}: cannot create a folder there ({e.strerror})") from None


def claim_new_run_dir(log_dir: Path) -> Path:
    """LOG_DIR/version_N with the next free N."""
    return claim_new_dir(log_dir, "version_{}", "--log-dir")
