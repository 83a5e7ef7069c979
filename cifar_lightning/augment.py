"""Batched, per-sample random augmentation that runs on whatever device the batch is on.

Each op draws its own random parameters for every image of the batch and applies them in one
tensor op (an affine grid, a gather, a mask), so augmentation never needs DataLoader workers.
Labels are never touched: every op here is label-preserving.

    seed      the Keras notebook's ImageDataGenerator ops: shift, flip, zoom, rotation, brightness
    standard  pad-and-crop (4 px, reflect) plus horizontal flip, the usual CIFAR-10 recipe;
              optionally cutout (a square of the mean colour, airbench96's)
    robust    standard, then what photos go through on their way to a model: blur, sensor
              noise and JPEG compression (real libjpeg, 4:2:0), each on a share of the images
    none      identity
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torchvision.io import decode_jpeg, encode_jpeg
from torchvision.transforms.v2.functional import gaussian_blur

from cifar_lightning.images import MEAN
from cifar_lightning.recipes import AUGMENT_DEFAULTS, AUGMENTS


def to_unit_float(images: torch.Tensor) -> torch.Tensor:
    return images.float() / 255.0 if images.dtype == torch.uint8 else images


def random_flip(images: torch.Tensor, p: float = 0.5) -> torch.Tensor:
    """Flip each image horizontally with probability p."""
    if p <= 0:
        return images
    mask = torch.rand(images.shape[0], device=images.device) < p
    return torch.where(mask.view(-1, 1, 1, 1), images.flip(-1), images)


def alternating_flip(images: torch.Tensor, index: torch.Tensor, base: torch.Tensor, epoch: int) -> torch.Tensor:
    """airbench's alternating flip: image i is mirrored in epoch e when ``base[i]`` xor (e odd).
    The first epoch mirrors a seeded random half; after it every image alternates, so any two
    consecutive epochs show both views of every image (random flips show a quarter of the
    images the same view twice). A function of (image, epoch) alone: resumable, and the same
    under DDP."""
    flip = (base[index.to(base.device)] ^ bool(epoch % 2)).to(images.device)
    return torch.where(flip.view(-1, 1, 1, 1), images.flip(-1), images)


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


def random_cutout(images: torch.Tensor, size: int) -> torch.Tensor:
    """Set a ``size`` x ``size`` square at a random place in each image (wholly inside it) to
    the training set's mean colour, which normalisation turns into 0 (airbench96's cutout)."""
    if size <= 0:
        return images
    n, _, h, w = images.shape
    size = min(size, h, w)
    top = torch.randint(0, h - size + 1, (n, 1, 1, 1), device=images.device)
    left = torch.randint(0, w - size + 1, (n, 1, 1, 1), device=images.device)
    rows = torch.arange(h, device=images.device).view(1, 1, h, 1) - top
    cols = torch.arange(w, device=images.device).view(1, 1, 1, w) - left
    inside = (rows >= 0) & (rows < size) & (cols >= 0) & (cols < size)
    fill = torch.tensor(MEAN, device=images.device).view(1, 3, 1, 1)
    fill = (fill * 255).round() if images.dtype == torch.uint8 else fill
    return torch.where(inside, fill.to(images.dtype), images)


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


#: qualities a JPEG-augmented image is re-encoded at (drawn uniformly per image)
JPEG_QUALITIES = tuple(range(30, 96, 5))
NOISE_SIGMA = 0.1  # max Gaussian noise sigma, [0, 1] pixel units
BLUR_SIGMAS = (0.4, 0.6, 0.8, 1.0, 1.2)  # px


def _chosen(n: int, p: float, device: torch.device) -> torch.Tensor:
    return (torch.rand(n, device=device) < p).nonzero().flatten() if p > 0 else torch.empty(0, dtype=torch.long)


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    return images if images.dtype == torch.uint8 else (images * 255).round_().clamp_(0, 255).to(torch.uint8)


def random_jpeg(images: torch.Tensor, p: float, qualities: tuple[int, ...] = JPEG_QUALITIES) -> torch.Tensor:
    """Re-encode a share p of the (uint8) images as baseline JPEG at a random quality each, with
    torchvision's libjpeg (the same bytes Pillow writes: 4:2:0 chroma). Runs on the CPU; a GPU
    batch makes a round trip for the chosen images only."""

    images = to_uint8(images)
    idx = _chosen(len(images), p, images.device)
    if len(idx) == 0:
        return images
    q = torch.randint(0, len(qualities), (len(idx),), device=images.device).cpu()
    idx_cpu, chosen = idx.cpu(), images[idx].cpu()
    out = images.clone()
    for k in q.unique().tolist():
        sel = (q == k).nonzero().flatten()
        decoded = decode_jpeg(encode_jpeg(list(chosen[sel]), quality=qualities[k]))
        out[idx_cpu[sel].to(images.device)] = torch.stack(decoded).to(images.device)
    return out


def random_noise(images: torch.Tensor, p: float, max_sigma: float = NOISE_SIGMA) -> torch.Tensor:
    """Add Gaussian noise (sigma uniform in [0, max_sigma], [0, 1] units) to a share p of the
    images; uint8 in, uint8 out (rounded, as a camera would store it)."""
    idx = _chosen(len(images), p, images.device)
    if len(idx) == 0:
        return images
    x = to_unit_float(images[idx])
    sigma = torch.rand(len(idx), 1, 1, 1, device=x.device) * max_sigma
    out = to_uint8(images).clone()
    out[idx] = to_uint8((x + sigma * torch.randn_like(x)).clamp_(0, 1))
    return out


def random_blur(images: torch.Tensor, p: float, sigmas: tuple[float, ...] = BLUR_SIGMAS) -> torch.Tensor:
    """Gaussian-blur a share p of the images, each with a sigma drawn from ``sigmas``
    (torchvision's blur, kernel 2 * ceil(3 sigma) + 1, reflect borders)."""

    idx = _chosen(len(images), p, images.device)
    if len(idx) == 0:
        return images
    s = torch.randint(0, len(sigmas), (len(idx),), device=images.device)
    out = to_uint8(images).clone()
    for k in s.unique().tolist():
        sel = idx[s == k]
        sigma = sigmas[k]
        out[sel] = gaussian_blur(out[sel], [2 * math.ceil(3 * sigma) + 1] * 2, [sigma, sigma])
    return out


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
            if v < 0 or (k in ("flip", "jpeg", "noise", "blur") and v > 1) or (k in ("shift", "zoom", "brightness") and v >= 1) \
                    or (k == "jpeg_quality_min" and not 5 <= v <= 95):
                raise ValueError(f"augmentation range {k}={v} is out of range")

    @property
    def active(self) -> bool:
        return self.mode != "none"

    def __call__(self, images: torch.Tensor, photo_ops: bool = True) -> torch.Tensor:
        """``photo_ops=False`` leaves out robust's JPEG, noise and blur (``--robust-from``: the
        early epochs learn from clean images)."""
        o = self.options
        if self.mode == "seed":
            x = random_affine(images, o["shift"], o["zoom"], o["rotation"])
            x = random_flip(x, o["flip"])
            return random_brightness(x, o["brightness"])
        if self.mode in ("standard", "robust"):
            images = random_flip(random_crop(images, int(o["crop_padding"])), o["flip"])
            images = random_cutout(images, int(o["cutout"]))
        if self.mode == "robust" and photo_ops:
            # The order a photo meets them: optics blur, the sensor adds noise, the file is a JPEG.
            qualities = tuple(range(int(o["jpeg_quality_min"]), 96, 5))
            images = random_jpeg(random_noise(random_blur(images, o["blur"]), o["noise"]), o["jpeg"], qualities)
        return images

    def __repr__(self) -> str:
        return f"BatchAugment({self.mode!r}, {self.options})"
