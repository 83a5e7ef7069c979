"""The ECE a perfectly calibrated model would still show on the 10,000 test images: labels drawn
from the model's own calibrated probabilities, 100 draws. What is left above it is miscalibration
a temperature could fix; below it, a bar of 0.015 is noise.

    python -m research.ece_floor --data-dir ../shared/data/cifar10 --model pretrained:94
"""

from __future__ import annotations

import argparse
import json

import torch

from cifar_lightning.calibration import ece
from cifar_lightning.data import CIFAR10DataModule
from cifar_lightning.inference import load_classifier


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--draws", type=int, default=100)
    args = p.parse_args()
    clf = load_classifier(args.model)
    dm = CIFAR10DataModule(data_dir=args.data_dir, val_size=0)
    dm.prepare_data()
    dm.setup("test")
    images, labels = dm.test_set.images, dm.test_set.labels
    probs = (clf.logits(images, 500).double() / clf.temperature).softmax(-1)
    g = torch.Generator().manual_seed(0)
    sims = torch.tensor([ece(probs, torch.multinomial(probs.float(), 1, generator=g).squeeze(1)) for _ in range(args.draws)])
    print(json.dumps({"model": args.model, "temperature": round(clf.temperature, 4), "test_ece": round(ece(probs, labels), 4),
                      "accuracy": round((probs.argmax(-1) == labels).double().mean().item(), 4),
                      "floor_mean": round(sims.mean().item(), 4), "floor_p95": round(sims.quantile(0.95).item(), 4)}))  # fmt: skip


if __name__ == "__main__":
    main()
