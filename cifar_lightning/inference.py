"""The one inference path: a model file (checkpoint, safetensors or ONNX export) -> class
probabilities, with the model's test-time augmentation. ``cifar-evaluate``, ``cifar-predict``
and ``load_classifier`` all go through ``Classifier.probabilities``, so a checkpoint and its
exports classify the same images the same way and score the same accuracy.

Images are decoded by the one policy of ``images.to_rgb32``. The temperature is applied here,
once, to the network's logits (``Classifier.to_probabilities``); only exported graphs carry it
inside. Loading any model file imports torch (and onnxruntime for ONNX), never Lightning;
nothing here unpickles anything but plain weights.

    from cifar_lightning import load_classifier
    clf = load_classifier("model.safetensors")
    classes, probs = clf.predict(["cat.jpg", "dog.png"])
"""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from cifar_lightning import bundled, models
from cifar_lightning.calibration import apply_temperature, temperature_of, usable_temperature
from cifar_lightning.checkpoint import (
    load_checkpoint,
    network_from_checkpoint,
    network_spec_problem,
    non_finite_tensor,
    state_dict_mismatch,
    weights_problem,
)
from cifar_lightning.errors import CheckpointError, ConfigError, ImageError, ModelError, printable
from cifar_lightning.images import CLASSES, IMAGE_SIZE, MEAN, STD, is_image_file, load_image, normalize, to_rgb32
from cifar_lightning.recipes import TTA_LEVELS
from cifar_lightning.runs import SIDECAR_FORMAT, sidecar_path

MODEL_SUFFIXES = (".ckpt", ".safetensors", ".onnx")
FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}  # safetensors' names of the floating-point dtypes


# ----------------------------------------------------------------------------- images


def as_uint8_batch(images: Sequence[Any] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """PIL images, paths or uint8 arrays (HWC, or a NHWC/NCHW batch) -> uint8 (N, 3, 32, 32)."""
    if isinstance(images, (np.ndarray, torch.Tensor)) and np.ndim(images) == 4:
        images = list(images)
    elif not isinstance(images, (list, tuple)):
        images = [images]
    out = []
    for item in images:
        if isinstance(item, (str, Path)):
            out.append(load_image(item))
        elif isinstance(item, Image.Image):
            out.append(to_rgb32(item))
        else:
            arr = item.numpy() if isinstance(item, torch.Tensor) else np.asarray(item)
            if arr.dtype != np.uint8:
                raise ImageError(f"arrays must be uint8 images, got dtype {arr.dtype}")
            if arr.ndim == 3 and arr.shape[0] in (1, 3, 4) and arr.shape[-1] not in (1, 3, 4):
                arr = arr.transpose(1, 2, 0)  # CHW -> HWC
            if arr.ndim == 3 and arr.shape[-1] == 1:
                arr = arr[..., 0]
            if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[-1] not in (3, 4)):
                raise ImageError(f"arrays must be HxW, HxWx3 or HxWx4 uint8 images, got shape {arr.shape}")
            out.append(to_rgb32(Image.fromarray(arr)))
    return torch.from_numpy(np.stack(out)).permute(0, 3, 1, 2).contiguous()


# ----------------------------------------------------------------------------- networks


def network_from_safetensors(path: Path, meta: dict) -> torch.nn.Module:
    """Rebuild the registered network named in the sidecar and load the safetensors weights.
    The file's header (names, shapes, dtypes) is checked against the network first
    (``checkpoint.weights_problem``): nothing is allocated for a sidecar the weights do not back."""
    if meta.get("model") not in models.MODELS:
        raise ModelError(f"{path}: exported network {meta.get('model')!r} is not one this version knows")
    kwargs = meta.get("model_args", {}) or {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            header = {k: (tuple(f.get_slice(k).get_shape()), f.get_slice(k).get_dtype() in FLOAT_DTYPES) for k in f.keys()}  # noqa: SIM118
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"{path}: not a readable safetensors file ({str(e)[:200]})") from None
    problem = weights_problem(meta["model"], kwargs, header)
    if problem:
        raise ModelError(f"{path}: weights do not fit network {meta['model']!r} ({problem})")
    try:
        weights = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"{path}: not a readable safetensors file ({str(e)[:200]})") from None
    bad = non_finite_tensor(weights)
    if bad:
        raise ModelError(f"{path}: refused: weight {bad} holds NaN or infinite values")
    try:
        net = models.build(meta["model"], **kwargs)
        net.load_state_dict(weights)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ModelError(f"{path}: weights do not fit network {meta['model']!r} ({state_dict_mismatch(e)})") from None
    return net.eval()


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
    if problem:
        raise ModelError(f"{where}: unusable export metadata: {problem}")


# ----------------------------------------------------------------------------- classifier


class Classifier:
    """A loaded model of any supported kind. ``network`` maps normalised images to logits with
    the model's test-time augmentation already inside it (``tta`` says which views). The
    temperature is applied here, to those logits, and nowhere else: ``temperature`` is the T
    probabilities are calibrated with (1.0: raw; the model's fitted one is ``info["temperature"]``).
    ``graph_temperature`` is what an exported graph already divides by (an ONNX export with T
    built in; 1.0 for every other network)."""

    def __init__(self, network: Any, class_names: Sequence[str], mean: Sequence[float] = MEAN, std: Sequence[float] = STD,
                 device: str = "cpu", source: str = "", tta: int = 0, info: dict | None = None,
                 temperature: float = 1.0, graph_temperature: float = 1.0) -> None:  # fmt: skip
        if isinstance(network, torch.nn.Module):
            network = network.to(memory_format=torch.channels_last)  # as training runs: faster convolutions on CPU
        self.network = network
        self.class_names = list(class_names)
        self.mean, self.std = tuple(mean), tuple(std)
        self.device = device
        self.source = source
        self.tta = tta
        #: what the model file records: model name, its test accuracy, the source checkpoint...
        self.info = info or {}
        self.temperature = float(temperature)
        self.graph_temperature = float(graph_temperature)

    @property
    def calibrated(self) -> bool:
        return self.temperature != 1.0

    def logits(self, batch: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """uint8 (N, 3, 32, 32) -> the network's logits (N, C), in batches (no temperature
        applied here, beyond what an exported graph has inside)."""
        out = []
        with torch.inference_mode():
            for i in range(0, len(batch), batch_size):
                x = normalize(batch[i : i + batch_size], self.mean, self.std)
                if isinstance(self.network, torch.nn.Module):
                    x = x.to(self.device).contiguous(memory_format=torch.channels_last)
                out.append(self.network(x).float().cpu())
        return torch.cat(out) if out else torch.empty(0, len(self.class_names))

    def probabilities(self, batch: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """uint8 (N, 3, 32, 32) -> softmax probabilities (N, C); never NaN or infinite."""
        return self.to_probabilities(self.logits(batch, batch_size))

    def to_probabilities(self, logits: torch.Tensor, calibrated: bool = True) -> torch.Tensor:
        """Softmax of logits from ``logits``, with the temperature (``calibrated=False``: the raw
        probabilities, T = 1); a ModelError when the model gave NaN or infinity."""
        t = self.temperature if calibrated else 1.0
        probs = apply_temperature(logits, t / self.graph_temperature).softmax(-1)
        if not bool(torch.isfinite(probs).all()):
            raise ModelError(f"{self.source}: the model gives NaN or infinite scores on these images")
        return probs

    def predict(self, images: Sequence[Any] | np.ndarray | torch.Tensor, batch_size: int = 256) -> tuple[list[str], torch.Tensor]:
        """Images (paths, PIL images, uint8 arrays) -> (predicted class names, probabilities (N, C))."""
        probs = self.probabilities(as_uint8_batch(images), batch_size)
        return [self.class_names[i] for i in probs.argmax(1).tolist()], probs

    def top_k(self, probs: torch.Tensor, k: int) -> list[list[dict[str, Any]]]:
        values, idx = probs.topk(min(k, probs.shape[1]), dim=1)
        return [[{"class": self.class_names[i], "probability": float(p)} for p, i in zip(vs, ix, strict=True)]
                for vs, ix in zip(values.tolist(), idx.tolist(), strict=True)]  # fmt: skip


def load_classifier(path: str | Path, device: str = "cpu", tta: int | None = None, calibrate: bool = True) -> Classifier:
    """A Lightning .ckpt (loaded weights-only), a .safetensors export (with its .json sidecar) or
    an .onnx export; ModelError with one clear line for anything else.

    ``tta`` overrides the test-time augmentation of a checkpoint or safetensors export (an ONNX
    graph has its views built in). ``calibrate=False`` gives the raw, uncalibrated probabilities
    instead of those with the model's fitted temperature. ``pretrained:NAME`` loads a bundled
    model (``bundled.resolve``)."""
    path = bundled.resolve(path)
    if path.is_dir():
        raise ModelError(f"{path}: is a folder, not a model file")
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    suffix = sniff_model_kind(path) or path.suffix.lower()
    if suffix == ".safetensors":
        meta = read_sidecar(path, required=True)
        level = meta.get("tta", 0) if tta is None else tta
        t = float(meta.get("temperature") or 1.0) if calibrate else 1.0
        net = models.with_tta(network_from_safetensors(path, meta), level).to(device)
        names = _class_names(meta, path)
        return Classifier(net, names, meta.get("mean") or MEAN, meta.get("std") or STD, device, str(path), level, meta, t)
    if suffix == ".onnx":
        meta = read_sidecar(path, required=False)
        net = OnnxNetwork(path)
        names = _class_names(meta, path)
        out = net(torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE))[:1]  # two images: the scores must follow the batch
        if tuple(out.shape) != (1, len(names)):
            raise ModelError(f"{path}: an ONNX model of another kind (gives {tuple(out.shape)} outputs, not 1 x {len(names)} class scores)")
        if not bool(torch.isfinite(out).all()):
            raise ModelError(f"{path}: refused: the ONNX model gives NaN or infinite scores (non-finite weights)")
        fitted = float(meta.get("temperature") or 1.0)
        in_graph = fitted if meta.get("temperature_in_graph") else 1.0
        t = fitted if calibrate else 1.0
        return Classifier(net, names, meta.get("mean") or MEAN, meta.get("std") or STD, "cpu", str(path), meta.get("tta", 0), meta,
                          t, graph_temperature=in_graph)  # fmt: skip
    if suffix in (".ckpt", ".pt", ".pth"):
        try:
            return checkpoint_classifier(load_checkpoint(path), path, device, tta, calibrate)
        except CheckpointError as e:
            raise ModelError(str(e)) from None
    raise ModelError(f"{path}: unknown model kind {suffix or '(no suffix)'!r}; expected .ckpt, .safetensors or .onnx")


def checkpoint_classifier(ckpt: dict, path: str | Path, device: str = "cpu", tta: int | None = None,
                          calibrate: bool = True) -> Classifier:  # fmt: skip
    """The Classifier of a checkpoint already read (``checkpoint.load_checkpoint``): for a caller
    that also needs the checkpoint itself, so the file is read once. Arguments as ``load_classifier``."""
    network = network_from_checkpoint(ckpt, path)
    hp = ckpt["hyper_parameters"]
    level = hp.get("tta", 0) if tta is None else tta
    fitted = temperature_of(ckpt.get("calibration"), path)  # checked by network_from_checkpoint
    t = fitted if calibrate else 1.0
    net = models.with_tta(network, level).to(device)
    names = list(hp.get("class_names") or CLASSES)
    info = {"model": hp["model"], "tta": level, "class_names": names, "temperature": fitted if ckpt.get("calibration") else None}
    return Classifier(net, names, MEAN, STD, device, str(path), level, info, t)


def sniff_model_kind(path: Path) -> str | None:
    """The model kind by the file's first bytes (the suffix may be missing or wrong): a zip
    archive is a torch checkpoint, an 8-byte length then '{' a safetensors file, a protobuf
    field 1 varint (ir_version) an ONNX model. None when it is none of them."""
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError:
        return None
    if head[:4] == b"PK\x03\x04":
        return ".ckpt"
    if len(head) == 9 and head[8:9] == b"{" and 2 <= int.from_bytes(head[:8], "little") < 100_000_000:
        return ".safetensors"
    if head[:1] == b"\x08":
        return ".onnx"
    return None


def _class_names(meta: dict, path: Path) -> list[str]:
    names = meta.get("class_names") or list(CLASSES)
    n = (meta.get("model_args") or {}).get("num_classes")
    if isinstance(n, int) and n != len(names):
        raise ModelError(f"{path}: the metadata names {len(names)} classes for a {n}-class network")
    return list(names)


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
    """Files as given; folders searched recursively for image files (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if is_image_file(f)))
        else:
            out.append(p)
    return out


def device_for(accelerator: str) -> str:
    """The torch device for a Lightning-style accelerator name; an unavailable one is an error.
    The one such check: training, evaluation, prediction and serving all ask here."""
    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if accelerator in ("gpu", "cuda"):
        if not cuda:
            raise ConfigError(f"--accelerator {accelerator}: no CUDA GPU is available on this machine")
        return "cuda"
    if accelerator == "mps":
        if not mps:
            raise ConfigError("--accelerator mps: MPS is not available on this machine")
        return "mps"
    if accelerator == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    return "cpu"


def predict_command(model: str | Path | None, paths: Sequence[str | Path], top_k: int = 3, as_json: bool = False, batch_size: int = 256,
                    accelerator: str = "cpu", calibrate: bool = True) -> int:  # fmt: skip
    """cifar-predict: print each file's top classes (or one JSON list). Returns the exit status:
    0 when every input was predicted, 1 when some were not images (the others still are).
    Without a model, the bundled default; the first line (stderr with --json) says which."""
    spec = model if model is not None else bundled.PREFIX + bundled.default_name()
    clf = load_classifier(spec, device=device_for(accelerator), calibrate=calibrate)
    files = expand_inputs(paths)
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
