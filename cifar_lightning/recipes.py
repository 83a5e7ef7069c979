"""The training recipe: one typed config, its presets and how they layer.

A value is resolved in this order, later wins:

    TrainConfig defaults < preset (presets/<name>.yaml) < the resumed run's config.yaml
        < --config FILE < flags given now

Presets are YAML files inside the package: read one, copy it, edit it, pass it back with
``--config``. ``cifar-train --print-config`` prints the resolved recipe in the same form.

This module imports neither torch nor Lightning (``--help`` and ``--print-config`` stay fast);
it owns the vocabulary of a recipe (the choice lists), which the modules that act on them import.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
import os
from dataclasses import dataclass, field
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from cifar_lightning.errors import ConfigError

OPTIMIZERS = ("adam", "adamw", "sgd", "muon")
SCHEDULES = ("none", "cosine", "onecycle", "triangle")
#: test-time augmentation: 0 none, 1 + mirror, 2 + mirror and 1-px translations (6 views)
TTA_LEVELS = (0, 1, 2)
AUGMENTS = ("none", "seed", "standard", "robust")
#: how a run fits its softmax temperature after training (the test set never takes part)
CALIBRATIONS = ("auto", "heldout", "val", "none")
PRECISIONS = ("auto", "64-true", "64", "32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true")
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")
DATA_SOURCES = ("auto", "imagefolder", "cifar10")
# Defaults of --augment seed, chosen by refitting the 20-epoch seed model for 10 epochs on the
# full data with each setting (docs/BENCHMARKS.md, "Choosing the --augment seed ranges"): shift
# + flip helped most; zoom, rotation and brightness stay available: set a range to turn them on.
AUGMENT_DEFAULTS: dict[str, dict[str, float]] = {
    "seed": {
        "shift": 0.1,  # max translation, fraction of the image side (0.1 = 3.2 px)
        "flip": 0.5,  # probability of a horizontal flip
        "zoom": 0.0,  # scale drawn from [1 - zoom, 1 + zoom]
        "rotation": 0.0,  # degrees, drawn from [-rotation, rotation]
        "brightness": 0.0,  # multiply by a factor from [1 - brightness, 1 + brightness]
    },
    "standard": {"crop_padding": 4, "flip": 0.5, "cutout": 0},  # reflect-pad, random crop; horizontal flip; cutout off
    # standard plus what real photos go through: sensor noise, soft focus, JPEG compression
    # (docs/BENCHMARKS.md, "Choosing --augment robust"); each is the probability per image.
    "robust": {"crop_padding": 4, "flip": 0.5, "cutout": 0, "jpeg": 0.5, "noise": 0.2, "blur": 0.2},
    "none": {},
}
AUGMENT_RANGES = ("shift", "flip", "zoom", "rotation", "brightness", "crop_padding", "cutout", "jpeg", "noise", "blur")
DEFAULT_PRESET = "94"
MAX_SEED = 2**32 - 1  # numpy's and Lightning's seed range


def knob(default: Any, why: str, **check: Any) -> Any:
    """A config field with its one-line why (shown in --help) and its checks: min, max (inclusive),
    below (exclusive max), above (exclusive min), choices."""
    return field(default=default, metadata={"why": why, **check})


@dataclass
class TrainConfig:
    """Every knob of a training run. Saved as config.yaml beside the run's results."""

    preset: str | None = knob(None, "the recipe these values start from")
    # model and optimisation
    model: str = knob("seed", "network from the registry: seed (the Keras notebook's) or fast (airbench-style)")
    epochs: int = knob(20, "passes over the training images", min=1)
    batch_size: int = knob(64, "images per optimiser step", min=1)
    lr: float = knob(1e-3, "peak learning rate", above=0.0)
    optimizer: str = knob("adam", "adam/adamw (the notebook's), Nesterov sgd (the fast recipe's), or muon: Muon on conv "
                          "filters and Nesterov sgd on the rest", choices=OPTIMIZERS)
    weight_decay: float = knob(0.0, "L2 (adam, sgd) or decoupled (adamw) decay", min=0.0)
    schedule: str = knob("none", "per-step learning-rate schedule; triangle: warm-up then linear decay to 0", choices=SCHEDULES)
    label_smoothing: float = knob(0.0, "softens the targets; the fast recipe's 0.2 generalises better", min=0.0, below=1.0)
    momentum: float = knob(0.9, "SGD (Nesterov) momentum", min=0.0, below=1.0)
    muon_lr: float = knob(0.24, "muon: peak learning rate of the conv filters (scale-free: filters are kept at norm sqrt(out))", above=0.0)
    muon_momentum: float = knob(0.6, "muon: Nesterov momentum of the conv filters", min=0.0, below=1.0)
    norm_bias_lr_scale: float = knob(1.0, "BatchNorm shifts learn this much faster (airbench: 64)", above=0.0)
    warmup_fraction: float = knob(0.2, "triangle schedule: fraction of steps spent warming up", min=0.0, max=1.0)
    whiten_bias_epochs: int = knob(0, "fast network: epochs its whitening bias trains before it is frozen", min=0)
    widths: list[int] | None = knob(None, "fast network: channels of its three conv groups, e.g. 64,256,256")
    depth: int = knob(2, "fast network: convolutions per group; 3 adds a residual pair to each (airbench96's)", choices=(2, 3))
    tta: int = knob(0, "test-time augmentation: 0 none, 1 mirror, 2 mirror+translate (kept by exports)", choices=TTA_LEVELS)
    lookahead: bool = knob(False, "lookahead weight averaging (airbench's)")
    # data
    data_dir: str = knob("data", "CIFAR-10 folder: an image-folder tree train|test/<class>/ or torchvision's")
    data_source: str = knob("auto", "force the source kind", choices=DATA_SOURCES)
    download: bool = knob(True, "download CIFAR-10 when data_dir has neither form")
    val_size: int = knob(5000, "training images held out for validation (the test set chooses nothing)", min=0)
    split_seed: int = knob(0, "seed of the fixed train/val split", min=0, max=MAX_SEED)
    limit_train_images: int | None = knob(None, "train on the first N images of the split", min=1)
    num_workers: int = knob(0, "DataLoader workers; the data is in memory, so 0 is fastest", min=0)
    calibrate: str = knob("auto", "fit a softmax temperature after training on: heldout (calib_size training images kept "
                          "out), val (the validation split), none; auto: val if there is one, else heldout", choices=CALIBRATIONS)
    calib_size: int = knob(2000, "training images held out to fit the temperature (calibrate heldout; at most a tenth of them)", min=1)
    # augmentation
    augment: str = knob("none", "none | seed (the notebook's ops) | standard (crop+flip) | robust (+ JPEG, noise, blur), on the device",
                        choices=AUGMENTS)
    shift: float | None = knob(None, "seed: max shift, fraction of the side", min=0.0, below=1.0)
    flip: float | None = knob(None, "seed/standard: flip probability", min=0.0, max=1.0)
    zoom: float | None = knob(None, "seed: scale range 1 +/- zoom", min=0.0, below=1.0)
    rotation: float | None = knob(None, "seed: max degrees", min=0.0, max=180.0)
    brightness: float | None = knob(None, "seed: factor range 1 +/- brightness", min=0.0, below=1.0)
    crop_padding: int | None = knob(None, "standard/robust: pad px before the random crop", min=0, max=16)
    cutout: int | None = knob(None, "standard/robust: side px of a square, at a random place, set to the mean colour "
                              "(airbench96's 12; 0 off)", min=0, max=32)
    jpeg: float | None = knob(None, "robust: share of images re-encoded as JPEG, quality 30-95", min=0.0, max=1.0)
    noise: float | None = knob(None, "robust: share of images given Gaussian noise, sigma up to 0.1", min=0.0, max=1.0)
    alternate_flip: bool = knob(False, "standard/robust: mirror each image on every other epoch (a seeded random half in the first; "
                                "airbench's) instead of at random; replaces --flip")
    blur: float | None = knob(None, "robust: share of images given a Gaussian blur, sigma 0.4-1.2 px", min=0.0, max=1.0)
    # trainer
    accelerator: str = knob("auto", "where to train", choices=ACCELERATORS)
    devices: int | str = knob("auto", "device count or ids like '0,1'")
    strategy: str = knob("auto", "Lightning strategy: auto, ddp, ddp_spawn, fsdp...")
    num_nodes: int = knob(1, "machines for multi-node DDP (torchrun/SLURM set the rest)", min=1)
    precision: str = knob("32-true", "auto: bf16-mixed where the hardware has native bf16, else 32-true", choices=PRECISIONS)
    seed: int = knob(0, "seed for init, shuffling, augmentation", min=0, max=MAX_SEED)
    deterministic: bool = knob(False, "use deterministic algorithms")
    max_time: str | float | None = knob(None, "stop after this long: seconds or DD:HH:MM:SS")
    channels_last: bool = knob(True, "NHWC memory (about 15% faster on CPU)")
    progress_bar: bool | None = knob(None, "default: on when stderr is a terminal")
    # runs and checkpoints
    log_dir: str = knob("lightning_logs", "runs go to LOG_DIR/version_N")
    log_images_every: int = knob(1, "TensorBoard confusion heatmap and prediction grid every K validation epochs; 0 never", min=0)
    checkpoint_every_steps: int = knob(0, "also save last.ckpt every N steps, so a kill loses at most N (0: each epoch)", min=0)
    resume: str | None = knob(None, "continue a run from its checkpoint ('last': the newest run's last.ckpt)")
    init_from: str | None = knob(None, "start a NEW run from these weights (e.g. refit with augmentation)")

    def augment_options(self) -> dict[str, float]:
        """The augmentation ranges set explicitly (the rest take the augmentation's defaults).
        The alternating flip replaces the random one."""
        given = {k: getattr(self, k) for k in AUGMENT_RANGES if getattr(self, k) is not None}
        return {**given, "flip": 0.0} if self.alternate_flip else given

    def calibration_split(self) -> str:
        """Where the temperature is fitted: 'heldout', 'val' or 'none' ('auto' resolved)."""
        if self.calibrate == "auto":
            return "val" if self.val_size > 0 else "heldout"
        return self.calibrate

    def held_out_for_calibration(self) -> int:
        return self.calib_size if self.calibration_split() == "heldout" else 0

    def model_args(self) -> dict[str, Any] | None:
        if self.model != "fast":
            return None
        args: dict[str, Any] = {"widths": list(self.widths)} if self.widths else {}
        if self.depth != 2:  # 2-conv checkpoints keep the hyper-parameters they were saved with
            args["depth"] = self.depth
        return args or None

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}
#: The knobs by topic, as --help lists them.
SECTIONS = {
    "model and optimisation": ("model", "epochs", "batch_size", "lr", "optimizer", "weight_decay", "schedule", "label_smoothing",
                               "momentum", "muon_lr", "muon_momentum", "norm_bias_lr_scale", "warmup_fraction", "whiten_bias_epochs",
                               "widths", "depth", "tta", "lookahead"),
    "data": ("data_dir", "data_source", "download", "val_size", "split_seed", "limit_train_images", "num_workers", "calibrate",
             "calib_size"),
    "augmentation (on the device, training batches only)": ("augment", *AUGMENT_RANGES, "alternate_flip"),
    "trainer": ("accelerator", "devices", "strategy", "num_nodes", "precision", "seed", "deterministic", "max_time",
                "channels_last", "progress_bar"),
    "runs and checkpoints": ("log_dir", "log_images_every", "checkpoint_every_steps", "resume", "init_from"),
}  # fmt: skip
WHY = {name: f.metadata["why"] for name, f in FIELDS.items()}


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


# ----------------------------------------------------------------------------- presets


def preset_names() -> tuple[str, ...]:
    """The presets shipped in the package (presets/*.yaml), default first."""
    names = sorted(p.name.removesuffix(".yaml") for p in resources.files("cifar_lightning").joinpath("presets").iterdir()
                   if p.name.endswith(".yaml"))  # fmt: skip
    return tuple(sorted(names, key=lambda n: n != DEFAULT_PRESET))


@cache
def preset(name: str) -> dict[str, Any]:
    """The values a preset sets (checked like a --config file)."""
    if name not in preset_names():
        raise ConfigError(f"--preset {name!r}: choose from {', '.join(preset_names())}")
    text = resources.files("cifar_lightning").joinpath("presets", f"{name}.yaml").read_text()
    return _mapping(yaml.safe_load(text), f"preset {name}")


def preset_file(name: str) -> str:
    """Where a preset's YAML lives, to read or copy."""
    return str(resources.files("cifar_lightning").joinpath("presets", f"{name}.yaml"))


def implied_preset(values: dict[str, Any]) -> str:
    """The preset a configuration names, or implies by its model (runs saved before presets
    existed were all the seed recipe)."""
    return str(values.get("preset") or ("seed" if values.get("model") == "seed" else DEFAULT_PRESET))


# ----------------------------------------------------------------------------- reading and checking


def read_yaml(path: str | Path, what: str = "--config") -> dict[str, Any]:
    """A YAML mapping of option: value (keys as flag names, - or _), checked."""
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from None
    except (yaml.YAMLError, RecursionError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} {path}: not valid YAML ({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    return _mapping(raw, f"{what} {path}")


def _mapping(raw: Any, where: str) -> dict[str, Any]:
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of option: value")
    values = {str(k).replace("-", "_"): v for k, v in raw.items()}
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}")
    if values.get("preset") is not None:
        values["preset"] = str(values["preset"])  # `preset: 94` in YAML is an int
    return {k: check_value(k, v, where) for k, v in values.items()}


def _type_name(name: str) -> str:
    return str(FIELDS[name].type)


def check_value(name: str, value: Any, where: str = "") -> Any:
    """One option's value, checked against its type and bounds; ConfigError naming the option."""
    f, kind = FIELDS[name], _type_name(name)
    meta = f.metadata
    prefix = f"{where}: " if where else ""

    def bad(expected: str) -> ConfigError:
        return ConfigError(f"{prefix}{flag(name)} {expected}, got {value!r}")

    if value is None:
        if "None" in kind:
            return None
        raise bad("needs a value")
    if name == "widths":
        if isinstance(value, str):
            value = value.split(",")
        try:
            widths = [int(w) for w in value] if isinstance(value, (list, tuple)) and not any(isinstance(w, bool) for w in value) else []
        except (TypeError, ValueError):
            widths = []
        if len(widths) != 3 or min(widths) < 1 or any(isinstance(w, float) and w != int(w) for w in value):
            raise bad("expects three positive channel counts like 64,256,256")
        return widths
    if name == "devices":
        if isinstance(value, str) and value.lstrip("-").isdigit():
            value = int(value)
        ok = (isinstance(value, int) and not isinstance(value, bool) and (value >= 1 or value == -1)) or (
            isinstance(value, str) and (value == "auto" or all(p.isdigit() for p in value.rstrip(",").split(",")) and value.strip(","))
        )
        if not ok:
            raise bad("expects 'auto', a count or a list like '0,1'")
        return value
    if name == "max_time":
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise bad("expects seconds or DD:HH:MM:SS")
        parse_max_time(value)
        return value
    if kind.startswith("bool"):
        if not isinstance(value, bool):
            raise bad("expects true or false")
        return value
    if kind.startswith("int"):
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad("expects an integer")
    elif kind.startswith("float"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad("expects a number")
        value = float(value)
        if not math.isfinite(value):
            raise bad("must be finite")
    elif kind.startswith("str"):
        if not isinstance(value, str):
            raise bad("expects a string")
    if name == "precision" and value == "16-true":
        # float16 weights with no loss scaling: Adam's epsilon underflows to 0 and the first step gives NaN.
        raise ConfigError(f"{prefix}--precision 16-true: float16 weights without loss scaling diverge; use 16-mixed or bf16-mixed")
    if "choices" in meta and value not in meta["choices"]:
        raise ConfigError(f"{prefix}{flag(name)} {value!r}: choose from {', '.join(map(str, meta['choices']))}")
    if "min" in meta and value < meta["min"]:
        raise bad(f"must be >= {meta['min']}")
    if "max" in meta and value > meta["max"]:
        raise bad(f"must be <= {meta['max']}")
    if "above" in meta and not value > meta["above"]:
        raise bad(f"must be > {meta['above']}")
    if "below" in meta and not value < meta["below"]:
        raise bad(f"must be < {meta['below']}")
    return value


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
            seconds = sum(unit * p for unit, p in zip((1, 60, 3600, 86400), reversed(parts), strict=False))
    except ValueError:
        raise ConfigError(f"--max-time: expected seconds or DD:HH:MM:SS, got {text!r}") from None
    if not 0 < seconds < 1e9:  # also refuses inf and nan
        raise ConfigError(f"--max-time must be a positive, finite time, got {text!r}")
    return dt.timedelta(seconds=seconds)


def check_model_name(cfg: TrainConfig) -> None:
    """The network must be in the registry (which imports torch, so it is checked apart)."""
    from cifar_lightning.models import MODELS

    if cfg.model not in MODELS:
        raise ConfigError(f"--model {cfg.model!r}: unknown; choose from {', '.join(sorted(MODELS))}")


# ----------------------------------------------------------------------------- layering


def build(given: dict[str, Any], saved: dict[str, Any] | None = None, refit_of: dict[str, Any] | None = None) -> TrainConfig:
    """defaults < preset < saved (a resumed run's config) < given (--config, then flags).

    The preset is the one given, else the saved run's, else (for a refit that names no model)
    the one of the run it starts from, else the one its model implies."""
    given = {k: check_value(k, v) for k, v in given.items()}
    name = given.get("preset")
    if not name and saved:
        name = implied_preset(saved)
    elif not name and refit_of is not None and "model" not in given:
        name = implied_preset(refit_of or {"model": given.get("model")})
    name = name or implied_preset({"model": given.get("model")})
    values = {**preset(name), "preset": name, **(saved or {}), **given}
    if values.get("alternate_flip") and "alternate_flip" not in given and values.get("augment") not in ("standard", "robust"):
        # The preset's mirror schedule belongs to its crop+flip augmentation: a run that swaps the
        # augmentation (e.g. --augment none) drops it; asking for both is refused before the run.
        values["alternate_flip"] = False
    return TrainConfig(**values)


def saved_run_config(ckpt_path: Path) -> dict[str, Any]:
    """The config.yaml of the run that wrote this checkpoint ({} if none or unreadable)."""
    from cifar_lightning.checkpoint import run_dir_of

    run = run_dir_of(ckpt_path)
    if run is None:
        return {}
    try:
        return read_yaml(run / "config.yaml", "config")
    except ConfigError:
        return {}


def resolve(given: dict[str, Any]) -> TrainConfig:
    """The recipe of a run from what the user gave (--config values, then flags on top).

    A resumed run keeps its own saved configuration (init_from included, as a record of where
    its weights came from); a refit (--init-from) continues the recipe of the run it starts
    from unless it names a model."""
    from cifar_lightning.checkpoint import find_last_checkpoint

    given = dict(given)
    if given.get("resume") and given.get("init_from"):
        raise ConfigError("--resume and --init-from exclude each other: resume continues a run, init-from starts a new one")
    saved: dict[str, Any] | None = None
    if given.get("resume"):
        log_dir = Path(given.get("log_dir") or TrainConfig.log_dir)
        ckpt = find_last_checkpoint(log_dir) if given["resume"] == "last" else Path(given["resume"])
        saved = saved_run_config(ckpt)
        given["resume"] = str(ckpt)
    refit_of = saved_run_config(Path(given["init_from"])) if given.get("init_from") else None
    cfg = build(given, saved, refit_of)
    # Paths are recorded absolute: a run's config.yaml, and the evaluate/export commands that
    # read it, must not depend on the directory they are started from.
    for key in ("data_dir", "log_dir", "init_from", "resume"):
        if getattr(cfg, key):
            setattr(cfg, key, os.path.abspath(os.path.expanduser(getattr(cfg, key))))
    return cfg
