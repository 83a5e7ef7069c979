"""What a model file is, in one place: one table of kinds (suffixes, first bytes, the devices
each runs on, its loader), ``kind_of`` and ``open_model``. Every command's model argument,
``load_classifier``, evaluate, export's check, serve, ``--init-from`` and calibration come here.

    from cifar_lightning.modelfile import open_model
    m = open_model("pretrained:photo")   # or a .ckpt, .safetensors, .onnx, .pt2 path
    m.kind.name, m.meta["tta"], m.network

Nothing here runs code from a file: checkpoints load weights-only, safetensors and ONNX hold no
code, and a .pt2 archive is read by ``torch.export.load`` only after ``pt2_problem`` has found
no pickled object and only allowlisted ATen operators in it (torch's loader itself unpickles
with ``weights_only=False`` and evaluates expressions). TorchScript archives hold code and are
refused. Imports torch, never Lightning.
"""

from __future__ import annotations

import io
import json
import math
import re
import warnings
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from cifar_lightning import bundled, models
from cifar_lightning.calibration import temperature_of, usable_temperature
from cifar_lightning.checkpoint import (
    load_checkpoint,
    network_from_checkpoint,
    network_spec_problem,
    non_finite_tensor,
    state_dict_mismatch,
    weights_problem,
)
from cifar_lightning.errors import ModelError, printable
from cifar_lightning.images import CLASSES, IMAGE_SIZE
from cifar_lightning.recipes import TTA_LEVELS
from cifar_lightning.runs import SIDECAR_FORMAT, sidecar_path

FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}  # safetensors' names of the floating-point dtypes
ALL_DEVICES = ("cpu", "cuda", "mps")


@dataclass(frozen=True)
class Kind:
    """One kind of model file. ``weights``: plain weights rebuilt into a registered network,
    whose test-time views the loader adds; otherwise a graph with its views inside."""

    name: str
    suffixes: tuple[str, ...]
    devices: tuple[str, ...]
    sidecar: str  # "required", "optional" or "none"
    weights: bool
    loader: Callable[[Path, dict], tuple[Any, dict]] = field(repr=False, compare=False)

    def device(self, wanted: str) -> str:
        """Where this kind runs when ``wanted`` is asked: there if it can, else the CPU."""
        return wanted if torch.device(wanted).type in self.devices else "cpu"


@dataclass
class OpenedModel:
    """A model file, opened: its kind, what it records (``meta``: model, class_names, mean, std,
    tta, temperature...), the weights of a weights kind and its network on ``device``
    (normalised floats -> logits; a graph kind's views and baked temperature inside)."""

    spec: str
    path: Path
    kind: Kind
    meta: dict[str, Any]
    network: Any
    device: str
    weights: dict[str, torch.Tensor] | None = None
    checkpoint: dict | None = None

    @property
    def class_names(self) -> list[str]:
        return list(self.meta.get("class_names") or CLASSES)

    @property
    def temperature(self) -> float:
        """The fitted temperature (1.0: never calibrated)."""
        return float(self.meta.get("temperature") or 1.0)

    @property
    def graph_temperature(self) -> float:
        """What the graph already divides by (1.0 for every weights kind)."""
        return self.temperature if self.meta.get("temperature_in_graph") else 1.0


# ----------------------------------------------------------------------------- sidecar


def read_sidecar(model_path: Path, required: bool) -> dict:
    side = sidecar_path(model_path)
    if not side.is_file():
        if required:
            raise ModelError(f"{model_path}: its metadata file {side.name} is missing (cifar-export writes both)")
        return {}
    try:
        meta = json.loads(side.read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise ModelError(f"{side}: unreadable export metadata ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise ModelError(f"{side}: not cifar-lightning export metadata")
    check_metadata(meta, side)
    return meta


def check_metadata(meta: dict, where: Path | str) -> None:
    """Export metadata is input like any other: wrong types or values give one ModelError."""
    problem = network_spec_problem(meta.get("model"), meta.get("model_args", {}), meta.get("class_names"))
    for key, positive in (("mean", False), ("std", True)):
        v = meta.get(key)
        numbers = isinstance(v, list) and len(v) == 3 and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v)
        if v is not None and not (numbers and all(math.isfinite(x) and (x > 0 or not positive) for x in v)):
            problem = problem or f"{key!r} must be three finite numbers{' > 0' if positive else ''}"
    if meta.get("tta", 0) not in TTA_LEVELS or isinstance(meta.get("tta", 0), bool):
        problem = problem or f"'tta' must be one of {TTA_LEVELS}"
    if meta.get("temperature") is not None and not usable_temperature(meta["temperature"]):
        problem = problem or "'temperature' must be a positive number or null"
    if not isinstance(meta.get("temperature_in_graph", False), bool):
        problem = problem or "'temperature_in_graph' must be true or false"
    args = meta.get("model_args")
    names, n = meta.get("class_names"), args.get("num_classes") if isinstance(args, dict) else None
    if isinstance(names, list) and isinstance(n, int) and n != len(names):
        problem = problem or f"the metadata names {len(names)} classes for a {n}-class network"
    if problem:
        raise ModelError(f"{where}: unusable export metadata: {problem}")


# ----------------------------------------------------------------------------- loaders


def _checkpoint(path: Path, ckpt: dict | None) -> tuple[Any, dict]:
    ckpt = load_checkpoint(path) if ckpt is None else ckpt
    net = network_from_checkpoint(ckpt, path)
    hp = ckpt["hyper_parameters"]
    meta = {"model": hp["model"], "model_args": {"num_classes": int(hp.get("num_classes", 10)), **(hp.get("model_args") or {})},
            "class_names": list(hp.get("class_names") or CLASSES), "tta": hp.get("tta", 0),
            "temperature": temperature_of(ckpt.get("calibration"), path) if ckpt.get("calibration") else None,
            "calibration": ckpt.get("calibration"), "checkpoint": ckpt}  # fmt: skip
    return net, meta


def network_from_safetensors(path: Path, meta: dict) -> torch.nn.Module:
    """The registered network the sidecar names, with the file's weights. The header (names,
    shapes, dtypes) is checked against the network first: nothing is allocated for a sidecar
    the weights do not back."""
    if meta.get("model") not in models.MODELS:
        raise ModelError(f"{path}: exported network {meta.get('model')!r} is not one this version knows")
    kwargs = meta.get("model_args", {}) or {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype() in FLOAT_DTYPES) for k in f.keys()}  # noqa: SIM118
        problem = weights_problem(meta["model"], kwargs, header)
        weights = None if problem else load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"{path}: not a readable safetensors file ({str(e)[:200]})") from None
    if problem:
        raise ModelError(f"{path}: weights do not fit network {meta['model']!r} ({problem})")
    bad = non_finite_tensor(weights)
    if bad:
        raise ModelError(f"{path}: refused: weight {bad} holds NaN or infinite values")
    try:
        net = models.build(meta["model"], **kwargs)
        net.load_state_dict(weights)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ModelError(f"{path}: weights do not fit network {meta['model']!r} ({state_dict_mismatch(e)})") from None
    return net.eval()


def _safetensors(path: Path, _: dict | None) -> tuple[Any, dict]:
    meta = read_sidecar(path, required=True)
    return network_from_safetensors(path, meta), meta


class OnnxNetwork:
    """An ONNX file behind the same call as a torch network: normalised floats -> logits."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort  # here, not at the top: only ONNX files need it (0.3 s to import)

        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise ModelError(f"{path}: not a readable ONNX model ({str(e).splitlines()[0][:200]})") from None
        inputs = self.session.get_inputs()
        shape = inputs[0].shape if len(inputs) == 1 else None
        if shape is None or len(shape) != 4 or list(shape[1:]) != [3, IMAGE_SIZE, IMAGE_SIZE]:
            raise ModelError(f"{path}: an ONNX model of another kind (expects input {shape}, not N x 3 x 32 x 32)")
        self.input_name, self.path = inputs[0].name, path
        # A graph exported for a fixed batch (often 1) is run in pieces of that size.
        self.fixed_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().cpu().contiguous()
        n = self.fixed_batch
        if n is None or len(x) == n:
            return self._run(x)
        outs = []
        for i in range(0, len(x), n):
            part = x[i : i + n]
            padded = torch.cat([part, part.new_zeros(n - len(part), *part.shape[1:])]) if len(part) < n else part
            outs.append(self._run(padded)[: len(part)])
        return torch.cat(outs)

    def _run(self, x: torch.Tensor) -> torch.Tensor:
        """One batch through the graph; a graph whose scores do not come one row per image is a
        model of another kind, whatever batch first revealed it."""
        try:
            out = self.session.run(None, {self.input_name: x.numpy()})[0]
        except Exception as e:  # onnxruntime's own error types
            why = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
            raise ModelError(f"{self.path}: the ONNX model does not run on a {len(x)} x 3 x 32 x 32 batch ({why})") from None
        if not isinstance(out, np.ndarray) or out.ndim != 2 or out.shape[0] != len(x) or not np.issubdtype(out.dtype, np.floating):
            shape = getattr(out, "shape", None)
            raise ModelError(f"{self.path}: an ONNX model of another kind (a batch of {len(x)} images gives outputs of shape {shape}, "
                             "not one row of class scores per image)")  # fmt: skip
        return torch.from_numpy(out)

    def eval(self) -> OnnxNetwork:
        return self


def _onnx(path: Path, _: dict | None) -> tuple[Any, dict]:
    return OnnxNetwork(path), read_sidecar(path, required=False)


# ----------------------------------------------------------------------------- pt2

#: the ATen operators the project's networks, views and temperature export to; a .pt2 graph
#: that calls anything else is not one this project wrote
PT2_OPERATORS = frozenset(f"torch.ops.aten.{op}" for op in (
    "conv2d.default", "batch_norm.default", "gelu.default", "relu.default", "relu_.default", "max_pool2d.default",
    "avg_pool2d.default", "adaptive_avg_pool2d.default", "linear.default", "flatten.using_ints", "flip.default",
    "pad.default", "slice.Tensor", "add.Tensor", "mul.Tensor", "div.Tensor", "sub.Tensor", "cat.default", "mean.dim",
    "dropout.default", "view.default", "reshape.default", "permute.default", "amax.default", "sum.dim_IntList",
    # --tta 2 (views where unsure): the confidence of the mirror views, and the pick
    "softmax.int", "lt.Scalar", "where.self", "unsqueeze.default", "to.dtype", "_assert_tensor_metadata.default",
))  # fmt: skip
_PT2_ENTRY = re.compile(r"[^/]+/(archive_format|archive_version|byteorder|\.data/version|\.data/serialization_id|"
                        r"models/model\.json|data/sample_inputs/model\.pt|data/weights/(weight_\d+|model_weights_config\.json)|"
                        r"data/constants/model_constants_config\.json)")  # fmt: skip
# sympy reads these with eval: only symbols (s0, or Symbol('s0', positive=True, integer=True)), integers, + - * ( )
_SYM_EXPR = re.compile(r"(?:Symbol\('s\d+', positive=True, integer=True\)|s\d+|\d+|[ +*()-])*")
_PYTREE_TYPES = {None, "builtins.tuple", "builtins.list", "builtins.dict"}


def pt2_problem(path: Path) -> str | None:
    """Why a .pt2 archive is not one this project's export writes, or None. Checked before
    ``torch.export.load`` sees it: an archive with any pickled object (weights, constants,
    custom objects; the sample inputs must load weights-only), guard code, an expression other
    than plain shape arithmetic, or an operator outside ``PT2_OPERATORS`` is refused."""
    try:
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            odd = [n for n in names if not _PT2_ENTRY.fullmatch(n)]
            if odd:
                return f"it holds {printable(odd[0])[:80]}, which an export of this project never writes"
            root = names[0].split("/")[0] if names else ""
            if f"{root}/models/model.json" not in names:
                return "it holds no exported program"
            program = json.loads(z.read(f"{root}/models/model.json"))
            weights = json.loads(z.read(f"{root}/data/weights/model_weights_config.json")).get("config", {})
            constants = json.loads(z.read(f"{root}/data/constants/model_constants_config.json")).get("config", {})
            sample = f"{root}/data/sample_inputs/model.pt"
            if sample in names:
                torch.load(io.BytesIO(z.read(sample)), weights_only=True)
    except (zipfile.BadZipFile, OSError, ValueError, KeyError, RecursionError, AttributeError, RuntimeError) as e:
        return f"not a readable .pt2 archive ({type(e).__name__})"
    except Exception as e:  # noqa: BLE001 - the weights-only unpickler's refusal of an object
        return f"its sample inputs are not plain tensors ({type(e).__name__})"
    if constants or any(not isinstance(m, dict) or m.get("use_pickle") is not False for m in weights.values()):
        return "it holds pickled objects, which could run code"
    return _pt2_program_problem(program)


def _pt2_program_problem(program: Any) -> str | None:
    if not isinstance(program, dict) or program.get("guards_code") not in ([], None):
        return "it carries guard code"
    nodes = ((program.get("graph_module") or {}).get("graph") or {}).get("nodes") or []
    for node in nodes:
        if node.get("target") not in PT2_OPERATORS:
            return f"its graph calls {str(node.get('target'))[:80]}, which this project's networks never do"
    stack: list[Any] = [program]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            if {"as_custom_obj", "as_graph", "as_operator"} & item.keys():
                return "its graph passes objects or sub-graphs, which this project's networks never do"
            if isinstance(item.get("expr_str"), str) and not _SYM_EXPR.fullmatch(item["expr_str"]):
                return f"it holds the expression {item['expr_str'][:60]!r}, not plain shape arithmetic"
            if "type" in item and "children_spec" in item and item["type"] not in _PYTREE_TYPES:
                return f"its inputs name the type {str(item['type'])[:60]}"
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str) and item.startswith("[") and '"children_spec"' in item:
            try:
                stack.append(json.loads(item))  # the call graph's tree specs are JSON in a string
            except ValueError:
                return "its call graph is unreadable"
    ranges = program.get("range_constraints") or {}
    if not all(isinstance(k, str) and _SYM_EXPR.fullmatch(k) for k in ranges):
        return "its shape constraints are not plain symbols"
    return None


def _pt2(path: Path, _: dict | None) -> tuple[Any, dict]:
    meta = read_sidecar(path, required=True)
    problem = pt2_problem(path)
    if problem:
        raise ModelError(f"{path}: refused: not a .pt2 written by cifar-export ({problem})")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.export.load(str(path))
        net = program.module()
    except Exception as e:  # torch's deserialiser raises many types for a damaged graph
        why = str(e).splitlines()[0][:160] if str(e) else ""
        raise ModelError(f"{path}: not a loadable torch.export program ({type(e).__name__}: {why})") from None
    return net, meta


def _torchscript(path: Path, _: dict | None) -> tuple[Any, dict]:
    raise ModelError(f"{path}: a TorchScript export (for C++ and mobile; loading one runs its code): "
                     "load it with torch.jit.load where you trust it, or export --format pt2, onnx or safetensors for Python")  # fmt: skip


KINDS: dict[str, Kind] = {k.name: k for k in (
    Kind("checkpoint", (".ckpt", ".pth"), ALL_DEVICES, "none", True, _checkpoint),
    Kind("safetensors", (".safetensors",), ALL_DEVICES, "required", True, _safetensors),
    Kind("onnx", (".onnx",), ("cpu",), "optional", False, _onnx),  # ONNX Runtime's CPU provider
    Kind("pt2", (".pt2",), ("cpu",), "required", False, _pt2),  # exported on the CPU, run where exported
    Kind("torchscript", (".pt", ".ts", ".torchscript"), ("cpu",), "optional", False, _torchscript),
)}  # fmt: skip
SUFFIXES = {s: kind for kind in KINDS.values() for s in kind.suffixes}


def _sniff(path: Path) -> str | None:
    """The kind by the file's first bytes (the suffix may be missing or wrong): a zip archive is
    a checkpoint, a .pt2 program or TorchScript by what it holds, an 8-byte length then '{' a
    safetensors file, a protobuf field 1 varint (ir_version) an ONNX model."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return None
    if head[:4] == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as z:
                names = z.namelist()
        except (zipfile.BadZipFile, OSError, ValueError):
            return "checkpoint"  # a damaged torch archive: the checkpoint reader says how
        if any(n.endswith("/archive_format") for n in names):
            return "pt2"
        if any("/code/" in n or n.endswith("/constants.pkl") for n in names):
            return "torchscript"
        return "checkpoint"
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 100_000_000:
        return "safetensors"
    if head[:1] == b"\x08":
        return "onnx"
    return None


def path_of(spec: str | Path) -> Path:
    """The file a model argument names, refused in one line when there is none."""
    if isinstance(spec, str) and not spec.strip():
        raise ModelError("an empty model argument; give a model file or pretrained:NAME")
    path = bundled.resolve(spec)
    if path.is_dir():
        raise ModelError(f"{printable(path)}: is a folder, not a model file")
    if not path.is_file():
        raise ModelError(f"{printable(path)}: no such model file")
    return path


def kind_of(spec: str | Path) -> Kind:
    """The kind of the model a spec names: by its first bytes, else by its suffix."""
    return _kind_of_file(path_of(spec))


def _kind_of_file(path: Path) -> Kind:
    name = _sniff(path)
    if name:
        return KINDS[name]
    if path.suffix.lower() in SUFFIXES:
        return SUFFIXES[path.suffix.lower()]
    known = ", ".join(s for k in KINDS.values() for s in k.suffixes[:1])
    raise ModelError(f"{printable(path)}: unknown model kind {path.suffix or '(no suffix)'!r}; expected {known} or pretrained:NAME")


def looks_like_model(arg: str) -> bool:
    """Whether a command-line argument names a model (not an image): pretrained:NAME, a model
    suffix, or a file whose first bytes are a model's."""
    path = Path(arg)
    return bundled.is_bundled(arg) or path.suffix.lower() in SUFFIXES or (path.is_file() and _sniff(path) is not None)


def open_model(spec: str | Path, device: str = "cpu", checkpoint: dict | None = None) -> OpenedModel:
    """A path or ``pretrained:NAME`` -> its kind, metadata, weights and network on ``device``
    (or on the CPU, for a kind that runs only there). ``checkpoint``: one already read from
    this path, so the file is read once."""
    path = path_of(spec)  # resolved (and a bundled file hash-checked) once
    kind = _kind_of_file(path)
    net, meta = kind.loader(path, checkpoint)
    ckpt = meta.pop("checkpoint", None)
    where = kind.device(device)
    weights = net.state_dict() if kind.weights else None
    if isinstance(net, torch.nn.Module):
        net = net.to(where).eval() if kind.weights else net.to(where)
    return OpenedModel(str(spec), path, kind, meta, net, where, weights, ckpt)
