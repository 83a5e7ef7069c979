"""Put a trained run into the package as a bundled model (``pretrained:NAME``) and record it.

    python -m research.bundle_model 94 /work/bundled/94/version_0 --data-dir ../shared/data/cifar10 \
        --command "cifar-train --preset 94 --seed 0 ..." --machine "2-core AMD EPYC (AVX2, fp32)"

Exports the run's tested checkpoint to ``cifar_lightning/weights/NAME.safetensors`` in float16
(``cifar-export --half``), scores that file on the whole test set and on the fixed check subset
(``bundled.check_subset``), and writes its record into ``weights/index.json``: what
``tests/test_bundled.py`` re-measures and what docs/pretrained.md quotes.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
from pathlib import Path

import torch

from cifar_lightning import bundled, calibration
from cifar_lightning.data import load_splits
from cifar_lightning.export import export_command
from cifar_lightning.fileio import atomic_write_text, sha256_of
from cifar_lightning.inference import load_classifier
from cifar_lightning.runs import RESULTS


def accuracy(model: Path, images: torch.Tensor, labels: torch.Tensor) -> float:
    probs = load_classifier(model).probabilities(images, batch_size=500)
    return calibration.accuracy(probs, labels)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("name")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--command", required=True, help="the command that trained the run, as the record quotes it")
    p.add_argument("--machine", required=True, help="where it trained")
    p.add_argument("--figures", type=Path, help="a JSON object of further measured figures to record (e.g. JPEG, corruptions)")
    args = p.parse_args()

    results = json.loads((args.run_dir / RESULTS).read_text())
    ckpt = Path(results["best_checkpoint"])
    out = bundled.folder() / f"{args.name}.safetensors"
    export_command(ckpt, "safetensors", out, overwrite=True, data_dir=args.data_dir, half=True)
    test = load_splits(args.data_dir, download=False)["test"]
    subset = torch.tensor(bundled.check_subset(len(test.labels)))
    record = {
        "file": out.name,
        "sha256": sha256_of(out),
        "size_bytes": os.path.getsize(out),
        "sidecar_sha256": sha256_of(out.with_name(out.name + ".json")),
        "weights_dtype": "float16",
        "command": args.command,
        "seed": results["config"]["seed"],
        "preset": results["config"]["preset"],
        "trained_on": args.machine,
        "trained": datetime.date.today().isoformat(),
        "run_test_acc": results["test_acc"],  # the float32 checkpoint, in its run's own test
        "test_acc": accuracy(out, test.images, test.labels),  # this float16 file, all 10,000 test images
        "check_acc": accuracy(out, test.images[subset], test.labels[subset]),  # on bundled.check_subset
        "test_ece": results["test_ece"],
        "temperature": (results.get("calibration") or {}).get("temperature"),
        "train_seconds": sum(results["train_seconds"]),
        **(json.loads(args.figures.read_text()) if args.figures else {}),
    }
    index = bundled.index()
    index[args.name] = record
    atomic_write_text(bundled.folder() / "index.json", json.dumps(index, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
