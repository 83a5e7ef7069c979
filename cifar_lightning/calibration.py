"""Temperature scaling: probabilities that mean what they say.

Label smoothing and averaging test-time views both pull a model's confidence down (the 94 recipe
is right 94% of the time while its top probability is mostly 0.75-0.85), a model trained without
them is over-confident. One scalar T, fitted after training by minimising the negative
log-likelihood of softmax(logits / T) on images the model never trained on (a held-out
calibration split, or the validation split), fixes most of that without changing a single
prediction: dividing by T > 0 keeps every argmax. The test set takes no part in it.

T is stored in the checkpoint (``checkpoint["calibration"]``), baked into ONNX and TorchScript
graphs and recorded in the safetensors sidecar, so every path gives the same probabilities.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from cifar_lightning.errors import CheckpointError

N_BINS = 15  # ECE bins, as cifar-evaluate reports it (torchmetrics, L1)


T_RANGE = (0.01, 100.0)


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


def ece(probs: torch.Tensor, labels: torch.Tensor, n_bins: int = N_BINS) -> float:
    from torchmetrics.functional.classification import multiclass_calibration_error

    return float(multiclass_calibration_error(probs.float(), labels, probs.shape[1], n_bins=n_bins, norm="l1"))


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
        "nll_after": float(F.cross_entropy(logits / t, labels)),
        "ece_before": ece(logits.softmax(-1), labels),
        "ece_after": ece((logits / t).softmax(-1), labels),
    }


def temperature_of(calibration: Any, where: str | Path = "checkpoint") -> float:
    """T from a checkpoint's ``calibration`` entry (1.0 when it has none); a damaged one is an
    error, never a silent 1.0."""
    if calibration is None:
        return 1.0
    t = calibration.get("temperature") if isinstance(calibration, dict) else None
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not (math.isfinite(t) and t > 0):
        raise CheckpointError(f"{where}: its calibration temperature {t!r} is not a positive number")
    return float(t)


@torch.no_grad()
def calibration_logits(net: torch.nn.Module, images: torch.Tensor, tta: int, device: torch.device | str,
                       batch_size: int = 500) -> torch.Tensor:  # fmt: skip
    """Float32 logits with the model's test-time views: exactly what inference will divide by T."""
    from cifar_lightning.images import normalize
    from cifar_lightning.models import tta_logits

    was_training = net.training
    net.eval()
    out = []
    try:
        with torch.autocast(torch.device(device).type, enabled=False):
            for i in range(0, len(images), batch_size):
                x = normalize(images[i : i + batch_size].to(device))
                out.append(tta_logits(net, x, tta).float().cpu())
    finally:
        net.train(was_training)
    return torch.cat(out)


def calibrate_checkpoint(path: Path, images: torch.Tensor, labels: torch.Tensor, split: str, device: torch.device | str,
                         write: bool = True) -> dict[str, Any]:  # fmt: skip
    """Fit T for the checkpoint at ``path`` on (images, labels) and write it into the file
    (atomically: a kill leaves the old file). Returns the calibration entry."""
    from cifar_lightning.checkpoint import atomic_write, classifier_from_checkpoint, load_checkpoint

    ckpt = load_checkpoint(path)
    module = classifier_from_checkpoint(ckpt, path).to(device)
    logits = calibration_logits(module.net, images, module.hparams.tta, device)
    entry = summary(logits, labels.cpu(), fit_temperature(logits, labels), split)
    if write:
        ckpt["calibration"] = entry
        atomic_write(path, lambda tmp: torch.save(ckpt, tmp), fsync=True)
    return entry
