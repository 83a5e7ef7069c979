"""Issue 24 on a CPU: ``--preset photo`` measured on test seeds that chose nothing.

    python -m research.photo_seeds --data-dir ../shared/data/cifar10 --out /work/photo/test --seeds 8 9 10 11 \
        --reference pretrained:94

For each seed: ``cifar-train --preset photo --seed S`` (the real command line; its own test gives
clean accuracy and ECE on all 10,000 test images), then its tested checkpoint on JPEG quality 75
(all 10,000) and on the 19 corrupted copies of ``cifar-evaluate --corruptions`` for the first
``--corrupt-images`` images of the bundled check subset. That subset keeps a seed's evaluation
to minutes on a 2-core CPU: all 19 copies of all 10,000 images with 6 test-time views are
1.1 million forward passes, over an hour there (46 s a copy of 2,000 images on an AVX2 EPYC). ``--reference`` scores a model file (e.g.
the 94 model) the same way in the same run. Prints a JSON line per model; writes results.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.harness import REPO
from cifar_lightning import bundled
from cifar_lightning import corruptions as corruption
from cifar_lightning.calibration import accuracy, ece
from cifar_lightning.data import CIFAR10DataModule
from cifar_lightning.evaluate import score_corruptions
from cifar_lightning.inference import load_classifier


def score(model: str | Path, images: torch.Tensor, labels: torch.Tensor, subset: list[int], clean: tuple[float, float] | None = None,
          ) -> dict[str, Any]:  # fmt: skip
    """Clean accuracy and ECE (unless ``clean`` gives them: a run's own test) and JPEG-75 on every
    test image; the 19 corrupted copies on the subset."""
    t0 = time.perf_counter()
    clf = load_classifier(bundled.resolve(model))
    if clean is None:
        probs = clf.probabilities(images, 500)
        clean = accuracy(probs, labels), ece(probs, labels)
    jpeg = clf.probabilities(corruption.jpeg(images, 75), 500)
    sub = clf.probabilities(images[subset], 500)
    scored = score_corruptions(clf, images[subset], labels[subset])
    rows = [r["accuracy"] for levels in scored.values() for r in levels]
    return {
        "model": str(model), "clean_accuracy": clean[0], "ece": clean[1],
        "jpeg75_accuracy": accuracy(jpeg, labels),
        "clean_accuracy_subset": accuracy(sub, labels[subset]),
        "corruption_mean_accuracy_subset": statistics.fmean(rows), "corrupt_images": len(subset),
        "corruptions": {k: [round(r["accuracy"], 4) for r in v] for k, v in scored.items()},
        "eval_seconds": time.perf_counter() - t0,
    }  # fmt: skip


def train(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    logs = args.out / f"seed{seed}"
    cmd = [sys.executable, "-m", "cifar_lightning", "train", "--preset", args.preset, "--data-dir", args.data_dir,
           "--log-dir", str(logs), "--seed", str(seed), "--no-progress-bar", *args.extra.split()]  # fmt: skip
    logs.mkdir(parents=True, exist_ok=True)
    with open(logs / "train.log", "w") as log:
        code = subprocess.call(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT)
    results = logs / "version_0" / "results.json"
    if code != 0 or not results.is_file():
        return {"seed": seed, "train_exit": code}
    r = json.loads(results.read_text())
    return {"seed": seed, "train_exit": code, "checkpoint": r["best_checkpoint"], "run_test_acc": r["test_acc"],
            "run_test_ece": r.get("test_ece"), "train_seconds": sum(r.get("train_seconds") or []),
            "wall_seconds": r.get("wall_seconds"), "temperature": (r.get("calibration") or {}).get("temperature")}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--seeds", type=int, nargs="*", default=[8, 9, 10, 11])
    p.add_argument("--preset", default="photo")
    p.add_argument("--extra", default="", help="flags added to every cifar-train (a smoke test: --limit-train-images ...)")
    p.add_argument("--reference", action="append", default=[], help="a model file or pretrained:NAME scored the same way")
    p.add_argument("--corrupt-images", type=int, default=500)
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    dm = CIFAR10DataModule(data_dir=args.data_dir)
    dm.prepare_data()
    dm.setup("test")
    images, labels = dm.test_set.images, dm.test_set.labels
    subset = bundled.check_subset(len(labels))[: args.corrupt_images]
    rows: list[dict[str, Any]] = []

    def record(row: dict[str, Any]) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)
        (args.out / "results.json").write_text(json.dumps({"argv": sys.argv[1:], "rows": rows}, indent=2))

    for ref in args.reference:
        known = bundled.index().get(ref.removeprefix(bundled.PREFIX), {}) if bundled.is_bundled(ref) else {}
        clean = (known["test_acc"], known["test_ece"]) if "test_acc" in known and "test_ece" in known else None  # its record's
        record({"reference": ref, **score(ref, images, labels, subset, clean)})
    for seed in args.seeds:
        row = train(seed, args)
        if "checkpoint" in row:
            row |= score(row["checkpoint"], images, labels, subset, (row["run_test_acc"], row["run_test_ece"]))
        record(row)
    done = [r for r in rows if "seed" in r and "clean_accuracy" in r]
    if done:
        keys = ("clean_accuracy", "jpeg75_accuracy", "corruption_mean_accuracy_subset", "ece", "train_seconds")
        print(json.dumps({"mean_of_seeds": {k: statistics.fmean(r[k] for r in done) for k in keys}, "seeds": len(done)}))


if __name__ == "__main__":
    main()
