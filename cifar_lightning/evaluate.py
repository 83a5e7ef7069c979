"""Evaluate a model file (checkpoint or export) on a split: the data of its run, the one
inference path (``inference.Classifier``, test-time views included) and the full report.

    cifar-evaluate lightning_logs/version_0/checkpoints/last.ckpt
    cifar-evaluate model.onnx --data-dir ../shared/data/cifar10

A checkpoint and its exports evaluated this way score the same accuracy: whatever the user
takes away is measured by the same code that measured the checkpoint.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path
from typing import Any

import torch

from cifar_lightning import bundled, report
from cifar_lightning import corruptions as corruption
from cifar_lightning.calibration import accuracy, ece
from cifar_lightning.data import CIFAR10DataModule
from cifar_lightning.devices import device_for
from cifar_lightning.errors import ConfigError, DataError, shown_names
from cifar_lightning.fileio import atomic_dir, claim_free_dir, refuse_overlap, sha256_of
from cifar_lightning.inference import Classifier, load_classifier
from cifar_lightning.recipes import MAX_SEED, default
from cifar_lightning.runs import recorded_data_dir, run_dir_of, saved_run_config


def source_checkpoint(model_path: Path, clf: Classifier) -> Path:
    """The checkpoint a model file came from: itself, or the one its export metadata names."""
    src = clf.info.get("source_checkpoint")
    return Path(src) if isinstance(src, str) and clf.info.get("kind") != "checkpoint" else model_path


def report_dir(model_path: Path, run_dir: Path | None, out: str | None, overwrite: bool) -> Path:
    """--out as given (refusing to replace a non-empty one without --overwrite), else report/
    beside a checkpoint's run, else <file>_report beside the file; _2, _3... when taken (the
    default is claimed at once, so two evaluations never write the same folder)."""
    if out:
        path = Path(out)
        if path.is_symlink():
            raise ConfigError(f"--out {path}: a symbolic link; give the folder it points to ({Path(out).resolve()}) or another path")
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--out {path}: exists and is not a folder")
        if path.exists() and any(path.iterdir()) and not overwrite:
            raise ConfigError(f"--out {path}: exists and is not empty; pass --overwrite or choose another folder")
        return path
    return claim_free_dir(default_report_base(model_path, run_dir))


def default_report_base(model_path: Path, run_dir: Path | None) -> Path:  # run_dir: a checkpoint's own run
    """report/ in a checkpoint's run, else <file>_report beside the file (before any _2, _3); a
    bundled model's in the current folder (never inside the installed package)."""
    if model_path.parent == bundled.folder():
        return Path(f"pretrained_{model_path.stem}_report")
    if run_dir is not None:
        return run_dir / "report"
    return model_path.with_name(f"{model_path.stem}_report")


def corruption_names(spec: str | None) -> list[str]:
    """--corruptions all | a comma-separated list of names -> the names (ConfigError if unknown)."""
    if spec is None:
        return []
    known = corruption.CORRUPTIONS
    names = list(known) if spec == "all" else [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise ConfigError(f"--corruptions {spec[:80]!r}: choose all or from {', '.join(known)}")
    return list(dict.fromkeys(names))


def score_corruptions(clf: Classifier, images: torch.Tensor, labels: torch.Tensor, seed: int = 0, batch_size: int = 500,
                      names: list[str] | None = None) -> dict[str, list[dict[str, Any]]]:  # fmt: skip
    """Accuracy and ECE on every corrupted copy of the images (``corruptions.SEVERITIES``)."""
    results: dict[str, list[dict[str, Any]]] = {}
    for name, severity in corruption.all_levels():
        if names is not None and name not in names:
            continue
        t0 = time.perf_counter()
        probs = clf.probabilities(corruption.corrupt(images, name, severity, seed), batch_size)
        row = {
            "severity": severity, "label": corruption.severity_label(name, severity),
            "accuracy": accuracy(probs, labels), "ece": ece(probs, labels),
        }  # fmt: skip
        results.setdefault(name, []).append(row)
        print(f"  {name} {row['label']}: accuracy {row['accuracy']:.4f}, ECE {row['ece']:.4f} "
              f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)  # fmt: skip
    return results


def split_images(clf: Classifier, data_dir: str, split: str, run_cfg: dict[str, Any], download: bool) -> Any:
    """The images of the split, as the model's run split them; refused if their classes are not the model's."""
    dm = CIFAR10DataModule(
        data_dir=data_dir, val_size=run_cfg.get("val_size", default("val_size")),
        split_seed=run_cfg.get("split_seed", default("split_seed")),
        source=run_cfg.get("data_source", "auto") if data_dir == run_cfg.get("data_dir") else "auto", download=download,
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("fit" if split == "val" else "test")
    ds = dm.val_set if split == "val" else dm.test_set
    if list(clf.class_names) != list(dm.classes):
        # Same count is not enough: 3 other names would be scored against the wrong labels.
        ours, theirs = shown_names(list(dm.classes)), shown_names(list(clf.class_names))
        raise DataError(f"--data-dir {data_dir}: its classes ({ours}) are not the model's ({theirs})")
    if len(ds) == 0 and split == "val":
        raise DataError(f"--split val: the model's run held out no validation images (val_size {dm.hparams.val_size}); "
                        "score --split test")  # fmt: skip
    if len(ds) == 0:
        raise DataError(f"--split {split}: no images to evaluate")
    return ds


def evaluate(model: str | Path, data_dir: str | None = None, split: str = "test", out: str | None = None, overwrite: bool = False,
             device: str = "cpu", batch_size: int = 500, grid: int = 25, download: bool = True, calibrate: bool = True,
             corruptions: str | None = None, seed: int = 0) -> tuple[Path, dict[str, Any]]:  # fmt: skip
    """Classify every image of the split with the model file and write the report. Returns
    (report folder, metrics). ``calibrate=False`` scores the raw probabilities; ``corruptions``
    ('all' or names, comma-separated) also scores corrupted copies of the split (``corruptions.py``)."""
    names = corruption_names(corruptions)
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"--seed {str(seed)[:30]}: must be an integer from 0 to {MAX_SEED}")
    clf = load_classifier(model, device=device, calibrate=calibrate)  # refuses unsafe or foreign files before anything else
    model_path = Path(clf.source)  # pretrained:NAME -> the bundled file
    source = source_checkpoint(model_path, clf)
    run_cfg = saved_run_config(source, known_only=True)
    run_dir = run_dir_of(source) if run_cfg else None
    own_run = run_dir if clf.info.get("kind") == "checkpoint" else None  # an export's report goes beside the export
    if split == "val" and not run_cfg:
        raise ConfigError(f"--split val: {model_path} does not lead to its training run (config.yaml), so its validation split is unknown")
    data_dir = recorded_data_dir(source, data_dir) or "data"
    if out:
        refuse_overlap(Path(out), {"model file": model_path, "source checkpoint": source, "training run": run_dir,
                                   "data dir": Path(data_dir)}, inside={"data dir": Path(data_dir)})  # fmt: skip
        report_dir(model_path, own_run, out, overwrite)  # a bad --out is refused before the work, not after it
    else:  # the default folder, beside a model file kept inside the data, would add its PNGs to the data
        refuse_overlap(default_report_base(model_path, own_run), {"data dir": Path(data_dir)}, inside={"data dir": Path(data_dir)},
                       flag="the report folder")  # fmt: skip
    # A given --out is checked before the work; a default folder is claimed only once there is a report to put in it.
    target = report_dir(model_path, own_run, out, overwrite) if out else None

    ds = split_images(clf, data_dir, split, run_cfg, download)
    clean = clf.score(ds.images, ds.labels, batch_size)  # the one scoring path, as a run's own test
    probs, raw_probs = clean["probs"], clean["raw_probs"] if clf.calibrated else None  # the same predictions, T = 1
    scored = score_corruptions(clf, ds.images, ds.labels, seed, batch_size, names) if names else None
    meta = {"model": clf.info.get("model"), "checkpoint": str(model_path), "checkpoint_sha256": sha256_of(model_path),
            "model_file": str(model_path), "tta": clf.tta, "temperature": clf.temperature, "calibrated": clf.calibrated,
            "split": split, "data_dir": str(data_dir)}  # fmt: skip
    claimed = target is None
    target = target or report_dir(model_path, own_run, None, overwrite)

    def write(tmp: Path) -> dict[str, Any]:
        return report.write_report(tmp, probs, ds.labels, ds.images, clf.class_names, meta, run_dir=run_dir, grid=grid,
                                   raw_probs=raw_probs, corruptions=scored)  # fmt: skip

    try:
        metrics = atomic_dir(target, write, replace=overwrite)
    except BaseException:
        if claimed:  # a folder this run claimed and never filled (an error, a full disk, SIGTERM) is given back
            with contextlib.suppress(OSError):
                target.rmdir()
        raise
    return target, metrics



def evaluate_command(model: str, data_dir: str | None = None, split: str = "test", out: str | None = None, overwrite: bool = False,
                     accelerator: str = "auto", batch_size: int = 500, grid: int = 25, download: bool = True,
                     calibrate: bool = True, corruptions: str | None = None, seed: int = 0) -> int:  # fmt: skip
    """cifar-evaluate: evaluate, then print the table and where the report is; the exit status."""
    target, metrics = evaluate(model, data_dir, split, out, overwrite, device_for(accelerator), batch_size, grid, download,
                               calibrate=calibrate, corruptions=corruptions, seed=seed)  # fmt: skip
    print(report.format_table(metrics))
    print(f"\nreport: {target / 'report.md'}")
    return 0
