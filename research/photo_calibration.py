"""Issue 34's calibration under JPEG: which calibration images give a temperature that holds on
clean images and on JPEG photos alike (no training: logits of a finished model).

    python -m research.photo_calibration --data-dir ../shared/data/cifar10 --model pretrained:photo \
        --out docs/trust/photo/calibration_jpeg.json

T is fitted (``calibration.fit_temperature``) on the model's 2,000 held-out images (split_seed 0,
``perm[:2000]``: neither pretrained:94 nor the photo fine-tune trained on them), clean alone as
shipped, or with a corrupted copy of each beside it: JPEG at quality 75, JPEG at a random quality
in 50-95 per image, or one of the 19 corruption levels of ``cifar-evaluate --corruptions`` drawn
per image. Each T is then scored on the test set: clean, JPEG-75 by Pillow (4:2:0, as
``--corruptions``), JPEG-75 by a second encoder (torchvision's libjpeg ``encode_jpeg``) and the
mean ECE over the 19 corrupted copies of the first ``--corrupt-images`` test images. The test set
chooses nothing: the choice is made on the held-out images alone, two-fold (T fitted on one half's
images of a recipe, ECE on the other half's clean and JPEG-75 copies, both ways round), by a rule
fixed before this script first ran: the recipe with the lowest mean of those two ECEs over both
folds. The test rows then say whether it meets the issue's limits (clean <= 0.015, JPEG <= 0.02).
The pick (2026-12-05, pretrained:photo): clean + jpeg75, shipped as ``cifar-train --calib-jpeg``.

Issue 34 also asks ECE <= 0.015 on every preset (``seed`` gave 0.016-0.019, ``90`` 0.0154). The same
script reads any checkpoint (``--model CKPT --held-out N``: its calibration images are the first N
of split seed 0, the seed preset's 5,000 validation images, 90's 2,000 held out) and has one more
recipe, fixed (2026-12-06) before the seed-8 runs of those presets ended: T at the lowest ECE of
its fit images instead of the lowest NLL (a grid of 400 values of log T over T_RANGE). The rule is
the same: the lowest two-fold mean of held-out clean and JPEG-75 ECE. A recipe other than the
shipped one goes into the package only if it is picked on both presets' runs.
The second encoder turned out to be no second encoder: torchvision and Pillow both call
libjpeg-turbo with the same tables and 4:2:0, and gave the same copy to the image.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import statistics
from pathlib import Path

import torch
from torchvision.io import decode_jpeg, encode_jpeg

from cifar_lightning import corruptions as corruption
from cifar_lightning.calibration import T_RANGE, accuracy, apply_temperature, ece, fit_temperature
from cifar_lightning.data import CIFAR10DataModule
from cifar_lightning.inference import load_classifier


def libjpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    """A second encoder's JPEG copy (torchvision's libjpeg, its own defaults)."""
    return torch.stack([decode_jpeg(b) for b in encode_jpeg(list(images), quality=quality)])


def random_jpeg(images: torch.Tensor, seed: int) -> torch.Tensor:
    rng = random.Random(seed)
    return torch.cat([corruption.jpeg(im[None], rng.randint(50, 95)) for im in images])


def one_level_each(images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """A corrupted copy: each image under one of the 19 levels of ``--corruptions``, drawn per image."""
    levels = corruption.all_levels()
    draw = torch.randint(len(levels), (len(images),), generator=torch.Generator().manual_seed(seed))
    out = images.contiguous().cpu().clone()
    for i, (name, severity) in enumerate(levels):
        if len(idx := (draw == i).nonzero().flatten()):
            out[idx] = corruption.corrupt(out[idx], name, severity, seed)
    return out


def ece_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T (a log grid over T_RANGE) at which the fit images' ECE is lowest."""
    grid = torch.logspace(math.log10(T_RANGE[0]), math.log10(T_RANGE[1]), 400).tolist()
    return min(grid, key=lambda t: ece(apply_temperature(logits, t).softmax(-1), labels))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--model", default="pretrained:photo")
    p.add_argument("--held-out", type=int, default=2000, help="the model's held-out images (perm[:N] of split_seed 0)")
    p.add_argument("--corrupt-images", type=int, default=1000)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    clf = load_classifier(args.model, calibrate=False)
    dm = CIFAR10DataModule(data_dir=args.data_dir, val_size=args.held_out)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    held, held_y = dm.val_set.images, dm.val_set.labels
    test, test_y = dm.test_set.images, dm.test_set.labels

    def logits(images: torch.Tensor) -> torch.Tensor:
        return clf.logits(images, 500).double()

    fit_sets = {
        "clean": logits(held),
        "jpeg75": logits(corruption.jpeg(held, 75)),
        "jpeg50_95": logits(random_jpeg(held, 0)),
        "corrupted": logits(one_level_each(held)),
    }
    n = args.corrupt_images
    scored = {"clean": logits(test), "jpeg75_pillow": logits(corruption.jpeg(test, 75)), "jpeg75_libjpeg": logits(libjpeg(test, 75))}
    levels = {f"{name}_{s}": logits(corruption.corrupt(test[:n], name, s, 0)) for name, s in corruption.all_levels()}
    nll, by_ece = fit_temperature, ece_temperature
    recipes = {
        "clean (shipped)": (["clean"], nll), "clean + jpeg75": (["clean", "jpeg75"], nll),
        "clean + jpeg 50-95": (["clean", "jpeg50_95"], nll), "clean + one corruption each": (["clean", "corrupted"], nll),
        "clean + jpeg 50-95 + corruption": (["clean", "jpeg50_95", "corrupted"], nll),
        "clean, lowest ECE": (["clean"], by_ece), "clean + jpeg75, lowest ECE": (["clean", "jpeg75"], by_ece),
    }  # fmt: skip
    half = len(held_y) // 2
    folds = [(slice(0, half), slice(half, None)), (slice(half, None), slice(0, half))]
    choice = {}
    for name, (parts, fitter) in recipes.items():
        eces = []
        for fit, score in folds:
            t = fitter(torch.cat([fit_sets[k][fit] for k in parts]), torch.cat([held_y[fit]] * len(parts)))
            eces += [ece(apply_temperature(fit_sets[k][score], t).softmax(-1), held_y[score]) for k in ("clean", "jpeg75")]
        choice[name] = {"held_out_clean_ece": [round(e, 4) for e in eces[::2]], "held_out_jpeg75_ece": [round(e, 4) for e in eces[1::2]],
                        "mean": round(statistics.fmean(eces), 4)}  # fmt: skip
        print(json.dumps({"two_fold": name, **choice[name]}), flush=True)
    pick = min(choice, key=lambda n: choice[n]["mean"])
    rows = []
    for name, (parts, fitter) in recipes.items():
        t = fitter(torch.cat([fit_sets[k] for k in parts]), torch.cat([held_y] * len(parts)))
        row = {"fitted_on": name, "images": len(held_y) * len(parts), "temperature": round(t, 4)}
        for k, lg in scored.items():
            row[f"test_{k}_ece"] = round(ece(apply_temperature(lg, t).softmax(-1), test_y), 4)
            row[f"test_{k}_acc"] = round(accuracy(lg, test_y), 4)
        row["test_corrupted_mean_ece"] = round(statistics.fmean(ece(apply_temperature(lg, t).softmax(-1), test_y[:n])
                                                                for lg in levels.values()), 4)  # fmt: skip
        rows.append(row)
        print(json.dumps(row), flush=True)
    args.out.write_text(json.dumps({"model": args.model, "held_out": args.held_out, "corrupt_images": n,
                                         "two_fold": choice, "pick": pick, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
