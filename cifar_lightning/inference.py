"""The one scoring path: a model file (``modelfile.open_model``) -> class probabilities, with
the model's test-time views, then its temperature. Training's own test, ``cifar-evaluate``,
``cifar-predict``, ``cifar-serve`` and ``load_classifier`` all go through ``Classifier``, so a
checkpoint and its exports classify the same images the same way and score the same accuracy
(``Classifier.score``), to the image.

Images are decoded by the one policy of ``images.to_rgb32``. The temperature is applied here,
once, to the network's logits (``Classifier.to_probabilities``); only exported graphs carry it
inside. Imports torch (and onnxruntime for ONNX), never Lightning.

    from cifar_lightning import load_classifier
    clf = load_classifier("model.safetensors")
    classes, probs = clf.predict(["cat.jpg", "dog.png"])
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cifar_lightning import models
from cifar_lightning.calibration import accuracy, apply_temperature, ece
from cifar_lightning.devices import checked_device
from cifar_lightning.errors import ConfigError, ImageError, ModelError
from cifar_lightning.images import IMAGE_SIZE, MEAN, STD, load_image, normalize, to_rgb32
from cifar_lightning.modelfile import OpenedModel, open_model
from cifar_lightning.recipes import TTA_LEVELS

# ----------------------------------------------------------------------------- images


def as_uint8_batch(images: Sequence[Any] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """PIL images, paths or uint8 arrays (HWC, or a NHWC/NCHW batch) -> uint8 (N, 3, 32, 32)."""
    if isinstance(images, (np.ndarray, torch.Tensor)) and np.ndim(images) == 4:
        images = list(images)
    elif not isinstance(images, (list, tuple)):
        images = [images]
    if len(images) == 0:
        return torch.empty(0, 3, IMAGE_SIZE, IMAGE_SIZE, dtype=torch.uint8)
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
        # A network of this project runs channels-last, as training does; an exported graph as it was traced.
        self.channels_last = isinstance(network, torch.nn.Module) and not isinstance(network, torch.fx.GraphModule)
        if self.channels_last:
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
        _check_batch_size(batch_size)
        out = []
        with torch.inference_mode():
            for i in range(0, len(batch), batch_size):
                x = normalize(batch[i : i + batch_size], self.mean, self.std)
                if isinstance(self.network, torch.nn.Module):
                    x = x.to(self.device)
                    x = x.contiguous(memory_format=torch.channels_last) if self.channels_last else x
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

    def score(self, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> dict[str, Any]:
        """What a run's test and ``cifar-evaluate`` report for these images: accuracy, loss and
        ECE with the temperature, and ECE without it; ``probs`` (calibrated) and ``raw_probs``."""
        logits = self.logits(images, batch_size)
        probs, raw = self.to_probabilities(logits), self.to_probabilities(logits, calibrated=False)
        labels = labels.cpu()
        loss = float(F.cross_entropy(apply_temperature(logits, self.temperature / self.graph_temperature), labels))
        return {"accuracy": accuracy(probs, labels), "loss": loss, "ece": ece(probs, labels), "ece_uncalibrated": ece(raw, labels),
                "images": len(labels), "probs": probs, "raw_probs": raw}  # fmt: skip

    def predict(self, images: Sequence[Any] | np.ndarray | torch.Tensor, batch_size: int = 256) -> tuple[list[str], torch.Tensor]:
        """Images (paths, PIL images, uint8 arrays) -> (predicted class names, probabilities (N, C))."""
        probs = self.probabilities(as_uint8_batch(images), batch_size)
        return [self.class_names[i] for i in probs.argmax(1).tolist()], probs

    def top_k(self, probs: torch.Tensor, k: int) -> list[list[dict[str, Any]]]:
        values, idx = probs.topk(min(k, probs.shape[1]), dim=1)
        return [[{"class": self.class_names[i], "probability": float(p)} for p, i in zip(vs, ix, strict=True)]
                for vs, ix in zip(values.tolist(), idx.tolist(), strict=True)]  # fmt: skip




def _check_batch_size(batch_size: object) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {str(batch_size)[:40]}")


def load_classifier(spec: str | Path, device: str = "cpu", tta: int | None = None, calibrate: bool = True) -> Classifier:
    """The Classifier of a model file (``modelfile.KINDS``: a Lightning .ckpt, a .safetensors or
    .pt2 export with its .json sidecar, an .onnx export) or a bundled model (``pretrained:NAME``);
    ModelError with one clear line for anything else.

    ``tta`` overrides the test-time views of a weights file (a graph has its views built in).
    ``calibrate=False`` gives the raw probabilities instead of those with the fitted temperature."""
    return classifier_of(open_model(spec, checked_device(device)), tta, calibrate)


def checkpoint_classifier(ckpt: dict, path: str | Path, device: str = "cpu", tta: int | None = None,
                          calibrate: bool = True) -> Classifier:  # fmt: skip
    """The Classifier of a checkpoint already read (``checkpoint.load_checkpoint``), so the file
    is read once. Arguments as ``load_classifier``."""
    return classifier_of(open_model(path, checked_device(device), checkpoint=ckpt), tta, calibrate)


def classifier_of(model: OpenedModel, tta: int | None = None, calibrate: bool = True) -> Classifier:
    if tta is not None and (isinstance(tta, bool) or not isinstance(tta, int) or tta not in TTA_LEVELS):
        raise ConfigError(f"tta={str(tta)[:20]}: choose from {', '.join(map(str, TTA_LEVELS))}")
    meta, names = model.meta, model.class_names
    if model.kind.weights:
        level = meta.get("tta", 0) if tta is None else tta
        net = models.with_tta(model.network, level, model.temperature).to(model.device)
    else:
        level, net = meta.get("tta", 0), model.network
        out = net(torch.zeros(2, 3, IMAGE_SIZE, IMAGE_SIZE))[:1]  # two images: the scores must follow the batch
        if tuple(out.shape) != (1, len(names)):
            raise ModelError(f"{model.path}: a {model.kind.name} model of another kind (gives {tuple(out.shape)} outputs, "
                             f"not 1 x {len(names)} class scores)")  # fmt: skip
        if not bool(torch.isfinite(out).all()):
            raise ModelError(f"{model.path}: refused: the {model.kind.name} model gives NaN or infinite scores (non-finite weights)")
    info = {**meta, "model": meta.get("model"), "tta": level, "class_names": names, "kind": model.kind.name,
            "name": model.spec}  # fmt: skip
    t = model.temperature if calibrate else 1.0
    return Classifier(net, names, meta.get("mean") or MEAN, meta.get("std") or STD, model.device, str(model.path), level, info,
                      t, graph_temperature=model.graph_temperature)  # fmt: skip
