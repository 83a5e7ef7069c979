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
import itertools
import os
import pickle
import re
import shutil
from collections.abc import Callable, Iterable
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
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would make it: some writers use 0600 temp files
        os.replace(tmp, path)
        return result
    finally:
        tmp.unlink(missing_ok=True)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write(path, lambda p: p.write_text(text))


def atomic_dir(path: str | Path, write: Callable[[Path], T], replace: bool = False) -> T:
    """write(tmp_dir) fills a hidden temporary folder, which then becomes ``path``. An empty
    ``path`` (e.g. one claimed with ``claim_free_dir``) is taken over; a non-empty one is
    replaced only when ``replace`` is set, and only once the new one is whole."""
    path = Path(path)
    tmp = temp_sibling(path)
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        result = write(tmp)
        if path.is_dir() and not any(path.iterdir()):
            path.rmdir()
        elif replace and path.exists():
            shutil.rmtree(path)
        os.rename(tmp, path)  # fails (FileExistsError/OSError) if someone else took path meanwhile
        return result
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def claim_free_dir(base: Path) -> Path:
    """Create and return base, or base_2, base_3...: the first free one (see ``claim_first``)."""
    base.parent.mkdir(parents=True, exist_ok=True)
    return claim_first(base if n == 1 else base.with_name(f"{base.name}_{n}") for n in itertools.count(1))


def claim_first(candidates: Iterable[Path]) -> Path:
    """Create the first candidate folder that does not exist yet and return it. mkdir is atomic,
    so two processes started at once never pick (and then replace) the same folder."""
    for candidate in candidates:
        try:
            candidate.mkdir()
            return candidate
        except FileExistsError:
            continue
    raise RuntimeError("no candidate folder was free")  # the candidates given here never end


def refuse_overlap(out: Path, inputs: dict[str, Path | None], inside: dict[str, Path | None] | None = None) -> None:
    """An output may not be, or contain, any of ``inputs`` (a user's checkpoint, run or data),
    nor lie inside any of ``inside`` (e.g. the data dir, where report PNGs would become training
    images): refused whatever --overwrite says."""
    target = Path(os.path.abspath(out))
    for what, path in inputs.items():
        if path is not None:
            p = Path(os.path.abspath(path))
            if target == p or target in p.parents:
                raise ConfigError(f"--out {out}: would overwrite the {what} {path}; choose another path")
    for what, path in (inside or {}).items():
        if path is not None and Path(os.path.abspath(path)) in target.parents:
            raise ConfigError(f"--out {out}: lies inside the {what} {path}; choose a path outside it")


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
    if not isinstance(ckpt["state_dict"], dict) or not isinstance(ckpt["hyper_parameters"], dict):
        raise CheckpointError(f"{path}: not a cifar-lightning ImageClassifier checkpoint (malformed state_dict / hyper_parameters)")
    bad = non_finite_tensor(ckpt["state_dict"])
    if bad:
        raise CheckpointError(f"{path}: refused: weight {bad} holds NaN or infinite values (a diverged run)")
    return ckpt


def network_spec_problem(model: Any, model_args: Any, class_names: Any, num_classes: Any = None) -> str | None:
    """What is wrong with a network description read from a file (checkpoint hyper-parameters
    or export metadata), or None. Such a file is input like any other: it must not reach the
    network's constructor with a string for a list or a zero for a scale."""
    import math

    if not isinstance(model, str):
        return f"'model' must be a network name, got {type(model).__name__}"
    if model_args is not None and not isinstance(model_args, dict):
        return "'model_args' must be a mapping"

    def positive(v: Any) -> bool:
        if isinstance(v, (list, tuple)):
            return 0 < len(v) <= 16 and all(positive(x) for x in v)
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0

    for key, value in (model_args or {}).items():
        if not positive(value):
            return f"'model_args.{key}' must be a positive finite number (or a short list of them), got {value!r}"
    n = num_classes if num_classes is not None else (model_args or {}).get("num_classes")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 100_000):
        return f"'num_classes' must be a positive integer, got {n!r}"
    if class_names is not None:
        if not isinstance(class_names, list) or not all(isinstance(c, str) for c in class_names):
            return "'class_names' must be a list of names"
        if n is not None and len(class_names) != n:
            return f"'class_names' names {len(class_names)} classes for a {n}-class network"
    return None


def non_finite_tensor(tensors: dict) -> str | None:
    """The name of the first floating-point tensor holding a NaN or infinity, else None."""
    import torch

    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return str(name)
    return None


def classifier_from_checkpoint(ckpt: dict, path: str | Path = "checkpoint") -> ImageClassifier:
    """Rebuild the network from the checkpoint's hyperparameters and load its weights."""
    from cifar_lightning import models
    from cifar_lightning.module import ImageClassifier

    hp = ckpt["hyper_parameters"]
    problem = network_spec_problem(hp.get("model"), hp.get("model_args"), hp.get("class_names"), hp.get("num_classes", 10))
    if problem:
        raise CheckpointError(f"{path}: unusable hyper-parameters: {problem}")
    name = hp["model"]
    if name not in models.MODELS:
        raise CheckpointError(f"{path}: a checkpoint of network {name!r}, which this version does not know ({', '.join(models.MODELS)})")
    try:
        module = ImageClassifier(**ckpt["hyper_parameters"])
        module.load_state_dict(ckpt["state_dict"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: weights do not fit the network it names ({state_dict_mismatch(e)})") from None
    from cifar_lightning.calibration import temperature_of

    temperature_of(ckpt.get("calibration"), path)  # a damaged entry is refused here, not at first use
    module.calibration = ckpt.get("calibration")
    return module


def state_dict_mismatch(e: BaseException) -> str:
    """The useful line of torch's load_state_dict error: which tensor, which shapes."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    detail = next((line for line in lines[1:] if "size mismatch" in line or "Missing key" in line or "Unexpected key" in line), "")
    return f"{lines[0]} {detail}".strip()[:400] if lines else type(e).__name__


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
    try:
        return claim_first(parent / name.format(n) for n in itertools.count(max(taken, default=-1) + 1))
    except OSError as e:
        raise ConfigError(f"{what} {parent}: cannot create a folder there ({e.strerror})") from None


def claim_new_run_dir(log_dir: Path) -> Path:
    """LOG_DIR/version_N with the next free N."""
    return claim_new_dir(log_dir, "version_{}", "--log-dir")
