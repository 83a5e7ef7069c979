"""Issue 34's "another encoder": a model's accuracy and ECE on JPEG-75 copies of the test set in
each of Pillow's chroma layouts (4:2:0 is what ``--corruptions`` uses), at the temperatures given.

    python -m research.jpeg_layouts --data-dir ../shared/data/cifar10 --model pretrained:photo --t 0.4896 0.503
"""

from __future__ import annotations

import argparse
import io
import json

import numpy as np
import torch
from PIL import Image

from cifar_lightning.calibration import accuracy, apply_temperature, ece
from cifar_lightning.data import CIFAR10DataModule
from cifar_lightning.inference import load_classifier


def pillow_jpeg(images: torch.Tensor, quality: int, subsampling: str) -> torch.Tensor:
    out = np.empty_like(images.numpy())
    for i, im in enumerate(images.permute(0, 2, 3, 1).numpy()):
        buf = io.BytesIO()
        Image.fromarray(im).save(buf, format="JPEG", quality=quality, subsampling=subsampling)
        with Image.open(buf) as decoded:
            out[i] = np.asarray(decoded.convert("RGB")).transpose(2, 0, 1)
    return torch.from_numpy(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--model", default="pretrained:photo")
    p.add_argument("--t", type=float, nargs="+", required=True, help="temperatures to score at")
    args = p.parse_args()
    dm = CIFAR10DataModule(data_dir=args.data_dir)
    dm.prepare_data()
    dm.setup("test")
    x, y = dm.test_set.images, dm.test_set.labels
    clf = load_classifier(args.model, calibrate=False)
    for name, imgs in [("clean", x), *((f"jpeg75 {s}", pillow_jpeg(x, 75, s)) for s in ("4:2:0", "4:2:2", "4:4:4"))]:
        lg = clf.logits(imgs, 500).double()
        eces = {str(t): round(ece(apply_temperature(lg, t).softmax(-1), y), 4) for t in args.t}
        print(json.dumps({"copy": name, "acc": round(accuracy(lg, y), 4), "ece_at_t": eces}), flush=True)


if __name__ == "__main__":
    main()
