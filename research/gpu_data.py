"""Carry CIFAR-10 to a lent GPU machine in calls of at most 64 MiB (../shared/docs/GPU.md).

The decoded uint8 images are coded losslessly (LOCO-I's median predictor, then xz), about 56%
of their raw size, so 60,000 images fit in two parts of about 51 MB, where the PNG tree needs
136 MB. ``unpack`` rebuilds a train|test/<class>/NNNNN.png tree whose files sort in the
original order, so the data module there reads exactly the images, labels and seeded splits it
reads here.

    python -m research.gpu_data pack --data-dir ../shared/data/cifar10 --out .gpu-data --parts 2
    python -m research.gpu_data unpack .gpu-data/part1.npz --out /tmp/cifar10   (each part, there)
"""

from __future__ import annotations

import argparse
import io
import lzma
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np


def _neighbours(x: np.ndarray, row: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Left, up and up-left neighbours of every pixel of one row (zeros off the edge)."""
    up = x[..., row - 1, :] if row else np.zeros_like(x[..., 0, :])
    left = np.zeros_like(x[..., row, :])
    left[..., 1:] = x[..., row, :-1]
    upleft = np.zeros_like(up)
    upleft[..., 1:] = up[..., :-1]
    return left, up, upleft


def _median_predict(left: np.ndarray, up: np.ndarray, upleft: np.ndarray) -> np.ndarray:
    lo, hi = np.minimum(left, up), np.maximum(left, up)
    return np.where(upleft >= hi, lo, np.where(upleft <= lo, hi, left + up - upleft))


def encode(images: np.ndarray) -> bytes:
    """uint8 (N, 3, H, W) -> residuals of the median predictor, xz-compressed."""
    x = images.astype(np.int16)
    left = np.zeros_like(x)
    left[..., 1:] = x[..., :-1]
    up = np.zeros_like(x)
    up[..., 1:, :] = x[..., :-1, :]
    upleft = np.zeros_like(x)
    upleft[..., 1:, 1:] = x[..., :-1, :-1]
    residual = ((x - _median_predict(left, up, upleft)) % 256).astype(np.uint8)
    return lzma.compress(residual.tobytes(), preset=9)


def decode(blob: bytes, shape: tuple[int, ...]) -> np.ndarray:
    """The inverse of ``encode``: rebuilds pixels row by row, left to right (vectorised over
    images and channels)."""
    residual = np.frombuffer(lzma.decompress(blob), np.uint8).reshape(shape).astype(np.int16)
    x = np.zeros(shape, np.int16)
    for row in range(shape[-2]):
        for col in range(shape[-1]):
            left = x[..., row, col - 1] if col else np.zeros(shape[:-2], np.int16)
            up = x[..., row - 1, col] if row else np.zeros(shape[:-2], np.int16)
            upleft = x[..., row - 1, col - 1] if row and col else np.zeros(shape[:-2], np.int16)
            x[..., row, col] = (_median_predict(left, up, upleft) + residual[..., row, col]) % 256
    return x.astype(np.uint8)


def pack(data_dir: str, out: Path, parts: int, chunk: int = 2500) -> None:
    from cifar_lightning.data import load_splits

    splits = load_splits(data_dir, download=False)
    rows = [(split, i) for split in ("train", "test") for i in range(len(splits[split].labels))]
    out.mkdir(parents=True, exist_ok=True)
    per_part = -(-len(rows) // parts)
    with ProcessPoolExecutor(2) as pool:
        for p in range(parts):
            part = rows[p * per_part : (p + 1) * per_part]
            blobs, meta = [], []
            for split in ("train", "test"):
                idx = [i for s, i in part if s == split]
                if not idx:
                    continue
                images = splits[split].images[idx].numpy()
                chunks = [images[k : k + chunk] for k in range(0, len(images), chunk)]
                blobs += list(pool.map(encode, chunks))
                meta += [(split, idx[k], len(c)) for k, c in zip(range(0, len(idx), chunk), chunks, strict=True)]
            labels = {s: splits[s].labels.numpy() for s in ("train", "test")}
            buf = io.BytesIO()
            np.savez(
                buf, classes=np.array(splits["train"].classes), meta=np.array(meta, dtype=object),
                blobs=np.array(blobs, dtype=object), train_labels=labels["train"], test_labels=labels["test"],
            )  # fmt: skip
            path = out / f"part{p + 1}.npz"
            path.write_bytes(buf.getvalue())
            print(f"{path}: {len(part)} images, {path.stat().st_size / 1e6:.1f} MB")


def unpack(part: Path, out: Path) -> None:
    from PIL import Image

    z = np.load(part, allow_pickle=True)
    classes = [str(c) for c in z["classes"]]
    n = 0
    for (split, start, count), blob in zip(z["meta"], z["blobs"], strict=True):
        images = decode(blob, (int(count), 3, 32, 32))
        labels = z[f"{split}_labels"][int(start) : int(start) + int(count)]
        for k, (im, label) in enumerate(zip(images, labels, strict=True)):
            folder = out / split / classes[int(label)]
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(im.transpose(1, 2, 0)).save(folder / f"{int(start) + k:05d}.png")
        n += int(count)
    print(f"{part}: {n} images into {out}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("--data-dir", required=True)
    a.add_argument("--out", type=Path, default=Path(".gpu-data"))
    a.add_argument("--parts", type=int, default=2)
    b = sub.add_parser("unpack")
    b.add_argument("parts", type=Path, nargs="+")
    b.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    if args.cmd == "pack":
        pack(args.data_dir, args.out, args.parts)
    else:
        for part in args.parts:
            unpack(part, args.out)


if __name__ == "__main__":
    main()
