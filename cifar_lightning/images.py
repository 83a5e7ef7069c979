"""What a CIFAR image is: the classes, the normalisation, the size, the file suffixes, and the
ONE decode policy that turns any image file into the 32x32 RGB uint8 the networks see.

Training image folders and prediction decode through ``to_rgb32``, so a model sees at
prediction the same pixels it trained on. The policy: EXIF orientation applied; 16-bit scaled
to 8-bit; palette, grayscale and CMYK converted to RGB; transparency composited over white; the
largest centred square cropped (CIFAR-10 images are square and object-centred: squashing a
4:3 photo would distort every object) and resized to 32x32 with Lanczos filtering (it
anti-aliases a large downscale). A 32x32 RGB file passes through unchanged.

Imports no Lightning: predicting with an ONNX export needs only this, torch and onnxruntime.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from cifar_lightning.errors import ImageError, ImageTooLargeError, NotAnImageError, printable

CLASSES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip
# Per-channel statistics of the 50,000 CIFAR-10 training images (pixel values in [0, 1]).
MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
IMAGE_SIZE = 32
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
# Larger images are refused before their pixels are decoded (a small file can declare a huge
# image: a decompression bomb). 40 megapixels is a 7300x5500 photo. JPEGs are decoded at a
# reduced scale first (see ``load_image``), so a larger JPEG still costs little memory.
MAX_PIXELS = 40_000_000


def normalize(images: torch.Tensor, mean: Any = MEAN, std: Any = STD) -> torch.Tensor:
    """uint8 or [0, 1] float images -> float tensor normalised with the CIFAR-10 train stats."""
    x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
    mean = torch.as_tensor(mean, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    std = torch.as_tensor(std, dtype=torch.float32, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``normalize``: back to uint8 images (for figures of what the network saw)."""
    mean = torch.tensor(MEAN, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=x.device).view(1, 3, 1, 1)
    return ((x * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".") and path.is_file()


def to_rgb32(image: Any) -> np.ndarray:
    """A PIL image -> (32, 32, 3) uint8 RGB, by the policy in the module docstring."""
    im = ImageOps.exif_transpose(image)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16-bit (or 32-bit int) grayscale
        arr = np.asarray(im, dtype=np.float64)
        peak = 65535.0 if arr.max() > 255 else 255.0
        im = Image.fromarray(np.clip(arr / peak * 255 + 0.5, 0, 255).astype(np.uint8), "L")
    elif im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ImageError("a floating-point image holding NaN or infinite pixels")
        im = Image.fromarray(np.clip(arr * (255 if arr.max() <= 1 else 1) + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA") or (im.mode in ("RGB", "L") and "transparency" in im.info):
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        im = Image.alpha_composite(white, rgba)
    im = im.convert("RGB")
    if im.size != (IMAGE_SIZE, IMAGE_SIZE):
        im = ImageOps.fit(im, (IMAGE_SIZE, IMAGE_SIZE), method=Image.Resampling.LANCZOS)
    return np.array(im, dtype=np.uint8)  # a writable copy: torch.from_numpy warns on read-only arrays


def decode(source: str | Path | BinaryIO, name: str) -> np.ndarray:
    """An image file or binary stream -> (32, 32, 3) uint8 RGB; ImageError starting with ``name``.

    Memory stays bounded: a JPEG is decoded at the smallest of its 1/2, 1/4, 1/8 scales that
    still holds 4x the output size (``draft``), and any image declaring more than MAX_PIXELS
    after that is refused (ImageTooLargeError) before decoding."""
    try:
        with Image.open(source) as im:
            if im.format == "JPEG":
                im.draft("RGB", (4 * IMAGE_SIZE, 4 * IMAGE_SIZE))
            if im.width * im.height > MAX_PIXELS:
                raise ImageTooLargeError(f"{name}: {im.width}x{im.height} pixels is over the {MAX_PIXELS // 1_000_000} megapixel limit")
            im.load()  # decode now: a truncated file fails here, not later
            return to_rgb32(im)
    except ImageError:
        raise
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except UnidentifiedImageError:
        raise NotAnImageError(f"{name}: not an image PIL can read") from None
    except Image.DecompressionBombError as e:
        raise ImageTooLargeError(f"{name}: refused, a decompression bomb ({e})") from None
    except (OSError, ValueError, SyntaxError, MemoryError) as e:
        raise ImageError(f"{name}: unreadable image ({e})") from None


def load_image(path: str | Path) -> np.ndarray:
    """An image file -> (32, 32, 3) uint8 RGB; ImageError naming the file otherwise."""
    path = Path(path)
    name = printable(path)
    try:
        if path.is_dir():
            raise ImageError(f"{name}: is a directory")
        if path.stat().st_size == 0:
            raise ImageError(f"{name}: empty file")
    except FileNotFoundError:
        raise ImageError(f"{name}: no such file") from None
    except OSError as e:
        raise ImageError(f"{name}: unreadable image ({e.strerror or e})") from None
    return decode(path, name)
