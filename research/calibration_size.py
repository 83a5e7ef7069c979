"""How many held-out images the temperature needs: fit T on k images, measure ECE on others.

Takes a checkpoint of a run that held out a large calibration split (``--calib-size 5000``),
computes its logits (test-time views, float32) on that split, and splits it in two halves:
T is fitted on random k-image subsets of the first half (``--repeats`` draws per k) and the
ECE is measured on the whole second half. The test set takes no part.

    cifar-train --preset 94 --calib-size 5000 --log-dir runs/c5000 --data-dir ../shared/data/cifar10
    python -m research.calibration_size runs/c5000/version_0/checkpoints/last.ckpt
"""

from __future__ import annotations

import argparse
import statistics
from pathlib import Path

import torch

from cifar_lightning.calibration import ece, fit_temperature
from cifar_lightning.data import CIFAR10DataModule
from cifar_lightning.inference import load_classifier
from cifar_lightning.runs import saved_run_config


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoint")
    p.add_argument("--sizes", type=int, nargs="+", default=[250, 500, 1000, 2000, 2500])
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    cfg = saved_run_config(Path(args.checkpoint))
    dm = CIFAR10DataModule(cfg["data_dir"], val_size=cfg.get("val_size", 0), split_seed=cfg.get("split_seed", 0),
                           calib_size=cfg["calib_size"])  # fmt: skip
    dm.setup("fit")
    # Raw logits with the checkpoint's test-time views, through the one inference path: what T divides.
    logits = load_classifier(args.checkpoint, device=args.device, calibrate=False).logits(dm.calib_set.images, batch_size=500)
    labels = dm.calib_set.labels
    half = len(labels) // 2
    fit_logits, fit_labels, eval_logits, eval_labels = logits[:half], labels[:half], logits[half:], labels[half:]
    print(f"{len(labels)} held-out images: fit on subsets of the first {half}, ECE on the other {len(labels) - half}")
    print(f"uncalibrated ECE {ece(eval_logits.softmax(-1), eval_labels):.4f}")
    print("| images | T mean | T std | ECE mean | ECE std | ECE worst |")
    print("| --- | --- | --- | --- | --- | --- |")
    g = torch.Generator().manual_seed(0)
    for k in args.sizes:
        ts, eces = [], []
        for _ in range(args.repeats if k < half else 1):
            idx = torch.randperm(half, generator=g)[:k]
            t = fit_temperature(fit_logits[idx], fit_labels[idx])
            ts.append(t)
            eces.append(ece((eval_logits / t).softmax(-1), eval_labels))
        sd = statistics.pstdev
        print(f"| {k} | {statistics.fmean(ts):.3f} | {sd(ts):.3f} | {statistics.fmean(eces):.4f} | {sd(eces):.4f} | {max(eces):.4f} |")


if __name__ == "__main__":
    main()
