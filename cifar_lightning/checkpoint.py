"""A checkpoint of this project, read safely: weights-only loading, the checks on what it
describes, and its network rebuilt from it alone (no Lightning: predicting from a .ckpt needs
only torch).

Loading a checkpoint never unpickles arbitrary objects (``torch.load(weights_only=True)``).
Its hyper-parameters are input like any other: checked before they size anything.
"""

from __future__ import annotations

import io
import math
import pickle
import re
from pathlib import Path
from typing import Any

import torch

from cifar_lightning import models
from cifar_lightning.calibration import temperature_of
from cifar_lightning.errors import CheckpointError, shown
from cifar_lightning.recipes import TTA_LEVELS


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict:
    """Read a Lightning checkpoint of this project without unpickling arbitrary objects.

    ``weights_only=True`` refuses any pickle that would build an object other than tensors and
    plain containers, so a malicious file fails here instead of running code; ``map_location``
    lets a checkpoint saved on a GPU load on a CPU-only machine.
    """
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


def checkpoint_bytes(ckpt: dict) -> memoryview:
    """A checkpoint serialised in memory, for ``fileio.atomic_write_bytes``: torch's own file
    writer turns a full disk into a RuntimeError from its C++ core and leaves a partial file."""
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    return buf.getbuffer()


def network_spec_problem(model: Any, model_args: Any, class_names: Any, num_classes: Any = None) -> str | None:
    """What is wrong with a network description read from a file (checkpoint hyper-parameters
    or export metadata), or None. Such a file is input like any other: it must not reach the
    network's constructor with a string for a list or a zero for a scale."""
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
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            return str(name)
    return None


def weights_problem(model: str, kwargs: dict, tensors: dict[str, tuple[tuple[int, ...], bool]]) -> str | None:
    """Why the weights in a file (name -> (shape, is floating point)) do not fit the network its
    description names, or None. The network is built on the meta device, which allocates
    nothing: hyper-parameters read from a file (widths 3000,3000,3000) must never size an
    allocation that the file's own tensors do not back. Integer or bool tensors where the
    network holds floats are refused too: loaded, they would be cast into garbage weights."""
    try:
        with torch.device("meta"):
            skeleton = models.build(model, **kwargs)
    except (TypeError, ValueError, RuntimeError) as e:
        return f"cannot build {model!r} from its arguments ({_first_line(e)[:200]})"
    expected = {k: (tuple(v.shape), v.is_floating_point()) for k, v in skeleton.state_dict().items()}
    missing, unexpected = [k for k in expected if k not in tensors], [k for k in tensors if k not in expected]
    if missing:
        return f"missing {', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}"
    if unexpected:
        return f"unexpected {', '.join(shown(k, 40) for k in unexpected[:3])}{', ...' if len(unexpected) > 3 else ''}"
    for name, (shape, floating) in expected.items():
        got_shape, got_floating = tensors[name]
        if tuple(got_shape) != shape:
            return f"size mismatch for {name}: the file holds {list(got_shape)}, the network needs {list(shape)}"
        if got_floating != floating:
            kind = {True: "floating-point", False: "integer or bool"}
            return f"{name}: the file holds {kind[got_floating]} values where the network needs {kind[floating]} ones"
    return None


def _state_tensors(state: dict) -> dict[str, tuple[tuple[int, ...], bool]] | None:
    """The network's tensors of a checkpoint's state_dict by name (without 'net.'), or None
    when it holds something that is not a tensor of the network."""
    out = {}
    for k, v in state.items():
        if not isinstance(k, str) or not k.startswith("net.") or not isinstance(v, torch.Tensor):
            return None
        out[k[4:]] = (tuple(v.shape), v.is_floating_point())
    return out


def state_dict_mismatch(e: BaseException) -> str:
    """The useful line of torch's load_state_dict error: which tensor, which shapes."""
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    detail = next((line for line in lines[1:] if "size mismatch" in line or "Missing key" in line or "Unexpected key" in line), "")
    return f"{lines[0]} {detail}".strip()[:400] if lines else type(e).__name__


def check_spec(ckpt: dict, path: str | Path = "checkpoint") -> dict:
    """The checkpoint's hyper-parameters, once they describe a network this version can build
    and a usable temperature; CheckpointError naming the problem otherwise."""
    hp = ckpt["hyper_parameters"]
    problem = network_spec_problem(hp.get("model"), hp.get("model_args"), hp.get("class_names"), hp.get("num_classes", 10))
    tta = hp.get("tta", 0)
    if isinstance(tta, bool) or tta not in TTA_LEVELS:
        problem = problem or f"'tta' must be one of {TTA_LEVELS}, got {str(tta)[:40]}"
    if problem:
        raise CheckpointError(f"{path}: unusable hyper-parameters: {problem}")
    if hp["model"] not in models.MODELS:
        known = ", ".join(models.MODELS)
        raise CheckpointError(f"{path}: a checkpoint of network {hp['model']!r}, which this version does not know ({known})")
    temperature_of(ckpt.get("calibration"), path)  # a damaged entry is refused here, not at first use
    tensors = _state_tensors(ckpt["state_dict"])
    kwargs = {"num_classes": hp.get("num_classes", 10), **(hp.get("model_args") or {})}
    mismatch = "it holds entries that are not the network's tensors" if tensors is None else weights_problem(hp["model"], kwargs, tensors)
    if mismatch:
        raise CheckpointError(f"{path}: weights do not fit the network it names ({mismatch})")
    return hp


def network_from_checkpoint(ckpt: dict, path: str | Path = "checkpoint") -> torch.nn.Module:
    """The checkpoint's network with its weights, in eval mode: built from its hyper-parameters
    alone (``models.build(model, num_classes, **model_args)``), as ``ImageClassifier`` builds it."""
    hp = check_spec(ckpt, path)
    state = ckpt["state_dict"]
    try:
        net = models.build(hp["model"], num_classes=hp.get("num_classes", 10), **(hp.get("model_args") or {}))
        foreign = [k for k in state if not str(k).startswith("net.")]
        if foreign:
            raise RuntimeError(f"Error(s) in loading state_dict:\n\tUnexpected key(s) in state_dict: {', '.join(map(str, foreign[:5]))}")
        net.load_state_dict({k[4:]: v for k, v in state.items()})
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: weights do not fit the network it names ({state_dict_mismatch(e)})") from None
    return net.eval()
