"""A training run on disk: the one place that knows its folder layout and what it recorded.

    LOG_DIR/version_N/
        config.yaml              the exact recipe (``cifar-train --config`` takes it back)
        results.json             test figures, the tested checkpoint, versions
        checkpoints/last.ckpt    the newest state (``--resume`` continues from it)
        checkpoints/best-*.ckpt  the best by val_acc, when there is a validation split
        report/                  what ``cifar-evaluate`` writes by default

Also the recipe of a run that continues or refits another (``resolve_recipe``), and the
metadata file beside every export (``sidecar_path``). Imports no torch: ``--help`` loads it.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

from cifar_lightning import bundled
from cifar_lightning.errors import CheckpointError, ConfigError, DataError
from cifar_lightning.fileio import claim_new_dir
from cifar_lightning.recipes import TrainConfig, build, read_yaml

CHECKPOINTS = "checkpoints"
LAST = "last.ckpt"
CONFIG = "config.yaml"
RESULTS = "results.json"
SIDECAR_FORMAT = "cifar-lightning-export"


def checkpoints_dir(run: Path) -> Path:
    return Path(run) / CHECKPOINTS


def last_checkpoint(run: Path) -> Path:
    """The run's newest state, what ``--resume`` continues from."""
    return checkpoints_dir(run) / LAST


def sidecar_path(model_path: Path) -> Path:
    """model.onnx -> model.onnx.json: one metadata file beside every exported model."""
    return model_path.with_name(model_path.name + ".json")


def version_of(run_dir: Path) -> int | None:
    m = re.fullmatch(r"version_(\d+)", run_dir.name)
    return int(m.group(1)) if m else None


def run_dir_of(ckpt_path: Path) -> Path | None:
    """LOG_DIR/version_N for a checkpoint in LOG_DIR/version_N/checkpoints/ (with its
    config.yaml), else None."""
    run = ckpt_path.parent.parent
    if ckpt_path.parent.name == CHECKPOINTS and (run / CONFIG).is_file():
        return run
    return None


def run_dir_of_resumed(ckpt_path: Path) -> Path:
    """The run a ``--resume`` checkpoint belongs to; refused unless it lies in the layout."""
    run = ckpt_path.parent.parent
    if version_of(run) is None or ckpt_path.parent.name != CHECKPOINTS:
        raise ConfigError(f"--resume {ckpt_path}: expected a checkpoint inside LOG_DIR/version_N/{CHECKPOINTS}/")
    return run


def find_last_checkpoint(log_dir: Path) -> Path:
    """The newest run's last.ckpt under log_dir (for --resume last)."""
    found = sorted((v, p) for p in (log_dir.iterdir() if log_dir.is_dir() else []) if (v := version_of(p)) is not None)
    for _, run in reversed(found):
        if last_checkpoint(run).is_file():
            return last_checkpoint(run)
    raise CheckpointError(f"--resume last: no run with {CHECKPOINTS}/{LAST} under {log_dir}")


def claim_new_run_dir(log_dir: Path) -> Path:
    """LOG_DIR/version_N with the next free N."""
    return claim_new_dir(log_dir, "version_{}", "--log-dir")


def saved_run_config(ckpt_path: Path, known_only: bool = False) -> dict[str, Any]:
    """The config.yaml of the run that wrote this checkpoint ({} if none or unreadable).
    ``known_only``: a record from another version keeps the options this one knows (its data
    dir, its split, its preset), which is all that scoring or a refit needs; a resume needs the
    whole recipe."""
    run = run_dir_of(ckpt_path)
    if run is None:
        return {}
    try:
        return read_yaml(run / CONFIG, "config", known_only=known_only)
    except ConfigError:
        return {}


def known_test_accuracy(ckpt_path: Path) -> float | None:
    """The run's test accuracy from results.json, when this checkpoint is the one it tested."""
    run = run_dir_of(ckpt_path)
    try:
        r = json.loads((run / RESULTS).read_text()) if run else {}
        if Path(r["best_checkpoint"]).name == ckpt_path.name:
            return float(r["test_acc"])
    except (OSError, ValueError, KeyError, TypeError):
        pass
    return None


def recorded_data_dir(ckpt_path: Path, given: str | None) -> str | None:
    """The data dir a command on this checkpoint reads: the one given, else the one its run
    recorded. A recorded one that is gone is an error: never download into a folder the run
    merely recorded (and leave a copy of CIFAR-10 behind)."""
    if given:
        return given
    recorded = saved_run_config(ckpt_path, known_only=True).get("data_dir")
    if recorded and not Path(recorded).is_dir():
        raise DataError(f"the run's data dir {recorded} is gone; pass --data-dir")
    return recorded


def resolve_recipe(given: dict[str, Any]) -> TrainConfig:
    """The recipe of a run from what the user gave (--config values, then flags on top).

    A resumed run keeps its own saved configuration (init_from included, as a record of where
    its weights came from); a refit (--init-from) continues the recipe of the run it starts
    from unless it names a model."""
    given = dict(given)
    if given.get("resume") and given.get("init_from"):
        raise ConfigError("--resume and --init-from exclude each other: resume continues a run, init-from starts a new one")
    saved: dict[str, Any] | None = None
    if given.get("resume"):
        log_dir = Path(given.get("log_dir") or TrainConfig.model_fields["log_dir"].default)
        ckpt = find_last_checkpoint(log_dir) if given["resume"] == "last" else Path(given["resume"])
        saved = saved_run_config(ckpt)
        if not saved and ckpt.is_file():
            raise ConfigError(f"--resume {ckpt}: its run has no readable {CONFIG} (LOG_DIR/version_N/{CONFIG}), so the recipe it "
                              "trains is unknown; resume inside the run's folder")  # fmt: skip
        given["resume"] = str(ckpt)
    init = given.get("init_from")
    # A refit takes only the recipe's name from its record: the options this version knows will do.
    refit_of = (bundled.recipe_of(init) if bundled.is_bundled(init) else saved_run_config(Path(init), known_only=True)) if init else None
    cfg = build(given, saved, refit_of)
    # Paths are recorded absolute: a run's config.yaml, and the evaluate/export commands that
    # read it, must not depend on the directory they are started from.
    for key in ("data_dir", "log_dir", "init_from", "resume"):
        if getattr(cfg, key) and not bundled.is_bundled(getattr(cfg, key)):
            setattr(cfg, key, os.path.abspath(os.path.expanduser(getattr(cfg, key))))
    return cfg
