"""Issue 24's TTA and weight-space levers, weighed on the validation split without training.

    python -m research.wise_photo --data-dir ../shared/data/cifar10 --base BASE.ckpt --tuned TUNED.ckpt \
        --alphas 0 0.5 0.7 0.85 1 --out /work/photo/wise.json

The photo fine-tune trades clean accuracy for robustness. WiSE-FT (Wortsman et al., 2022)
interpolates the weights of the model a fine-tune started from (``--base``) and the fine-tuned
one (``--tuned``): ``(1 - a) * base + a * tuned``. The batch-norm statistics of a blend are not
the blend of the statistics, so ``--bn-images`` re-estimates them on clean training images
(``torch.optim.swa_utils.update_bn``; 0 keeps the blended ones). Each blend is scored, with the
tuned run's TTA, on the validation split the tuned run held out: clean, JPEG quality 75, and the
19 corrupted copies of ``cifar-evaluate --corruptions`` on the first ``--corrupt-images`` of it.
``--tta`` weighs the test-time views instead (0: one view, 1: + mirror, 2: + 1-px shifts, 6 views).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from torch.optim.swa_utils import update_bn

from cifar_lightning import corruptions as corruption
from cifar_lightning.calibration import accuracy
from cifar_lightning.checkpoint import load_checkpoint
from cifar_lightning.data import CIFAR10DataModule
from cifar_lightning.evaluate import score_corruptions
from cifar_lightning.images import normalize
from cifar_lightning.inference import checkpoint_classifier


def blend(base: dict, tuned: dict, a: float) -> dict:
    """The tuned checkpoint with its weights moved to ``(1 - a) * base + a * tuned``."""
    sb, st = base["state_dict"], tuned["state_dict"]
    mixed = {k: (torch.lerp(sb[k].float(), v.float(), a).to(v.dtype) if v.is_floating_point() else v) for k, v in st.items()}
    return {**tuned, "state_dict": mixed}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--base", type=Path, required=True)
    p.add_argument("--tuned", type=Path, required=True)
    p.add_argument("--alphas", type=float, nargs="+", default=[0.0, 0.5, 0.7, 0.85, 1.0])
    p.add_argument("--val-size", type=int, default=2000, help="the tuned run's validation split")
    p.add_argument("--bn-images", type=int, default=5000)
    p.add_argument("--corrupt-images", type=int, default=500)
    p.add_argument("--tta", type=int, nargs="+", choices=(0, 1, 2), default=[None], help="test-time views (default: the tuned run's)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    dm = CIFAR10DataModule(data_dir=args.data_dir, val_size=args.val_size)
    dm.prepare_data()
    dm.setup("fit")
    images, labels = dm.val_set.images, dm.val_set.labels
    jpeg75 = corruption.jpeg(images, 75)
    bn_batches = [normalize(b) for b in dm.train_set.images[: args.bn_images].split(500)]
    base, tuned = load_checkpoint(args.base), load_checkpoint(args.tuned)
    rows: list[dict[str, Any]] = []
    for a, tta in ((a, t) for a in args.alphas for t in args.tta):
        t0 = time.perf_counter()
        ckpt = blend(base, tuned, a)
        clf = checkpoint_classifier(ckpt, f"blend a={a}", tta=tta)
        if args.bn_images:
            net = getattr(clf.network, "net", clf.network)  # the network inside its TTA views
            update_bn(bn_batches, net)
            clf.network.eval()
        clean, jpeg = accuracy(clf.probabilities(images, 500), labels), accuracy(clf.probabilities(jpeg75, 500), labels)
        n = args.corrupt_images
        scored = score_corruptions(clf, images[:n], labels[:n]) if n else {}
        levels = [r["accuracy"] for rs in scored.values() for r in rs]
        row = {"alpha": a, "tta": clf.tta, "bn_images": args.bn_images, "val_clean": clean, "val_jpeg75": jpeg, "jpeg_gap": clean - jpeg,
               "val_corruption_mean": statistics.fmean(levels) if levels else None, "corrupt_images": n,
               "seconds": time.perf_counter() - t0}  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
        args.out.write_text(json.dumps({"base": str(args.base), "tuned": str(args.tuned), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
