"""Issue 34, calibration on every preset: does a calibrator with more than one parameter bring the
seed preset's test ECE to at most 0.015 on every seed, where one temperature does not?

    python -m research.seed_calibrators --data-dir ../shared/data/cifar10 \
        --out docs/trust/seed_calibrators.json CKPT_SEED8 CKPT_SEED9 CKPT_SEED10 CKPT_SEED11

No training: logits of finished ``--preset seed`` runs on their own 5,000 validation images (the
calibration split the preset fits T on: perm[:5000] of split seed 0) and on the 10,000 test images.

The rule, fixed (2026-12-06) before this script first ran:
  - candidates, each fitted by the mean NLL on the calibration images:
      temperature:   logits / T (1 parameter, what every preset ships),
      temperature + bias: logits / T + b (11; b a per-class shift, summing to 0),
      vector scaling: logits * a + b (20; a and b per class);
  - the measure is held-out only: two-fold on the 5,000 (fit on one half, ECE on the other, both
    ways round), averaged over the folds and over every run given;
  - the candidate with the lowest such mean is the pick; it ships for ``--preset seed`` only if
    its test ECE, fitted on all 5,000, is at most 0.015 on every run given. The test set chooses
    nothing.

Round 1 (docs/trust/seed_calibrators.json): vector scaling was picked (two-fold 0.0210 against
0.0232 for one temperature) but its test ECE on seed 11 was 0.0154, so nothing shipped. Round 2,
its rule fixed before it ran: the same three calibrators on the mirror pair's averaged logits
(``--tta 1``, what the fast presets ship at the least); the same two-fold measure picks among all
six (round 1's figures, recomputed, with them), and the same test limit decides.
    python -m research.seed_calibrators ... --tta 0 1 --out docs/trust/seed_calibrators_tta.json CKPTS

Round 2's pick (temperature + bias on the mirror pair) missed on seeds 9 and 11. On 2,500 images a
fold's ECE spreads 0.012-0.034 for one calibrator, wider than the gaps between calibrators: the
measure, not the candidates, failed. Round 3 (written after round 2's test figures were seen, so
seeds 8-11 no longer test it): the same six candidates picked by the two-fold held-out NLL, a
proper score that varies far less between halves (``--measure nll``); the pick holds only if
fresh seeds (12 and 13, not yet trained) also give a test ECE of at most 0.015.
    python -m research.seed_calibrators ... --tta 0 1 --measure nll --out docs/trust/seed_calibrators_nll.json CKPTS
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import torch.nn.functional as F

from cifar_lightning.calibration import accuracy, ece, fit_temperature
from cifar_lightning.data import CIFAR10DataModule
from cifar_lightning.inference import load_classifier


def fit_affine(logits: torch.Tensor, labels: torch.Tensor, per_class_scale: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (one, or one per class) and a per-class bias minimising the NLL; started at the
    fitted temperature, so that LBFGS refines what one parameter already found."""
    t = fit_temperature(logits, labels)
    k = logits.shape[1]
    log_scale = torch.full((k if per_class_scale else 1,), -float(torch.log(torch.tensor(t))), dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(k, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([log_scale, bias], lr=0.5, max_iter=500, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(logits * log_scale.exp() + bias, labels)
        loss.backward()
        return loss

    opt.step(closure)
    b = bias.detach() - bias.detach().mean()  # a shared shift changes no probability
    return log_scale.detach().exp(), b


def apply(logits: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    scale, bias = params
    return logits * scale + bias


def fit_scalar(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    one = torch.tensor([1 / fit_temperature(logits, labels)], dtype=torch.float64)
    return one, torch.zeros(logits.shape[1], dtype=torch.float64)


FITTERS = {
    "temperature": fit_scalar,
    "temperature + bias": lambda lg, y: fit_affine(lg, y, per_class_scale=False),
    "vector scaling": lambda lg, y: fit_affine(lg, y, per_class_scale=True),
}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--held-out", type=int, default=5000)
    p.add_argument("--tta", type=int, nargs="+", default=[0], help="test-time view levels to fit on (0: one view)")
    p.add_argument("--measure", choices=("ece", "nll"), default="ece", help="the two-fold held-out figure that picks")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    dm = CIFAR10DataModule(data_dir=args.data_dir, val_size=args.held_out)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    held_y, test_y = dm.val_set.labels, dm.test_set.labels
    half = len(held_y) // 2
    folds = [(slice(0, half), slice(half, None)), (slice(half, None), slice(0, half))]
    names = [f"{name}, tta {level}" if level else name for level in args.tta for name in FITTERS]
    runs, two_fold, two_fold_nll = [], {name: [] for name in names}, {name: [] for name in names}
    for model, level in ((m, lv) for m in args.models for lv in args.tta):
        clf = load_classifier(model, tta=level, calibrate=False)
        held, test = clf.logits(dm.val_set.images, 500).double(), clf.logits(dm.test_set.images, 500).double()
        run = {"model": model, "tta": level, "test_acc": round(accuracy(test, test_y), 4), "fits": {}}
        for fit_name, fitter in FITTERS.items():
            name = f"{fit_name}, tta {level}" if level else fit_name
            scored = [(apply(held[s], fitter(held[f], held_y[f])), held_y[s]) for f, s in folds]  # one fit a fold
            folds_ece = [ece(lg.softmax(-1), y) for lg, y in scored]
            folds_nll = [float(F.cross_entropy(lg, y)) for lg, y in scored]
            two_fold[name] += folds_ece
            two_fold_nll[name] += folds_nll
            params = fitter(held, held_y)
            run["fits"][name] = {
                "two_fold_ece": [round(e, 4) for e in folds_ece],
                "two_fold_nll": [round(e, 4) for e in folds_nll],
                "test_ece": round(ece(apply(test, params).softmax(-1), test_y), 4),
                "test_nll": round(float(F.cross_entropy(apply(test, params), test_y)), 4),
                "scale": [round(float(v), 4) for v in params[0]],
                "bias": [round(float(v), 4) for v in params[1]],
            }
            shown = {k: v for k, v in run["fits"][name].items() if k not in ("scale", "bias")}
            print(json.dumps({"model": model, "fit": name, **shown}), flush=True)
        runs.append(run)
    means = {name: round(statistics.fmean(v), 5) for name, v in two_fold.items()}
    means_nll = {name: round(statistics.fmean(v), 5) for name, v in two_fold_nll.items()}
    by = means if args.measure == "ece" else means_nll
    pick = min(by, key=by.get)
    ships = all(r["fits"][pick]["test_ece"] <= 0.015 for r in runs if pick in r["fits"])
    out = {"held_out": args.held_out, "measure": args.measure, "two_fold_mean_ece": means, "two_fold_mean_nll": means_nll,
           "pick": pick, "ships": ships, "runs": runs}  # fmt: skip
    print(json.dumps({k: out[k] for k in ("two_fold_mean_ece", "two_fold_mean_nll", "pick", "ships")}))
    args.out.write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
