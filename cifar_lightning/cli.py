"""Command-line entry points. Thin: parse, build, run, report; every failure is one line.

    cifar-train --data-dir ../shared/data/cifar10                       # the seed recipe
    cifar-train --data-dir ../shared/data/cifar10 --init-from RUN/checkpoints/last.ckpt --augment seed --epochs 10
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import shutil
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import yaml

from cifar_lightning.augment import AUGMENTS, SEED_DEFAULTS, STANDARD_DEFAULTS

# Resolved in this order, later wins:
#   TRAIN_DEFAULTS < PRESETS[preset] < (resumed run's config) < --config < flags.
TRAIN_DEFAULTS: dict[str, Any] = {
    "preset": None,
    "model": "seed",
    "epochs": 20,
    "batch_size": 64,
    "lr": 1e-3,
    "optimizer": "adam",
    "weight_decay": 0.0,
    "schedule": "none",
    "label_smoothing": 0.0,
    "momentum": 0.9,
    "norm_bias_lr_scale": 1.0,
    "warmup_fraction": 0.2,
    "whiten_bias_epochs": 0,
    "widths": None,
    "tta": 0,
    "lookahead": False,
    "checkpoint_every_steps": 0,
    "strategy": "auto",
    "num_nodes": 1,
    "augment": "none",
    "accelerator": "auto",
    "devices": "auto",
    "precision": "32-true",
    "seed": 0,
    "deterministic": False,
    "data_dir": "data",
    "data_source": "auto",
    "download": True,
    "val_size": 5000,
    "split_seed": 0,
    "limit_train_images": None,
    "max_time": None,
    "resume": None,
    "init_from": None,
    "log_dir": "lightning_logs",
    "num_workers": 0,
    "channels_last": True,
    "progress_bar": None,
    "log_images_every": 1,
    # augmentation ranges; None = the recipe's default (augment.SEED_DEFAULTS / STANDARD_DEFAULTS)
    "shift": None,
    "flip": None,
    "zoom": None,
    "rotation": None,
    "brightness": None,
    "crop_padding": None,
}
# A preset is a whole recipe: network, epochs, optimiser, schedule, augmentation, precision.
# Flags and --config still override any of its values. "seed" is the Keras notebook.
# The fast presets train on all 50,000 training images (val_size 0): their schedule is fixed in
# advance, so there is nothing for a validation split to choose, and the test set is still only
# read once, at the end. Every figure behind them is in README ("The fast recipe").
_FAST: dict[str, Any] = {
    "model": "fast",
    "widths": [64, 256, 256],
    "batch_size": 1024,
    "optimizer": "sgd",
    "lr": 1.5,  # for the batch-mean loss at batch 1024 (airbench's 11.5 per 1024 summed examples)
    "momentum": 0.85,
    "weight_decay": 1.33e-3,  # x lr 1.5 = 0.002 decay per step, airbench's decoupled 0.0153 per 1024
    "norm_bias_lr_scale": 64.0,  # BatchNorm shifts learn 64x faster
    "schedule": "triangle",
    "warmup_fraction": 0.2,
    "label_smoothing": 0.2,
    "whiten_bias_epochs": 3,
    "augment": "standard",
    "crop_padding": 2,
    "tta": 2,
    "val_size": 0,
    "precision": "auto",  # bf16-mixed where the CPU or GPU runs bf16 natively, else 32-true
    "log_images_every": 0,
}
PRESETS: dict[str, dict[str, Any]] = {
    "seed": {"model": "seed", "epochs": 20, "batch_size": 64, "optimizer": "adam", "lr": 1e-3, "augment": "none"},
    "90": {**_FAST, "epochs": 6, "widths": [32, 128, 128]},
    "93": {**_FAST, "epochs": 8},
    "94": {**_FAST, "epochs": 13},
}
DEFAULT_PRESET = "94"

AUG_OPTIONS = ("shift", "flip", "zoom", "rotation", "brightness", "crop_padding")
PRECISIONS = ("auto", "64-true", "64", "32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true")
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


class TrainingFailedError(Exception):
    """Training could not go on (e.g. a non-finite loss): one line, exit status 1."""


class RunInterruptedError(Exception):
    """Stopped by a signal after saving what there was to save: one line, exit 128 + signal."""

    def __init__(self, message: str, code: int) -> None:
        super().__init__(message)
        self.code = code


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage dump) and exits with 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _devices(text: str) -> int | str:
    if text == "auto" or re.fullmatch(r"\d+(,\d+)*,?", text) and "," in text:
        return text
    if text == "-1":
        return -1
    try:
        return _positive_int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto', a count or a list like '0,1', got {text!r}") from None


def _widths(text: str) -> list[int]:
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        widths = []
    if len(widths) != 3 or min(widths) < 1:
        raise argparse.ArgumentTypeError(f"expected three positive channel counts like 64,256,256, got {text!r}")
    return widths


def parse_max_time(value: str | int | float | None) -> dt.timedelta | None:
    """Seconds ('1800'), or Lightning's 'DD:HH:MM:SS' / 'HH:MM:SS' / 'MM:SS'."""
    if value is None:
        return None
    text = str(value).strip()
    try:
        if ":" not in text:
            seconds = float(text)
        else:
            parts = [float(p) for p in text.split(":")]
            if len(parts) > 4:
                raise ValueError
            seconds = 0.0
            for unit, p in zip((1, 60, 3600, 86400), reversed(parts), strict=False):
                seconds += unit * p
    except ValueError:
        raise CLIError(f"--max-time: expected seconds or DD:HH:MM:SS, got {text!r}") from None
    if seconds <= 0:
        raise CLIError(f"--max-time must be positive, got {text!r}")
    return dt.timedelta(seconds=seconds)


def add_augment_ranges(g: argparse._ArgumentGroup) -> None:
    """The per-op range flags, shared by cifar-train and cifar-show-data."""
    sd = SEED_DEFAULTS
    g.add_argument("--shift", type=_non_negative_float, help=f"seed: max shift, fraction of side (default {sd['shift']})")
    g.add_argument("--flip", type=_non_negative_float, help=f"seed/standard: flip probability (default {sd['flip']})")
    g.add_argument("--zoom", type=_non_negative_float, help=f"seed: scale range 1±zoom (default {sd['zoom']})")
    g.add_argument("--rotation", type=_non_negative_float, help=f"seed: max degrees (default {sd['rotation']})")
    g.add_argument("--brightness", type=_non_negative_float, help=f"seed: factor range 1±b (default {sd['brightness']})")
    g.add_argument(
        "--crop-padding", type=_non_negative_int, help=f"standard: pad px (default {STANDARD_DEFAULTS['crop_padding']}; fast presets 2)"
    )


def _by_preset(key: str) -> str:
    """Help text: what each preset sets this option to, e.g. '(94: 10, 93: 7, 90: 6, seed: 20)'."""
    values = [f"{name}: {' '.join(str(v) for v in value) if isinstance(value := {**TRAIN_DEFAULTS, **preset}[key], list) else value}"
              for name, preset in sorted(PRESETS.items(), key=lambda kv: kv[0] != DEFAULT_PRESET)]  # fmt: skip
    return f"({', '.join(values)})"


def train_parser() -> argparse.ArgumentParser:
    d = TRAIN_DEFAULTS
    b = _by_preset
    p = OneLineParser(
        prog="cifar-train",
        description="Train a CIFAR-10 classifier with PyTorch Lightning, then test it on the official test set.",
        argument_default=argparse.SUPPRESS,  # only flags actually given override the config
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help="YAML file with any of these options (keys as flag names, - or _)")
    p.add_argument(
        "--preset", choices=tuple(PRESETS),
        help=f"a whole recipe: 90/93/94 (the fast network, aimed at that test accuracy) or seed (the Keras notebook); "
        f"flags override its values (default {DEFAULT_PRESET}, or seed with --model seed)",
    )  # fmt: skip

    g = p.add_argument_group("model and optimisation")
    g.add_argument("--model", help=f"network name {b('model')}")
    g.add_argument("--epochs", type=_positive_int, help=b("epochs"))
    g.add_argument("--batch-size", type=_positive_int, help=b("batch_size"))
    g.add_argument("--lr", type=_positive_float, help=f"learning rate {b('lr')}")
    g.add_argument("--optimizer", choices=("adam", "adamw", "sgd"), help=b("optimizer"))
    g.add_argument("--weight-decay", type=_non_negative_float, help=b("weight_decay"))
    g.add_argument("--schedule", choices=("none", "cosine", "onecycle", "triangle"),
                   help=f"per-step learning-rate schedule; triangle: warm-up then linear decay to 0 {b('schedule')}")
    g.add_argument("--label-smoothing", type=_non_negative_float, help=b("label_smoothing"))
    g.add_argument("--momentum", type=_non_negative_float, help=f"SGD (Nesterov) momentum {b('momentum')}")
    g.add_argument("--widths", type=_widths, help=f"fast network: channels of its three conv groups, e.g. 64,256,256 {b('widths')}")
    g.add_argument("--lookahead", dest="lookahead", action="store_true", help="lookahead weight averaging (airbench's)")
    g.add_argument("--no-lookahead", dest="lookahead", action="store_false")
    g.add_argument(
        "--tta", type=int, choices=(0, 1, 2),
        help=f"test-time augmentation of the final test: 0 none, 1 mirror, 2 mirror+translate {b('tta')}",
    )

    g = p.add_argument_group("data")
    g.add_argument("--data-dir", help=f"CIFAR-10 folder: image-folder tree or torchvision's (default {d['data_dir']})")
    g.add_argument("--data-source", choices=("auto", "imagefolder", "cifar10"), help="force the source kind (default auto)")
    g.add_argument("--no-download", dest="download", action="store_false", help="never download CIFAR-10")
    g.add_argument("--val-size", type=_non_negative_int, help=f"training images held out for validation {b('val_size')}")
    g.add_argument("--split-seed", type=int, help="seed of the fixed train/val split (default 0)")
    g.add_argument("--limit-train-images", type=_positive_int, help="train on the first N images of the split")
    g.add_argument("--num-workers", type=_non_negative_int, help="DataLoader workers; data is in memory (default 0)")

    g = p.add_argument_group("augmentation (on the device, training batches only)")
    g.add_argument("--augment", choices=AUGMENTS, help=f"none | seed (the notebook's ops) | standard (crop+flip) {b('augment')}")
    add_augment_ranges(g)

    g = p.add_argument_group("trainer")
    g.add_argument("--accelerator", choices=ACCELERATORS, help="(default auto)")
    g.add_argument("--devices", type=_devices, help="device count or ids (default auto)")
    g.add_argument("--strategy", help="Lightning strategy: auto, ddp, ddp_spawn, fsdp... (default auto)")
    g.add_argument("--num-nodes", type=_positive_int, help="machines for multi-node DDP (torchrun/SLURM set the rest) (default 1)")
    g.add_argument(
        "--precision", choices=PRECISIONS, help=f"auto: bf16-mixed where the hardware has native bf16, else 32-true {b('precision')}"
    )
    g.add_argument("--seed", type=int, help=f"seed for init, shuffling, augmentation (default {d['seed']})")
    g.add_argument("--deterministic", action="store_true", help="use deterministic algorithms")
    g.add_argument("--max-time", help="stop after this long: seconds or DD:HH:MM:SS")
    g.add_argument("--channels-last", dest="channels_last", action="store_true", help="NHWC memory (default, ~15%% faster on CPU)")
    g.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    g.add_argument("--progress-bar", dest="progress_bar", action="store_true", help="default: on when stderr is a terminal")
    g.add_argument("--no-progress-bar", dest="progress_bar", action="store_false")

    g = p.add_argument_group("runs and checkpoints")
    g.add_argument("--log-dir", help=f"runs go to LOG_DIR/version_N (default {d['log_dir']})")
    g.add_argument(
        "--log-images-every", type=_non_negative_int, metavar="K",
        help="log a confusion heatmap and prediction grid to TensorBoard every K validation epochs; 0: never (default 1)",
    )  # fmt: skip
    g.add_argument(
        "--checkpoint-every-steps", type=_non_negative_int, metavar="N",
        help="also save last.ckpt every N training steps, so a kill loses at most N steps (default 0: each epoch)",
    )  # fmt: skip
    g.add_argument("--resume", metavar="PATH|last", help="continue a run from its checkpoint ('last': newest run's last.ckpt)")
    g.add_argument("--init-from", metavar="CKPT", help="start a NEW run from these weights (e.g. refit with augmentation)")
    return p


def _read_yaml_config(path: str) -> dict[str, Any]:
    try:
        with open(path) as f:
            raw = yaml.safe_load(f) or {}
    except OSError as e:
        raise CLIError(f"--config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise CLIError(f"--config {path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(raw, dict):
        raise CLIError(f"--config {path}: expected a mapping of option: value")
    cfg = {str(k).replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(cfg) - set(TRAIN_DEFAULTS))
    if unknown:
        raise CLIError(f"--config {path}: unknown option(s) {', '.join(unknown)}")
    return cfg


def _check_config_values(cfg: dict[str, Any]) -> None:
    """Values that came from YAML skipped argparse's checks: check the ones that matter here."""
    for key in ("epochs", "batch_size"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise CLIError(f"--{key.replace('_', '-')} must be an integer >= 1, got {cfg[key]!r}")
    if not isinstance(cfg["val_size"], int) or cfg["val_size"] < 0:
        raise CLIError(f"--val-size must be an integer >= 0, got {cfg['val_size']!r}")
    if cfg["precision"] not in PRECISIONS:
        raise CLIError(f"--precision {cfg['precision']!r}: choose from {', '.join(PRECISIONS)}")
    if cfg["accelerator"] not in ACCELERATORS:
        raise CLIError(f"--accelerator {cfg['accelerator']!r}: choose from {', '.join(ACCELERATORS)}")
    if cfg["augment"] not in AUGMENTS:
        raise CLIError(f"--augment {cfg['augment']!r}: choose from {', '.join(AUGMENTS)}")
    from cifar_lightning.models import MODELS

    if cfg["model"] not in MODELS:
        raise CLIError(f"--model {cfg['model']!r}: unknown; choose from {', '.join(sorted(MODELS))}")


def _version_of(run_dir: Path) -> int | None:
    m = re.fullmatch(r"version_(\d+)", run_dir.name)
    return int(m.group(1)) if m else None


def find_last_checkpoint(log_dir: Path) -> Path:
    """The newest run's last.ckpt under log_dir (for --resume last)."""
    runs = sorted(
        (v, p) for p in (log_dir.iterdir() if log_dir.is_dir() else []) if (v := _version_of(p)) is not None
    )
    for _, run in reversed(runs):
        if (run / "checkpoints" / "last.ckpt").is_file():
            return run / "checkpoints" / "last.ckpt"
    raise CLIError(f"--resume last: no run with checkpoints/last.ckpt under {log_dir}")


def claim_new_run_dir(log_dir: Path) -> Path:
    """Create LOG_DIR/version_N with the next free N; mkdir is atomic, so two runs started at
    once never share (and overwrite) a directory."""
    try:
        log_dir.mkdir(parents=True, exist_ok=True)
        taken = [v for p in log_dir.iterdir() if (v := _version_of(p)) is not None]
    except OSError as e:
        raise CLIError(f"--log-dir {log_dir}: cannot create or read it ({e.strerror})") from None
    n = max(taken, default=-1) + 1
    while True:
        run = log_dir / f"version_{n}"
        try:
            run.mkdir()
            return run
        except FileExistsError:
            n += 1
        except OSError as e:
            raise CLIError(f"--log-dir {log_dir}: cannot create a run directory there ({e.strerror})") from None


def launch_rank() -> int:
    """This process's rank as its launcher set it before Lightning starts: 0 for a plain run and
    for the process that Lightning's DDP launcher starts from; torchrun, SLURM and Lightning's
    launcher set these variables for the others."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        value = os.environ.get(key, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0


def _implied_preset(cfg: dict[str, Any]) -> str:
    """The preset a configuration names, or implies by its model (runs saved before presets
    existed were all the seed recipe)."""
    return cfg.get("preset") or ("seed" if cfg.get("model") == "seed" else DEFAULT_PRESET)


def resolve_train_config(argv: list[str] | None) -> dict[str, Any]:
    args = vars(train_parser().parse_args(argv))
    file_cfg = _read_yaml_config(args.pop("config")) if "config" in args else {}
    given = {**file_cfg, **args}
    if given.get("resume") and given.get("init_from"):
        raise CLIError("--resume and --init-from exclude each other: resume continues a run, init-from starts a new one")
    saved_cfg: dict[str, Any] = {}
    if given.get("resume"):
        # A resumed run keeps its own saved configuration (init_from included, as a record of
        # where its weights came from); options given now still override it.
        log_dir = Path(given.get("log_dir", TRAIN_DEFAULTS["log_dir"]))
        ckpt = find_last_checkpoint(log_dir) if given["resume"] == "last" else Path(given["resume"])
        saved = ckpt.parent.parent / "config.yaml"
        if saved.is_file():
            saved_cfg = _read_yaml_config(str(saved))
        given["resume"] = str(ckpt)
    preset = given.get("preset")
    if not preset and saved_cfg:
        preset = _implied_preset(saved_cfg)
    elif not preset and given.get("init_from") and "model" not in given:
        # A refit continues the recipe of the run it starts from (its network and widths).
        preset = _implied_preset(run_config_of(Path(given["init_from"])) or {"model": given.get("model")})
    preset = preset or _implied_preset({"model": given.get("model")})
    if preset not in PRESETS:
        raise CLIError(f"--preset {preset!r}: choose from {', '.join(PRESETS)}")
    cfg = {**TRAIN_DEFAULTS, **PRESETS[preset], "preset": preset, **saved_cfg, **given}
    _check_config_values(cfg)
    return cfg


def _quiet_lightning() -> None:
    """Silence warnings that do not apply to this design (in-memory data needs no workers)."""
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*")


def resolve_precision(precision: str, accelerator: str) -> str:
    """'auto': bf16-mixed where the hardware computes in bf16 natively (CPUs with AVX512-BF16 or
    AMX, where it trains the fast network about twice as fast as fp32; Ampere or newer GPUs),
    else 32-true. Emulated bf16 would be slower than fp32."""
    if precision != "auto":
        return precision
    import torch

    on_gpu = accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())
    if on_gpu:
        return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "16-mixed"
    if accelerator == "mps" or (accelerator == "auto" and torch.backends.mps.is_available()):
        return "32-true"
    return "bf16-mixed" if torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported() else "32-true"


def run_training(cfg: dict[str, Any], callbacks: list | None = None) -> dict[str, Any]:
    """Train, checkpoint, test on the official test set; returns the results written to
    results.json in the run directory. ``callbacks`` are added to the Trainer's (benchmarks
    use this to probe a run without changing it)."""
    import lightning as L
    import torch
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from cifar_lightning.callbacks import EpochReport, Lookahead, StepCheckpoint, StopOnSignal, TensorBoardImages
    from cifar_lightning.data import CIFAR10DataModule
    from cifar_lightning.module import (
        AtomicCheckpointIO,
        ImageClassifier,
        NonFiniteLossError,
        classifier_from_checkpoint,
        load_checkpoint,
    )  # fmt: skip

    t0 = time.perf_counter()
    _quiet_lightning()
    L.seed_everything(cfg["seed"], workers=True, verbose=False)
    aug_options = {k: cfg[k] for k in AUG_OPTIONS if cfg[k] is not None}
    dm = CIFAR10DataModule(
        data_dir=cfg["data_dir"], batch_size=cfg["batch_size"], val_size=cfg["val_size"],
        split_seed=cfg["split_seed"], limit_train_images=cfg["limit_train_images"], augment=cfg["augment"],
        augment_options=aug_options, source=cfg["data_source"], num_workers=cfg["num_workers"],
        download=cfg["download"], shuffle_seed=cfg["seed"],
    )  # fmt: skip
    # Data problems surface here, before a run directory exists.
    dm.prepare_data()
    dm.setup("fit")
    classes = list(dm.classes)

    resume_ckpt = None
    if cfg["resume"]:
        resume_ckpt = Path(cfg["resume"])
        ckpt = load_checkpoint(resume_ckpt)
        module = classifier_from_checkpoint(ckpt, resume_ckpt)
        run_dir = resume_ckpt.parent.parent
        if _version_of(run_dir) is None or resume_ckpt.parent.name != "checkpoints":
            raise CLIError(f"--resume {resume_ckpt}: expected a checkpoint inside LOG_DIR/version_N/checkpoints/")
    else:
        try:
            module = ImageClassifier(
                model=cfg["model"], num_classes=len(classes), lr=cfg["lr"], optimizer=cfg["optimizer"],
                weight_decay=cfg["weight_decay"], schedule=cfg["schedule"], momentum=cfg["momentum"],
                label_smoothing=cfg["label_smoothing"], class_names=classes,
                model_args={"widths": list(cfg["widths"])} if cfg["widths"] and cfg["model"] == "fast" else None,
                norm_bias_lr_scale=cfg["norm_bias_lr_scale"], warmup_fraction=cfg["warmup_fraction"],
                whiten_bias_epochs=cfg["whiten_bias_epochs"], tta=cfg["tta"],
            )  # fmt: skip
        except ValueError as e:
            raise CLIError(str(e)) from None
        if cfg["init_from"]:
            src = load_checkpoint(cfg["init_from"])
            if src["hyper_parameters"]["model"] != cfg["model"]:
                raise CLIError(
                    f"--init-from {cfg['init_from']}: a {src['hyper_parameters']['model']!r} checkpoint "
                    f"cannot initialise --model {cfg['model']!r}"
                )
            try:
                module.net.load_state_dict({k[4:]: v for k, v in src["state_dict"].items() if k.startswith("net.")})
            except RuntimeError as e:
                raise CLIError(f"--init-from {cfg['init_from']}: weights do not fit ({str(e).splitlines()[0]})") from None
        # Under DDP only rank 0 claims a run directory; Lightning broadcasts its checkpoint
        # folder to the other processes, which write nothing of their own.
        run_dir = claim_new_run_dir(Path(cfg["log_dir"])) if launch_rank() == 0 else Path(cfg["log_dir"]) / f".rank{launch_rank()}"
    if cfg["channels_last"]:
        module = module.to(memory_format=torch.channels_last)
        module.channels_last = True

    if launch_rank() == 0:
        with open(run_dir / "config.yaml", "w") as f:
            yaml.safe_dump({k: v for k, v in cfg.items() if k != "resume"}, f, sort_keys=False)

    has_val = cfg["val_size"] > 0
    # Two callbacks, because Lightning's save_last only refreshes last.ckpt when the monitored
    # checkpoint is saved (i.e. when val_acc improves): last.ckpt must be the latest epoch.
    best = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="best-epoch{epoch:02d}-val_acc{val_acc:.4f}",
        monitor="val_acc", mode="max", auto_insert_metric_name=False,
    ) if has_val else None  # fmt: skip
    last = ModelCheckpoint(dirpath=run_dir / "checkpoints", filename="last", monitor=None, enable_version_counter=False)
    # Mid-epoch saves to the same last.ckpt, so a kill loses at most this many steps; the run
    # resumes from that exact step (see data.ResumableLoader and the module's RNG state).
    every = cfg["checkpoint_every_steps"]
    steps = StepCheckpoint(
        dirpath=run_dir / "checkpoints", filename="last", monitor=None, enable_version_counter=False,
        every_n_train_steps=every, save_on_train_epoch_end=False,
    ) if every else None  # fmt: skip
    stop = StopOnSignal(last)
    for stale in (run_dir / "checkpoints").glob(".*.tmp-*"):  # left by a run killed mid-write
        stale.unlink(missing_ok=True)
    progress = cfg["progress_bar"] if cfg["progress_bar"] is not None else sys.stderr.isatty()
    logger = TensorBoardLogger(save_dir=str(run_dir.parent), name="", version=run_dir.name, default_hp_metric=False)
    try:
        trainer = L.Trainer(
            max_epochs=cfg["epochs"], accelerator=cfg["accelerator"], devices=cfg["devices"],
            precision=resolve_precision(cfg["precision"], cfg["accelerator"]), deterministic=cfg["deterministic"],
            max_time=parse_max_time(cfg["max_time"]), strategy=cfg["strategy"], num_nodes=cfg["num_nodes"],
            logger=logger, plugins=[AtomicCheckpointIO()],
            callbacks=[
                *([best] if best else []), last, *([steps] if steps else []), stop, LearningRateMonitor("epoch"), EpochReport(),
                TensorBoardImages(classes, every_n_epochs=cfg["log_images_every"]),
                *([Lookahead()] if cfg["lookahead"] else []), *(callbacks or []),
            ],
            enable_progress_bar=progress, log_every_n_steps=10,
            **({} if has_val else {"limit_val_batches": 0, "num_sanity_val_steps": 0}),
            enable_model_summary=progress,
        )  # fmt: skip
    except BaseException:
        if not resume_ckpt:  # a new run that never started: leave no empty run directory behind
            shutil.rmtree(run_dir, ignore_errors=True)
        raise
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=str(resume_ckpt) if resume_ckpt else None)
    except SIGTERMException:
        name = stop.signal_name or "SIGTERM"
        where = f"at epoch {trainer.current_epoch + 1}, step {trainer.global_step}"
        code = 128 + int(getattr(signal, name))
        if stop.saved:
            hint = f"saved {stop.saved}; resume with: cifar-train --resume {stop.saved}"
            raise RunInterruptedError(f"stopped by {name} {where}; {hint}", code) from None
        raise RunInterruptedError(f"stopped by {name} {where}", code) from None
    except NonFiniteLossError as e:
        kept = last.last_model_path or (steps.last_model_path if steps else "")
        raise TrainingFailedError(f"{e}; stopped{f', the last good checkpoint is {kept}' if kept else ''}") from None
    if trainer.interrupted:
        raise CLIError(f"training interrupted; resume with: cifar-train --resume {run_dir / 'checkpoints' / 'last.ckpt'}")

    tested = best.best_model_path if best and best.best_model_path else last.last_model_path or last.best_model_path
    test_metrics = trainer.test(module, datamodule=dm, ckpt_path=tested, verbose=False)[0]
    wall = time.perf_counter() - t0
    report = next(c for c in trainer.callbacks if isinstance(c, EpochReport))
    results = {
        "test_acc": float(test_metrics["test_acc"]),
        "test_loss": float(test_metrics["test_loss"]),
        "best_val_acc": float(best.best_model_score) if best and best.best_model_score is not None else None,
        "best_checkpoint": str(tested),
        "last_checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
        "epochs_run": trainer.current_epoch,
        "epoch_seconds": report.epoch_seconds,
        "train_seconds": report.train_seconds,
        "wall_seconds": wall,
        "run_dir": str(run_dir),
        "config": cfg,
    }
    if trainer.is_global_zero:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
        # The HPARAMS tab of TensorBoard: this run's configuration next to its final metrics.
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in cfg.items()}
        final = {"hp/test_acc": results["test_acc"], "hp/test_loss": results["test_loss"]}
        if results["best_val_acc"] is not None:
            final["hp/best_val_acc"] = results["best_val_acc"]
        logger.log_hyperparams(hparams, final)
        logger.finalize("success")
    return {**results, "global_rank": trainer.global_rank}


def print_summary(r: dict[str, Any]) -> None:
    per_epoch = r["train_seconds"]
    mean_epoch = sum(per_epoch) / len(per_epoch) if per_epoch else float("nan")
    print(
        "\n"
        f"test accuracy   {r['test_acc']:.4f}   (official test set, {Path(r['best_checkpoint']).name})\n"
        f"test loss       {r['test_loss']:.4f}\n"
        f"wall time       {r['wall_seconds']:.1f} s   ({mean_epoch:.1f} s per training epoch, {len(per_epoch)} epochs this session)\n"
        f"best checkpoint {r['best_checkpoint']}\n"
        f"results         {Path(r['run_dir']) / 'results.json'}\n"
        f"watch it        tensorboard --logdir {Path(r['run_dir']).parent}"
    )


def _fail(prog: str, message: str, code: int) -> int:
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def train_main(argv: list[str] | None = None) -> int:
    """Entry point of cifar-train."""

    def body() -> int:
        results = run_training(resolve_train_config(argv))
        if results["global_rank"] == 0:
            print_summary(results)
        return 0

    return _guarded("cifar-train", body)


# ----------------------------------------------------------------------------- evaluate


def evaluate_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="cifar-evaluate",
        description="Evaluate a checkpoint: metrics.json, confusion heatmaps, prediction grids, "
        "calibration, training curves and report.md in one folder.",
    )
    p.add_argument("checkpoint", help="a Lightning .ckpt written by cifar-train")
    p.add_argument("--data-dir", help="default: the data dir of the checkpoint's run (its config.yaml), else 'data'")
    p.add_argument("--split", choices=("test", "val"), default="test", help="val = the run's held-out split (default test)")
    p.add_argument("--out", help="report folder (default: report/ beside the run's checkpoints/, report_2/... if taken)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--accelerator", choices=("cpu", "gpu", "cuda", "mps", "auto"), default="auto")
    p.add_argument("--batch-size", type=_positive_int, default=500)
    p.add_argument("--grid", type=_positive_int, default=25, help="images in predictions.png and misclassified.png")
    p.add_argument("--no-download", dest="download", action="store_false", help="never download CIFAR-10")
    return p


def pick_device(accelerator: str) -> str:
    """The torch device for a Lightning-style accelerator name; an unavailable one is an error."""
    import torch

    cuda, mps = torch.cuda.is_available(), torch.backends.mps.is_available()
    if accelerator in ("gpu", "cuda"):
        if not cuda:
            raise CLIError(f"--accelerator {accelerator}: no CUDA GPU is available on this machine")
        return "cuda"
    if accelerator == "mps":
        if not mps:
            raise CLIError("--accelerator mps: MPS is not available on this machine")
        return "mps"
    if accelerator == "auto":
        return "cuda" if cuda else "mps" if mps else "cpu"
    return "cpu"


def run_config_of(ckpt_path: Path) -> dict[str, Any]:
    """The cifar-train config.yaml of the run that wrote this checkpoint ({} if none)."""
    saved = ckpt_path.parent.parent / "config.yaml"
    if ckpt_path.parent.name == "checkpoints" and saved.is_file():
        try:
            return _read_yaml_config(str(saved))
        except CLIError:
            return {}
    return {}


def next_free_dir(base: Path) -> Path:
    """base, or base_2, base_3... : the first that does not exist."""
    n, candidate = 1, base
    while candidate.exists():
        n += 1
        candidate = base.with_name(f"{base.name}_{n}")
    return candidate


def predict_probs(module: Any, images: Any, batch_size: int, device: str) -> Any:
    """Softmax probabilities for uint8 images, in batches, on ``device``."""
    import torch

    from cifar_lightning.data import normalize

    module = module.to(device).eval()
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            # the run's test-time augmentation (tta) too, so this matches cifar-train's test accuracy
            out.append(module.tta_logits(normalize(images[i : i + batch_size].to(device))).softmax(-1).float().cpu())
    return torch.cat(out) if out else torch.empty(0, module.hparams.num_classes)


def run_evaluation(args: argparse.Namespace) -> tuple[Path, dict[str, Any]]:
    from cifar_lightning import report
    from cifar_lightning.data import CIFAR10DataModule, DataError
    from cifar_lightning.export import sha256_of
    from cifar_lightning.module import classifier_from_checkpoint, load_checkpoint

    ckpt_path = Path(args.checkpoint)
    device = pick_device(args.accelerator)
    ckpt = load_checkpoint(ckpt_path)  # refuses unsafe or foreign files before anything else
    module = classifier_from_checkpoint(ckpt, ckpt_path)
    run_cfg = run_config_of(ckpt_path)
    in_run = bool(run_cfg)
    run_dir = ckpt_path.parent.parent if in_run else None

    if args.out:
        out = Path(args.out)
        if out.exists() and not out.is_dir():
            raise CLIError(f"--out {out}: exists and is not a folder")
        if out.exists() and any(out.iterdir()) and not args.overwrite:
            raise CLIError(f"--out {out}: exists and is not empty; pass --overwrite or choose another folder")
    else:
        out = next_free_dir(run_dir / "report" if run_dir else ckpt_path.with_name(f"{ckpt_path.stem}_report"))

    data_dir = args.data_dir or run_cfg.get("data_dir") or "data"
    dm = CIFAR10DataModule(
        data_dir=data_dir, val_size=run_cfg.get("val_size", 5000), split_seed=run_cfg.get("split_seed", 0),
        source=run_cfg.get("data_source", "auto") if not args.data_dir else "auto", download=args.download,
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("fit" if args.split == "val" else "test")
    ds = dm.val_set if args.split == "val" else dm.test_set
    class_names = list(module.hparams.class_names or dm.classes)
    if len(class_names) != len(dm.classes) or module.hparams.num_classes != len(dm.classes):
        raise DataError(f"--data-dir {data_dir}: has {len(dm.classes)} classes, the checkpoint predicts {module.hparams.num_classes}")
    if len(ds) == 0:
        raise DataError(f"--split {args.split}: no images to evaluate")

    probs = predict_probs(module, ds.images, args.batch_size, device)
    meta = {
        "model": module.hparams.model,
        "checkpoint": str(ckpt_path),
        "checkpoint_sha256": sha256_of(ckpt_path),
        "split": args.split,
        "data_dir": str(data_dir),
    }
    # Written into a temporary sibling, then renamed: an interrupted evaluation never leaves a
    # half-written report, and --overwrite replaces the old one only once the new one is whole.
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        metrics = report.write_report(tmp, probs, ds.labels, ds.images, class_names, meta, run_dir=run_dir, grid=args.grid)
        if out.exists():
            shutil.rmtree(out)
        out.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, out)
    except OSError as e:
        raise CLIError(f"--out {out}: cannot write the report ({e.strerror or e})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out, metrics


def _cli_errors() -> tuple[type[BaseException], ...]:
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    from cifar_lightning.data import DataError
    from cifar_lightning.export import ExportError
    from cifar_lightning.module import CheckpointError
    from cifar_lightning.predict import ImageError, ModelError

    return (CLIError, DataError, CheckpointError, ModelError, ImageError, ExportError, MisconfigurationException)


def _guarded(prog: str, body: Any) -> int:
    """Run body(); user errors become one line and exit 2, anything else one line and exit 1."""
    try:
        return body()
    except _cli_errors() as e:
        return _fail(prog, str(e), 2)
    except RunInterruptedError as e:
        return _fail(prog, str(e), e.code)
    except TrainingFailedError as e:
        return _fail(prog, str(e), 1)
    except KeyboardInterrupt:
        return _fail(prog, "interrupted", 130)
    except OSError as e:
        # A full disk, an unwritable folder: say which file; checkpoints are written atomically,
        # so the ones already there are intact.
        where = f" {e.filename}" if e.filename else ""
        return _fail(prog, f"cannot write or read{where}: {e.strerror or e} (files written before are intact)", 1)
    except Exception as e:
        if os.environ.get("CIFAR_LIGHTNING_DEBUG"):
            raise
        return _fail(prog, f"{type(e).__name__}: {e} (set CIFAR_LIGHTNING_DEBUG=1 for a traceback)", 1)


def evaluate_main(argv: list[str] | None = None) -> int:
    """Entry point of cifar-evaluate."""
    from cifar_lightning import report

    args = evaluate_parser().parse_args(argv)

    def body() -> int:
        out, metrics = run_evaluation(args)
        print(report.format_table(metrics))
        print(f"\nreport: {out / 'report.md'}")
        return 0

    return _guarded("cifar-evaluate", body)


# ----------------------------------------------------------------------------- show data


def show_data_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="cifar-show-data",
        description="Look at the data: a grid of training images per class, or with --augment, "
        "originals beside augmented versions of them.",
    )
    p.add_argument("--data-dir", default="data", help="as for cifar-train (default data)")
    p.add_argument("--augment", choices=AUGMENTS, default="none")
    add_augment_ranges(p.add_argument_group("augmentation ranges (as for cifar-train)"))
    p.set_defaults(**dict.fromkeys(AUG_OPTIONS))
    p.add_argument("--per-class", type=_positive_int, default=8, help="images per class (default 8)")
    p.add_argument("--n-augmented", type=_positive_int, default=5, help="augmented versions per image (default 5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", help="PNG path (default data_grid.png, or data_grid_<augment>.png)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--no-download", dest="download", action="store_false", help="never download CIFAR-10")
    return p


def show_data_main(argv: list[str] | None = None) -> int:
    """Entry point of cifar-show-data."""
    args = show_data_parser().parse_args(argv)

    def body() -> int:
        import torch

        from cifar_lightning import report
        from cifar_lightning.augment import BatchAugment
        from cifar_lightning.data import CIFAR10DataModule

        out = Path(args.out or ("data_grid.png" if args.augment == "none" else f"data_grid_{args.augment}.png"))
        if out.exists() and not args.overwrite:
            raise CLIError(f"--out {out}: exists; pass --overwrite or choose another path")
        dm = CIFAR10DataModule(data_dir=args.data_dir, download=args.download)
        dm.prepare_data()
        train = dm.load()["train"]
        torch.manual_seed(args.seed)
        ranges = {k: getattr(args, k) for k in AUG_OPTIONS if getattr(args, k) is not None}
        try:
            augment = BatchAugment(args.augment, **ranges) if args.augment != "none" else None
        except ValueError as e:
            raise CLIError(str(e)) from None
        fig = report.data_grid_figure(
            train.images, train.labels, list(dm.classes), per_class=args.per_class,
            augment=augment, n_augmented=args.n_augmented,
        )  # fmt: skip
        try:
            report.save_figure(fig, out)
        except OSError as e:
            raise CLIError(f"--out {out}: cannot write ({e.strerror or e})") from None
        print(out)
        return 0

    return _guarded("cifar-show-data", body)


# ----------------------------------------------------------------------------- export


def export_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="cifar-export",
        description="Export a checkpoint to safetensors (+ JSON metadata), ONNX or TorchScript, checked against "
        "the PyTorch network on real test images.",
    )
    p.add_argument("checkpoint", help="a Lightning .ckpt written by cifar-train")
    p.add_argument("--format", choices=("safetensors", "onnx", "torchscript"), required=True)
    p.add_argument("--out", required=True, help="output file; its metadata goes to OUT.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--data-dir", help="test images for the check (default: the run's data dir)")
    p.add_argument("--check-images", type=_positive_int, default=256, help="test images in the check (default 256)")
    p.add_argument("--no-download", dest="download", action="store_false", help="never download CIFAR-10")
    return p


def check_batch(ckpt_path: Path, data_dir: str | None, n: int, download: bool) -> tuple[Any, str]:
    """Normalised real test images for the export check, and where they came from. Without a
    usable data dir: seeded random images, said so (the check then proves numerics only)."""
    import torch

    from cifar_lightning.data import CIFAR10DataModule, DataError, normalize

    data_dir = data_dir or run_config_of(ckpt_path).get("data_dir")
    if data_dir:
        try:
            dm = CIFAR10DataModule(data_dir=data_dir, download=download)
            dm.prepare_data()
            test = dm.load()["test"]
            idx = torch.randperm(len(test.labels), generator=torch.Generator().manual_seed(0))[:n]
            return normalize(test.images[idx]), f"{len(idx)} test images of {data_dir}"
        except DataError as e:
            print(f"cifar-export: note: {e}; checking on random images instead", file=sys.stderr)
    g = torch.Generator().manual_seed(0)
    return normalize(torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)), f"{n} random images"


def export_main(argv: list[str] | None = None) -> int:
    """Entry point of cifar-export."""
    args = export_parser().parse_args(argv)

    def body() -> int:
        from cifar_lightning.export import export
        from cifar_lightning.module import classifier_from_checkpoint, load_checkpoint

        ckpt_path, out = Path(args.checkpoint), Path(args.out)
        module = classifier_from_checkpoint(load_checkpoint(ckpt_path), ckpt_path)
        if out.exists() and not args.overwrite:
            raise CLIError(f"--out {out}: exists; pass --overwrite or choose another path")
        images, where = check_batch(ckpt_path, args.data_dir, args.check_images, args.download)
        try:
            check = export(module, ckpt_path, args.format, out, images)
        except OSError as e:
            raise CLIError(f"--out {out}: cannot write ({e.strerror or e})") from None
        print(f"wrote {out} and {out.name}.json")
        print(
            f"check on {where}: max |logit difference| {check['max_abs_logit_diff']:.2e} (limit 1e-4), "
            f"same top-1 on {check['same_top1']}/{check['images']}"
        )
        return 0

    return _guarded("cifar-export", body)


# ----------------------------------------------------------------------------- predict


def predict_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="cifar-predict",
        description="Classify image files (or folders, recursively) with a .ckpt, .safetensors or .onnx model. "
        "Exit status: 0 every input predicted, 1 some inputs failed, 2 bad model or flags.",
    )
    p.add_argument("model", help="a Lightning .ckpt, a cifar-export .safetensors (with its .json) or an .onnx")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--top-k", type=_positive_int, default=3, help="classes shown per image (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of tables")
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--accelerator", choices=("cpu", "gpu", "cuda", "mps", "auto"), default="cpu")
    return p


def predict_main(argv: list[str] | None = None) -> int:
    """Entry point of cifar-predict."""
    args = predict_parser().parse_args(argv)

    def body() -> int:
        import torch

        from cifar_lightning.predict import ImageError, expand_inputs, load_classifier, load_image

        clf = load_classifier(args.model, device=pick_device(args.accelerator))
        files = expand_inputs(args.paths)
        if not files:
            raise CLIError("no image files found in the given paths")
        results: list[dict[str, Any]] = []
        good, images = [], []
        for f in files:
            try:
                images.append(torch.from_numpy(load_image(f)).permute(2, 0, 1))
                good.append(len(results))
                results.append({"path": str(f)})
            except ImageError as e:
                results.append({"path": str(f), "error": str(e)})
        if images:
            probs = clf.probabilities(torch.stack(images), args.batch_size)
            for i, top in zip(good, clf.top_k(probs, args.top_k), strict=True):
                results[i]["top_k"] = top
        if args.json:
            print(json.dumps(results, indent=2))
        else:
            for r in results:
                if "error" in r:
                    print(f"error: {r['error']}", file=sys.stderr)
                    continue
                print(r["path"])
                for t in r["top_k"]:
                    print(f"  {t['class']:<12} {t['probability']:.4f}")
        return 0 if len(good) == len(results) else 1

    return _guarded("cifar-predict", body)
