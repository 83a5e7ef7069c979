"""Batched, per-sample random augmentation that runs on whatever device the batch is on.

Each op draws its own random parameters for every image of the batch and applies them in one
tensor op (an affine grid, a gather, a mask), so augmentation never needs DataLoader workers.
Labels are never touched: every op here is label-preserving.

    seed      the Keras notebook's ImageDataGenerator ops: shift, flip, zoom, rotation, brightness
    standard  pad-and-crop (4 px, reflect) plus horizontal flip, the usual CIFAR-10 recipe
    none      identity
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cifar_lightning.recipes import AUGMENT_DEFAULTS, AUGMENTS


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0 if images.dtype == torch.uint8 else images


def random_flip(images: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    """Flip each image horizontally with probability p."""
    if p <= 0:
        return images
    mask = torch.rand(images.shape[0], device=images.device) < p
    return torch.where(mask.view(-1, 1, 1, 1), images.flip(-1), images)


def random_crop(images: torch.Tensor, padding: int = 4) -> torch.Tensor:
    """Reflect-pad by ``padding`` and cut a random same-size window per image (a shift of up
    to ``padding`` px without black borders). Works on uint8 too."""
    if padding <= 0:
        return images
    n, _, h, w = images.shape
    src = images if images.is_floating_point() else images.float()
    padded = F.pad(src, (padding,) * 4, mode="reflect").to(images.dtype)
    dy = torch.randint(0, 2 * padding + 1, (n,), device=images.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), device=images.device)
    rows = (dy.view(n, 1) + torch.arange(h, device=images.device)).view(n, 1, h, 1)
    cols = (dx.view(n, 1) + torch.arange(w, device=images.device)).view(n, 1, 1, w)
    batch = torch.arange(n, device=images.device).view(n, 1, 1, 1)
    channels = torch.arange(images.shape[1], device=images.device).view(1, -1, 1, 1)
    return padded[batch, channels, rows, cols]


def random_affine(
    images: torch.Tensor, shift: float = 0.0, zoom: float = 0.0, rotation: float = 0.0
) -> torch.Tensor:
    """Per-image random translation (fraction of the side), zoom and rotation (degrees), in one
    bilinear resampling; borders are filled by reflection."""
    x = to_unit_float(images)
    if shift <= 0 and zoom <= 0 and rotation <= 0:
        return x
    n = x.shape[0]

    def uniform(bound: float) -> torch.Tensor:
        return (torch.rand(n, device=x.device) * 2 - 1) * bound

    angle = uniform(math.radians(rotation))
    scale = 1 + uniform(zoom)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    # theta maps output coords to input coords in [-1, 1] units: a shift of `shift` of the
    # side is 2 * shift in those units.
    theta = torch.stack(
        [torch.stack([cos, -sin, uniform(2 * shift)], 1), torch.stack([sin, cos, uniform(2 * shift)], 1)], 1
    )
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="reflection", align_corners=False)


def random_brightness(images: torch.Tensor, amount: float = 0.0) -> torch.Tensor:
    """Multiply each image by a factor from [1 - amount, 1 + amount], clipped to [0, 1]."""
    x = to_unit_float(images)
    if amount <= 0:
        return x
    factor = 1 + (torch.rand(x.shape[0], 1, 1, 1, device=x.device) * 2 - 1) * amount
    return (x * factor).clamp_(0, 1)


class BatchAugment:
    """A named recipe with its ranges; call it on a uint8 batch, get uint8 or [0, 1] floats back."""

    def __init__(self, mode: str = "none", **options: float) -> None:
        if mode not in AUGMENTS:
            raise ValueError(f"unknown augmentation {mode!r}; choose from {', '.join(AUGMENTS)}")
        defaults = AUGMENT_DEFAULTS[mode]
        unknown = set(options) - set(defaults)
        if unknown:
            raise ValueError(f"--augment {mode} takes no option(s) {', '.join(sorted(unknown))}")
        self.mode = mode
        self.options = {**defaults, **{k: float(v) for k, v in options.items() if v is not None}}
        for k, v in self.options.items():
            if v < 0 or (k == "flip" and v > 1) or (k in ("shift", "zoom", "brightness") and v >= 1):
                raise ValueError(f"augmentation range {k}={v} is out of range")

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        o = self.options
        if self.mode == "seed":
            x = random_affine(images, o["shift"], o["zoom"], o["rotation"])
            x = random_flip(x, o["flip"])
            return random_brightness(x, o["brightness"])
        if self.mode == "standard":
            return random_flip(random_crop(images, int(o["crop_padding"])), o["flip"])
        return images

    def __repr__(self) -> str:
        return f"BatchAugment({self.mode!r}, {self.options})"
