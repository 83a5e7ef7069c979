"""Classify image files with a checkpoint, a safetensors export or an ONNX export.

Any common image becomes a 32x32 RGB uint8 image the same way, whatever the model file:
EXIF orientation applied; 16-bit scaled to 8-bit; palette, grayscale and CMYK converted to
RGB; transparency composited over white; the largest centred square cropped (CIFAR-10 images
are square, object-centred) and resized to 32x32 with Lanczos filtering.

    from cifar_lightning import load_classifier
    clf = load_classifier("seed.safetensors")
    classes, probs = clf.predict(["cat.jpg", "dog.png"])
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from cifar_lightning.data import CLASSES, IMAGE_SIZE, MEAN, STD

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
SIDECAR_FORMAT = "cifar-lightning-export"


def sidecar_path(model_path: Path) -> Path:
    """seed.onnx -> seed.onnx.json: one metadata file beside every exported model."""
    return model_path.with_name(model_path.name + ".json")


class ModelError(ValueError):
    """A model file that cannot be used: missing, corrupt, unsafe, or of another kind."""


class ImageError(ValueError):
    """One input that is not a usable image."""


# ----------------------------------------------------------------------------- images


def to_rgb32(image: Any) -> np.ndarray:
    """A PIL image -> (32, 32, 3) uint8 RGB, by the policy in the module docstring."""
    from PIL import Image, ImageOps

    im = ImageOps.exif_transpose(image)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit (or 32-bit int) grayscale
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / peak * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.clip(arr * (255 if arr.max() <= 1 else 1) + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode in ("RGB", "L") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    im = im.convert("RGB")
    im = ImageOps.fit(im, (IMAGE_SIZE, IMAGE_SIZE), method=Image.Resampling.LANCZOS)
    return np.array(im, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only arrays


def load_image(path: str | Path) -> np.ndarray:
    """An image file -> (32, 32, 3) uint8 RGB; ImageError naming the file otherwise."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    try:
        if path.is_dir():
            raise ImageError(f"{path}: is a directory")
        if path.stat().st_size == 0:
            raise ImageError(f"{path}: empty file")
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later
            return to_rgb32(im)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not an image PIL can read") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageError(f"{path}: unreadable image ({e})") from None


def as_uint8_batch(images: Sequence[Any] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """PIL images, paths or uint8 arrays (HWC, or a NHWC/NCHW batch) -> uint8 (N, 3, 32, 32)."""
    from PIL import Image

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
    """Rebuild the registered network named in the sidecar and load the safetensors weights."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from cifar_lightning import models

    if meta.get("model") not in models.MODELS:
        raise ModelError(f"{path}: exported network {meta.get('model')!r} is not one this version knows")
    try:
        weights = load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as e:
        raise ModelError(f"{path}: not a readable safetensors file ({e})") from None
    try:
        net = models.build(meta["model"], **meta.get("model_args", {}))
        net.load_state_dict(weights)
    except (RuntimeError, TypeError, ValueError) as e:
        raise ModelError(f"{path}: weights do not fit network {meta['model']!r} ({str(e).splitlines()[0]})") from None
    return net.eval()


class OnnxNetwork:
    """An ONNX file behind the same call as a torch network: normalised floats -> logits."""

    def __init__(self, path: Path) -> None:
        import onnxruntime as ort

        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own exception types for bad files
            raise ModelError(f"{path}: not a readable ONNX model ({str(e).splitlines()[0][:200]})") from None
        inputs = self.session.get_inputs()
        shape = inputs[0].shape if len(inputs) == 1 else None
        if shape is None or len(shape) != 4 or list(shape[1:]) != [3, IMAGE_SIZE, IMAGE_SIZE]:
            raise ModelError(f"{path}: an ONNX model of another kind (expects input {shape}, not N x 3 x 32 x 32)")
        self.input_name = inputs[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(self.session.run(None, {self.input_name: x.float().cpu().contiguous().numpy()})[0])

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
    except (OSError, ValueError) as e:
        raise ModelError(f"{side}: unreadable export metadata ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != SIDECAR_FORMAT:
        raise ModelError(f"{side}: not cifar-lightning export metadata")
    return meta


# ----------------------------------------------------------------------------- classifier


class Classifier:
    """A loaded model of any supported kind: ``predict`` takes images, returns classes and
    probabilities; ``top_k`` the k best (class, probability) pairs per image."""

    def __init__(self, network: Any, class_names: Sequence[str], mean: Sequence[float] = MEAN,
                 std: Sequence[float] = STD, device: str = "cpu", source: str = "") -> None:  # fmt: skip
        self.network = network
        self.class_names = list(class_names)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
        self.device = device
        self.source = source

    def probabilities(self, batch: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """uint8 (N, 3, 32, 32) -> softmax probabilities (N, C)."""
        out = []
        with torch.inference_mode():
            for i in range(0, len(batch), batch_size):
                x = (batch[i : i + batch_size].float() / 255 - self.mean) / self.std
                if isinstance(self.network, torch.nn.Module):
                    x = x.to(self.device)
                out.append(self.network(x).float().softmax(-1).cpu())
        return torch.cat(out) if out else torch.empty(0, len(self.class_names))

    def predict(self, images: Sequence[Any] | np.ndarray | torch.Tensor, batch_size: int = 256) -> tuple[list[str], torch.Tensor]:
        """Images (paths, PIL images, uint8 arrays) -> (predicted class names, probabilities (N, C))."""
        probs = self.probabilities(as_uint8_batch(images), batch_size)
        return [self.class_names[i] for i in probs.argmax(1).tolist()], probs

    def top_k(self, probs: torch.Tensor, k: int) -> list[list[dict[str, Any]]]:
        values, idx = probs.topk(min(k, probs.shape[1]), dim=1)
        return [[{"class": self.class_names[i], "probability": float(p)} for p, i in zip(vs, ix, strict=True)]
                for vs, ix in zip(values.tolist(), idx.tolist(), strict=True)]  # fmt: skip


def load_classifier(path: str | Path, device: str = "cpu") -> Classifier:
    """A Lightning .ckpt (loaded weights-only), a .safetensors export (with its .json sidecar) or
    an .onnx export; ModelError with one clear line for anything else."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such model file")
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        meta = read_sidecar(path, required=True)
        net = network_from_safetensors(path, meta).to(device)
        names = meta.get("class_names") or CLASSES
        return Classifier(net, names, meta.get("mean", MEAN), meta.get("std", STD), device, str(path))
    if suffix == ".onnx":
        meta = read_sidecar(path, required=False)
        net = OnnxNetwork(path)
        names = meta.get("class_names") or CLASSES
        try:
            out = net(torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE))
        except Exception as e:  # onnxruntime's own error types
            raise ModelError(f"{path}: the ONNX model does not run on a 1 x 3 x 32 x 32 batch ({str(e).splitlines()[0][:200]})") from None
        if tuple(out.shape) != (1, len(names)):
            raise ModelError(f"{path}: an ONNX model of another kind (gives {tuple(out.shape)} outputs, not 1 x {len(names)} class scores)")
        return Classifier(net, names, meta.get("mean", MEAN), meta.get("std", STD), "cpu", str(path))
    if suffix in (".ckpt", ".pt", ".pth"):
        from cifar_lightning.module import CheckpointError, classifier_from_checkpoint, load_checkpoint

        try:
            module = classifier_from_checkpoint(load_checkpoint(path), path)
        except CheckpointError as e:
            raise ModelError(str(e)) from None
        names = module.hparams.class_names or CLASSES
        return Classifier(module.net.eval().to(device), names, MEAN, STD, device, str(path))
    raise ModelError(f"{path}: unknown model kind {suffix or '(no suffix)'!r}; expected .ckpt, .safetensors or .onnx")


def expand_inputs(paths: Sequence[str | Path]) -> list[Path]:
    """Files as given; folders searched recursively for image files (sorted)."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out.extend(sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES))
        else:
            out.append(p)
    return out
