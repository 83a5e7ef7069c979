"""Corrupted copies of a test set, built in memory: how a model holds up on images that went
through what ordinary photos go through. ``cifar-evaluate --corruptions`` scores a model on each.

Every function takes and returns uint8 (N, 3, H, W) tensors; only the noise is random, and it
draws from a generator seeded by the caller, so the same seed gives the same images.

    jpeg            Pillow's baseline JPEG at the given quality, standard 4:2:0 chroma subsampling
    gaussian_noise  additive noise of the given sigma ([0, 1] pixel units), rounded and clipped
    gaussian_blur   torchvision's Gaussian blur of the given sigma (px)
    brightness      torchvision's brightness: pixels times the factor, clipped
    contrast        torchvision's contrast: blend towards the image's mean grey by the factor
    pixelate        area-downscale to the given side, nearest-neighbour upscale back
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.v2.functional import adjust_brightness, adjust_contrast
from torchvision.transforms.v2.functional import gaussian_blur as blur

#: name -> the parameter of each severity, mildest first (JPEG: four qualities).
SEVERITIES: dict[str, tuple[float, ...]] = {
    "jpeg": (90, 75, 50, 30),
    "gaussian_noise": (0.03, 0.06, 0.10),
    "gaussian_blur": (0.6, 0.9, 1.2),
    "brightness": (1.25, 1.5, 1.75),
    "contrast": (0.6, 0.4, 0.25),
    "pixelate": (24, 20, 16),
}
CORRUPTIONS = tuple(SEVERITIES)


def jpeg(images: torch.Tensor, quality: float, subsampling: str = "4:2:0") -> torch.Tensor:
    out = np.empty_like(images.numpy())
    for i, im in enumerate(images.permute(0, 2, 3, 1).numpy()):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=int(quality), subsampling=subsampling)
        buf.seek(0)
        with Image.open(buf) as decoded:
            out[i] = np.asarray(decoded.convert("RGB")).transpose(2, 0, 1)
    return torch.from_numpy(out)


def gaussian_noise(images: torch.Tensor, sigma: float, generator: torch.Generator) -> torch.Tensor:
    x = images.float() / 255
    noise = torch.randn(x.shape, generator=generator) * sigma
    return ((x + noise).clamp_(0, 1) * 255).round_().to(torch.uint8)


def gaussian_blur(images: torch.Tensor, sigma: float) -> torch.Tensor:

    return blur(images, [2 * math.ceil(3 * sigma) + 1] * 2, [float(sigma)] * 2)


def brightness(images: torch.Tensor, factor: float) -> torch.Tensor:

    return adjust_brightness(images, float(factor))


def contrast(images: torch.Tensor, factor: float) -> torch.Tensor:

    return adjust_contrast(images, float(factor))


def pixelate(images: torch.Tensor, side: float) -> torch.Tensor:
    h, w = images.shape[-2:]
    small = torch.nn.functional.interpolate(images.float(), size=(int(side), int(side)), mode="area")
    big = torch.nn.functional.interpolate(small, size=(h, w), mode="nearest")
    return big.round_().clamp_(0, 255).to(torch.uint8)


def corrupt(images: torch.Tensor, name: str, severity: int, seed: int = 0) -> torch.Tensor:
    """The images under corruption ``name`` at ``severity`` (1 = mildest)."""
    if name not in SEVERITIES:
        raise ValueError(f"unknown corruption {name!r}; choose from {', '.join(CORRUPTIONS)}")
    levels = SEVERITIES[name]
    if not 1 <= severity <= len(levels):
        raise ValueError(f"{name}: severity must be 1-{len(levels)}, got {severity}")
    value = levels[severity - 1]
    images = images.contiguous().cpu()
    if name == "gaussian_noise":
        # One stream per severity, so adding a corruption never changes another's images.
        return gaussian_noise(images, value, torch.Generator().manual_seed(seed * 1000 + severity))
    fn: Callable[[torch.Tensor, float], torch.Tensor] = globals()[name]
    return fn(images, value)


def severity_label(name: str, severity: int) -> str:
    """What a severity means, for tables: 'q75', 'sigma 0.06', 'x1.5', '16 px'..."""
    v = SEVERITIES[name][severity - 1]
    return {
        "jpeg": f"q{int(v)}", "gaussian_noise": f"sigma {v:g}", "gaussian_blur": f"sigma {v:g} px",
        "brightness": f"x{v:g}", "contrast": f"x{v:g}", "pixelate": f"{int(v)} px",
    }[name]  # fmt: skip


def all_levels() -> list[tuple[str, int]]:
    return [(name, s) for name in CORRUPTIONS for s in range(1, len(SEVERITIES[name]) + 1)]
