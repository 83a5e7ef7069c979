"""Temperature scaling: probabilities that mean what they say.

Label smoothing and averaging test-time views both pull a model's confidence down (the 94 recipe
is right 94% of the time while its top probability is mostly 0.75-0.85), a model trained without
them is over-confident. One scalar T, fitted after training by minimising the negative
log-likelihood of softmax(logits / T) on images the model never trained on (a held-out
calibration split, or the validation split), fixes most of that without changing a single
prediction: dividing by T > 0 keeps every argmax. The test set takes no part in it.

T is stored in the checkpoint (``checkpoint["calibration"]``), baked into ONNX and TorchScript
graphs and recorded in the safetensors sidecar, so every path gives the same probabilities.
This module is the math alone (fit T, apply it, ECE, read it back); writing T into a
checkpoint is the training run's step (``training.calibrate_checkpoint``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cifar_lightning.errors import CheckpointError
from cifar_lightning.recipes import T_RANGE

N_BINS = 15  # ECE bins, everywhere ECE is reported (torchmetrics, L1)
#: a temperature shipped in a recipe (--calibrate fixed) was fitted for that recipe's flags; a run
#: whose test ECE comes out above this says so, and how to fit its own
GIVEN_T_ECE_LIMIT = 0.015



def fit_temperature(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """The T in T_RANGE that minimises the mean NLL of softmax(logits / T). The NLL is convex in
    1/T (the logits scale linearly with it), so a golden-section search on 1/T finds the optimum;
    a model no better than chance gets the largest T (near-uniform probabilities, honestly)."""
    logits, labels = logits.detach().double().cpu(), labels.detach().cpu()

    def nll(beta: float) -> float:
        return float(F.cross_entropy(logits * beta, labels))

    lo, hi = 1 / T_RANGE[1], 1 / T_RANGE[0]
    ratio = (math.sqrt(5) - 1) / 2
    a, b = hi - ratio * (hi - lo), lo + ratio * (hi - lo)
    fa, fb = nll(a), nll(b)
    while hi - lo > 1e-7 * max(1.0, lo):
        if fa < fb:
            hi, b, fb = b, a, fa
            a = hi - ratio * (hi - lo)
            fa = nll(a)
        else:
            lo, a, fa = a, b, fb
            b = lo + ratio * (hi - lo)
            fb = nll(b)
    return 1 / ((lo + hi) / 2)


def ece(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """Expected calibration error: the one definition (N_BINS equal-width bins, L1)."""
    # torchmetrics (with the torchvision it loads) takes seconds to import: here, not at the top,
    # so that predicting with a model file, which never computes an ECE, does not wait for it.
    from torchmetrics.functional.classification import multiclass_calibration_error

    return float(multiclass_calibration_error(probs.float(), labels, probs.shape[1], n_bins=N_BINS, norm="l1"))


def accuracy(probs: torch.Tensor, labels: torch.Tensor) -> float:
    """The share of images whose top class is the label: the one accuracy every report, check
    and benchmark gives (probabilities or logits alike: the argmax is the same)."""
    return float((probs.argmax(1) == labels.to(probs.device)).float().mean()) if len(labels) else float("nan")


def apply_temperature(logits: torch.Tensor, t: float) -> torch.Tensor:
    """Calibrated logits: ``logits / T``. Every path that applies a temperature calls this (the
    ``Classifier``, the training run's test and the graphs exports bake it into)."""
    return logits / t if t != 1.0 else logits


def summary(logits: torch.Tensor, labels: torch.Tensor, t: float, split: str) -> dict[str, Any]:
    """What a checkpoint records about its calibration: T and how it changed the fit images'
    NLL and ECE (figures on the images T was fitted on, so optimistic by construction: the
    test-set ECE in results.json and cifar-evaluate is the honest one)."""
    logits = logits.double()
    return {
        "temperature": t,
        "fitted_on": split,
        "images": len(labels),
        "nll_before": float(F.cross_entropy(logits, labels)),
        "nll_after": float(F.cross_entropy(apply_temperature(logits, t), labels)),
        "ece_before": ece(logits.softmax(-1), labels),
        "ece_after": ece(apply_temperature(logits, t).softmax(-1), labels),
    }


def usable_temperature(t: Any) -> bool:
    """A temperature read from a file is usable when it is a number within what ``fit_temperature``
    can fit (T_RANGE): a T of 1e-320 would turn every score infinite, and blame the images."""
    return not isinstance(t, bool) and isinstance(t, (int, float)) and math.isfinite(t) and T_RANGE[0] <= t <= T_RANGE[1]


def temperature_of(calibration: Any, where: str | Path = "checkpoint") -> float:
    """T from a checkpoint's ``calibration`` entry (1.0 when it has none); a damaged one is an
    error, never a silent 1.0."""
    if calibration is None:
        return 1.0
    t = calibration.get("temperature") if isinstance(calibration, dict) else None
    if not usable_temperature(t):
        raise CheckpointError(f"{where}: its calibration temperature {t!r} is not a number in {T_RANGE[0]}-{T_RANGE[1]}")
    return float(t)
