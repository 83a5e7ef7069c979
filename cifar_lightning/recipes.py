"""The training recipe: one typed config, its presets and how they layer.

A value is resolved in this order, later wins:

    TrainConfig defaults < preset (presets/<name>.yaml) < the resumed run's config.yaml
        < --config FILE < flags given now

Presets are YAML files inside the package: read one, copy it, edit it, pass it back with
``--config``. ``cifar-train --print-config`` prints the resolved recipe in the same form.

Every value is checked here, once, by pydantic (strict: no ``"3"`` for 3, no ``true`` for 1),
against the type and bounds written beside the field; an error is one line naming the flag.
The constructors downstream trust what they get. This module imports neither torch nor
Lightning (``--help`` and ``--print-config`` stay fast); it owns the vocabulary of a recipe
(the choice lists), which the modules that act on them import.
"""

from __future__ import annotations

import datetime as dt
from functools import cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from pydantic_core import PydanticCustomError

from cifar_lightning.errors import ConfigError, shown

OPTIMIZERS = ("adam", "adamw", "sgd", "muon")
SCHEDULES = ("none", "cosine", "onecycle", "triangle")
#: test-time views: 0 none, 1 + mirror, 2 + 1-px translations where unsure (models.tta_logits), 3 + them on every image
TTA_LEVELS = (0, 1, 2, 3)
AUGMENTS = ("none", "seed", "standard", "robust")
#: how a run fits its softmax temperature after training (the test set never takes part)
CALIBRATIONS = ("auto", "heldout", "val", "fixed", "none")
#: the softmax temperatures a run can fit or be given (calibration.fit_temperature searches these)
T_RANGE = (0.01, 100.0)
PRECISIONS = ("auto", "64-true", "64", "32-true", "32", "16-mixed", "bf16-mixed", "16-true", "bf16-true")
ACCELERATORS = ("cpu", "gpu", "cuda", "mps", "auto")
DATA_SOURCES = ("auto", "imagefolder", "cifar10")
EXPORT_FORMATS = ("safetensors", "onnx", "pt2", "torchscript")
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
    # jpeg_quality_min: the lowest of the qualities a re-encoded image is given (from it to 95 in
    # steps of 5); photos are rarely saved below 70, and a narrower range may cost less clean accuracy.
    "robust": {"crop_padding": 4, "flip": 0.5, "cutout": 0, "jpeg": 0.5, "noise": 0.2, "blur": 0.2, "jpeg_quality_min": 30},
    "none": {},
}
AUGMENT_RANGES = ("shift", "flip", "zoom", "rotation", "brightness", "crop_padding", "cutout", "jpeg", "noise", "blur",
                  "jpeg_quality_min")  # fmt: skip
DEFAULT_PRESET = "94"
MAX_SEED = 2**32 - 1  # numpy's and Lightning's seed range


def knob(default: Any, why: str, **bounds: Any) -> Any:
    """A config field with its one-line why (shown in --help) and its bounds (pydantic's ge, le,
    gt, lt); floats must be finite."""
    return Field(default, description=why, **bounds)


class TrainConfig(BaseModel):
    """Every knob of a training run. Saved as config.yaml beside the run's results."""

    model_config = ConfigDict(strict=True, extra="forbid", validate_assignment=True, allow_inf_nan=False)

    preset: str | None = knob(None, "the recipe these values start from")
    # model and optimisation
    model: str = knob("seed", "network from the registry: seed (the Keras notebook's) or fast (airbench-style)")
    epochs: int = knob(20, "passes over the training images", ge=1)
    batch_size: int = knob(64, "images per optimiser step", ge=1)
    lr: float = knob(1e-3, "peak learning rate", gt=0.0)
    optimizer: Literal[OPTIMIZERS] = knob("adam", "adam/adamw (the notebook's), Nesterov sgd (the fast recipe's), or muon: Muon on conv "
                          "filters and Nesterov sgd on the rest")
    weight_decay: float = knob(0.0, "L2 (adam, sgd) or decoupled (adamw) decay", ge=0.0)
    schedule: Literal[SCHEDULES] = knob("none", "per-step learning-rate schedule; triangle: warm-up then linear decay to 0")
    label_smoothing: float = knob(0.0, "softens the targets; the fast recipe's 0.2 generalises better", ge=0.0, lt=1.0)
    momentum: float = knob(0.9, "SGD (Nesterov) momentum", ge=0.0, lt=1.0)
    muon_lr: float = knob(0.24, "muon: peak learning rate of the conv filters (scale-free: filters are kept at norm sqrt(out))", gt=0.0)
    muon_momentum: float = knob(0.6, "muon: Nesterov momentum of the conv filters", ge=0.0, lt=1.0)
    norm_bias_lr_scale: float = knob(1.0, "BatchNorm shifts learn this much faster (airbench: 64)", gt=0.0)
    warmup_fraction: float = knob(0.2, "triangle schedule: fraction of steps spent warming up", ge=0.0, le=1.0)
    whiten_bias_epochs: int = knob(0, "fast network: epochs its whitening bias trains before it is frozen", ge=0)
    widths: list[int] | None = knob(None, "fast network: channels of its three conv groups, e.g. 64,256,256")
    depth: Literal[(2, 3)] = knob(2, "fast network: convolutions per group; 3 adds a residual pair to each (airbench96's)")
    tta: Literal[TTA_LEVELS] = knob(0, "test-time views: 0 none, 1 mirror, 2 + translations where unsure, 3 + translations on all")
    lookahead: bool = knob(False, "lookahead weight averaging (airbench's)")
    # data
    data_dir: str = knob("data", "CIFAR-10 folder: an image-folder tree train|test/<class>/ or torchvision's")
    data_source: Literal[DATA_SOURCES] = knob("auto", "force the source kind")
    download: bool = knob(True, "download CIFAR-10 when data_dir has neither form")
    val_size: int = knob(5000, "training images held out for validation (the test set chooses nothing)", ge=0)
    split_seed: int = knob(0, "seed of the fixed train/val split", ge=0, le=MAX_SEED)
    limit_train_images: int | None = knob(None, "train on the first N images of the split", ge=1)
    num_workers: int = knob(0, "DataLoader workers; the data is in memory, so 0 is fastest", ge=0)
    calibrate: Literal[CALIBRATIONS] = knob("auto", "fit a softmax temperature after training on: heldout (calib_size training images kept "
                          "out), val (the validation split); fixed: take --temperature, no image held out; none; "
                          "auto: val if there is one, else heldout")
    calib_size: int = knob(2000, "training images held out to fit the temperature (calibrate heldout; at most a tenth of them)", ge=1)
    calib_jpeg: bool = knob(False, "calibrate heldout/val: fit the temperature on the images and on a JPEG quality-75 copy of "
                            "each, so that it holds on photos too")
    temperature: float | None = knob(None, "calibrate fixed: the temperature, fitted once on held-out images of the same recipe",
                                     ge=T_RANGE[0], le=T_RANGE[1])
    # augmentation
    augment: Literal[AUGMENTS] = knob("none", "none | seed (the notebook's ops) | standard (crop+flip) | robust (+ JPEG, noise, "
                                      "blur), on the device")
    shift: float | None = knob(None, "seed: max shift, fraction of the side", ge=0.0, lt=1.0)
    flip: float | None = knob(None, "seed/standard: flip probability", ge=0.0, le=1.0)
    zoom: float | None = knob(None, "seed: scale range 1 +/- zoom", ge=0.0, lt=1.0)
    rotation: float | None = knob(None, "seed: max degrees", ge=0.0, le=180.0)
    brightness: float | None = knob(None, "seed: factor range 1 +/- brightness", ge=0.0, lt=1.0)
    crop_padding: int | None = knob(None, "standard/robust: pad px before the random crop", ge=0, le=16)
    cutout: int | None = knob(None, "standard/robust: side px of a square, at a random place, set to the mean colour "
                              "(airbench96's 12; 0 off)", ge=0, le=32)
    jpeg: float | None = knob(None, "robust: share of images re-encoded as JPEG, quality 30-95", ge=0.0, le=1.0)
    noise: float | None = knob(None, "robust: share of images given Gaussian noise, sigma up to 0.1", ge=0.0, le=1.0)
    alternate_flip: bool = knob(False, "standard/robust: mirror each image on every other epoch (a seeded random half in the first; "
                                "airbench's) instead of at random; replaces --flip")
    blur: float | None = knob(None, "robust: share of images given a Gaussian blur, sigma 0.4-1.2 px", ge=0.0, le=1.0)
    jpeg_quality_min: int | None = knob(None, "robust: the lowest JPEG quality of a re-encoded image (qualities from it to 95, "
                                        "in steps of 5; default 30)", ge=5, le=95)
    robust_from: float = knob(0.0, "robust: the share of the epochs trained with crop and flip only, before JPEG, noise and "
                              "blur begin (0: from the first epoch)", ge=0.0, lt=1.0)
    # trainer
    accelerator: Literal[ACCELERATORS] = knob("auto", "where to train")
    devices: int | str = knob("auto", "device count or ids like '0,1'")
    strategy: str = knob("auto", "Lightning strategy: auto, ddp, ddp_spawn, fsdp...")
    num_nodes: int = knob(1, "machines for multi-node DDP (torchrun/SLURM set the rest)", ge=1)
    precision: Literal[PRECISIONS] = knob("32-true", "auto: bf16-mixed where the hardware has native bf16, else 32-true")
    seed: int = knob(0, "seed for init, shuffling, augmentation", ge=0, le=MAX_SEED)
    deterministic: bool = knob(False, "use deterministic algorithms")
    max_time: str | int | float | None = knob(None, "stop after this long: seconds or DD:HH:MM:SS")
    channels_last: bool = knob(True, "NHWC memory (about 15% faster on CPU)")
    progress_bar: bool | None = knob(None, "default: on when stderr is a terminal")
    # runs and checkpoints
    log_dir: str = knob("lightning_logs", "runs go to LOG_DIR/version_N")
    log_images_every: int = knob(1, "TensorBoard confusion heatmap and prediction grid every K validation epochs; 0 never", ge=0)
    checkpoint_every_steps: int = knob(0, "also save last.ckpt every N steps, so a kill loses at most N (0: each epoch)", ge=0)
    resume: str | None = knob(None, "continue a run from its checkpoint ('last': the newest run's last.ckpt)")
    init_from: str | None = knob(None, "start a NEW run from these weights (a refit, or a fine-tune): a checkpoint, "
                                              "a .safetensors export or pretrained:NAME")

    @field_validator("widths", mode="before")
    @classmethod
    def _three_widths(cls, value: Any) -> Any:
        if value is None:
            return None
        parts = value.split(",") if isinstance(value, str) else value
        if isinstance(parts, (list, tuple)):
            parts = [int(w) if isinstance(w, str) and w.strip().isdigit() else w for w in parts]
        whole = isinstance(parts, list) and all(isinstance(w, int) and not isinstance(w, bool) for w in parts)
        if not (whole and len(parts) == 3 and min(parts) >= 1):
            raise PydanticCustomError("recipe", "expects three positive channel counts like 64,256,256")
        return parts

    @field_validator("data_dir", "log_dir", "resume", "init_from")
    @classmethod
    def _utf8_path(cls, value: Any) -> Any:
        # A name that is not UTF-8 (bytes held as lone surrogates) cannot be recorded in
        # config.yaml, results.json or TensorBoard: refused now, not after the training.
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise PydanticCustomError("recipe", "is not a valid UTF-8 path, which a run record cannot hold; rename it") from None
        return value

    @field_validator("tta", "depth", mode="before")
    @classmethod
    def _not_a_bool(cls, value: Any) -> Any:
        if isinstance(value, bool):  # True == 1 would pass as a level
            raise PydanticCustomError("int_type", "expects an integer")
        return value

    @field_validator("devices", mode="before")
    @classmethod
    def _devices(cls, value: Any) -> Any:
        if isinstance(value, str) and value.lstrip("-").isdigit():
            value = int(value)
        ok = (isinstance(value, int) and not isinstance(value, bool) and (value >= 1 or value == -1)) or (
            isinstance(value, str) and (value == "auto" or all(p.isdigit() for p in value.rstrip(",").split(",")) and value.strip(","))
        )
        if not ok:
            raise PydanticCustomError("recipe", "expects 'auto', a count or a list like '0,1'")
        return value

    @field_validator("max_time")
    @classmethod
    def _max_time(cls, value: Any) -> Any:
        parse_max_time(value)
        return value

    @field_validator("precision")
    @classmethod
    def _precision(cls, value: str) -> str:
        if value == "16-true":
            # float16 weights with no loss scaling: Adam's epsilon underflows to 0 and the first step gives NaN.
            raise ValueError("--precision 16-true: float16 weights without loss scaling diverge; use 16-mixed or bf16-mixed")
        return value

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
        return self.model_dump()

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


FIELDS = TrainConfig.model_fields
#: The knobs by topic, as --help lists them.
SECTIONS = {
    "model and optimisation": ("model", "epochs", "batch_size", "lr", "optimizer", "weight_decay", "schedule", "label_smoothing",
                               "momentum", "muon_lr", "muon_momentum", "norm_bias_lr_scale", "warmup_fraction", "whiten_bias_epochs",
                               "widths", "depth", "tta", "lookahead"),
    "data": ("data_dir", "data_source", "download", "val_size", "split_seed", "limit_train_images", "num_workers", "calibrate",
             "calib_size", "calib_jpeg", "temperature"),
    "augmentation (on the device, training batches only)": ("augment", *AUGMENT_RANGES, "alternate_flip", "robust_from"),
    "trainer": ("accelerator", "devices", "strategy", "num_nodes", "precision", "seed", "deterministic", "max_time",
                "channels_last", "progress_bar"),
    "runs and checkpoints": ("log_dir", "log_images_every", "checkpoint_every_steps", "resume", "init_from"),
}  # fmt: skip
WHY = {name: f.description or "" for name, f in FIELDS.items()}


def default(name: str) -> Any:
    """An option's default, for a constructor's signature: the value lives here alone, and the
    Lightning module and data module built by hand from Python get the same."""
    return FIELDS[name].default


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
    return _mapping(load_recipe_yaml(text), f"preset {name}")


def preset_file(name: str) -> str:
    """Where a preset's YAML lives, to read or copy."""
    return str(resources.files("cifar_lightning").joinpath("presets", f"{name}.yaml"))


def implied_preset(values: dict[str, Any]) -> str:
    """The preset a configuration names, or implies by its model (runs saved before presets
    existed were all the seed recipe)."""
    return str(values.get("preset") or ("seed" if values.get("model") == "seed" else DEFAULT_PRESET))


# ----------------------------------------------------------------------------- reading and checking


MAX_RECIPE_BYTES = 1 << 20  # a recipe is a few hundred bytes; a megabyte is no recipe


class RecipeLoader(yaml.SafeLoader):
    """YAML without aliases: a recipe never needs them, and nested ones (a "billion laughs")
    expand a few hundred bytes into billions of items for whatever walks the value."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            mark = self.peek_event().start_mark
            raise yaml.composer.ComposerError(None, None, "aliases (*name) are not accepted in a recipe", mark)
        return super().compose_node(parent, index)


def load_recipe_yaml(text: str) -> Any:
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 (a SafeLoader)


def read_yaml(path: str | Path, what: str = "--config", known_only: bool = False) -> dict[str, Any]:
    """A YAML mapping of option: value (keys as flag names, - or _), checked; bounded in size
    and refused with aliases before anything is built from it. ``known_only`` leaves out the
    options this version does not know (a run's record written by another version) instead of
    refusing the file."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_RECIPE_BYTES + 1)
        if len(data) > MAX_RECIPE_BYTES:
            raise ConfigError(f"{what} {path}: over {MAX_RECIPE_BYTES >> 20} MB, not a recipe")
        raw = load_recipe_yaml(data.decode("utf-8"))
    except OSError as e:
        raise ConfigError(f"{what} {path}: {e.strerror}") from None
    except (yaml.YAMLError, RecursionError, UnicodeDecodeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ConfigError(f"{what} {path}: not valid YAML ({shown(first, 160)})") from None
    return _mapping(raw, f"{what} {path}", known_only)


def _mapping(raw: Any, where: str, known_only: bool = False) -> dict[str, Any]:
    raw = {} if raw is None else raw
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping of option: value")
    values = {str(k).replace("-", "_"): v for k, v in raw.items()}
    if known_only:
        values = {k: v for k, v in values.items() if k in FIELDS}
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {shown(', '.join(unknown[:10]))}")
    if values.get("preset") is not None:
        values["preset"] = str(values["preset"])  # `preset: 94` in YAML is an int
    return check_values(values, where)



def _quoted(value: Any) -> str:
    """A bad value as the error quotes it: a string in quotes, anything else bounded (``errors.shown``)."""
    return shown(repr(value[:100]) if isinstance(value, str) else value)


def _one_line(e: ValidationError, where: str) -> ConfigError:
    """pydantic's report -> one line naming the flag, in this project's words."""
    err = e.errors(include_url=False)[0]
    name = str(err["loc"][0]) if err["loc"] else "?"
    value, kind, ctx = err.get("input"), err["type"], err.get("ctx") or {}
    prefix = f"{where}: " if where else ""
    got = f", got {_quoted(value)}"
    if kind == "recipe":
        return ConfigError(f"{prefix}{flag(name)} {err['msg']}{got}")
    if kind == "value_error":
        return ConfigError(prefix + str(ctx.get("error", err["msg"])))
    if value is None and kind not in ("recipe", "value_error"):
        return ConfigError(f"{prefix}{flag(name)} needs a value{got}")
    if kind == "literal_error":
        return ConfigError(f"{prefix}{flag(name)} {_quoted(value)}: choose from {', '.join(map(str, choices(name)))}")
    expected = {
        "greater_than_equal": f"must be >= {ctx.get('ge')}", "less_than_equal": f"must be <= {ctx.get('le')}",
        "greater_than": f"must be > {ctx.get('gt')}", "less_than": f"must be < {ctx.get('lt')}",
        "finite_number": "must be finite", "bool_type": "expects true or false", "int_type": "expects an integer",
        "float_type": "expects a number", "string_type": "expects a string", "none_required": "needs no value",
    }.get(kind)  # fmt: skip
    return ConfigError(f"{prefix}{flag(name)} {expected or err['msg'][0].lower() + err['msg'][1:]}{got}")


def check_values(values: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Some options' values, checked against their types and bounds (the others keep their
    defaults); ConfigError naming the first bad option. Returns them as the config holds them
    (e.g. widths "64,256,256" -> [64, 256, 256])."""
    try:
        cfg = TrainConfig(**values)
    except ValidationError as e:
        raise _one_line(e, where) from None
    return {k: getattr(cfg, k) for k in values}


def field_kind(name: str) -> str:
    """'bool', 'int', 'float', 'str' or 'list': how a flag parses its text."""
    annotation = FIELDS[name].annotation
    options = [a for a in get_args(annotation) if a is not type(None)] if get_origin(annotation) is not Literal else []
    base = options[0] if options else annotation
    if get_origin(base) is Literal or get_origin(annotation) is Literal:
        return type(choices(name)[0]).__name__
    if get_origin(base) is list:
        return "list"
    return base.__name__ if isinstance(base, type) else "str"


def choices(name: str) -> tuple[Any, ...]:
    """The values a choice option takes (empty for a free one)."""
    annotation = FIELDS[name].annotation
    return tuple(get_args(annotation)) if get_origin(annotation) is Literal else ()


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


# ----------------------------------------------------------------------------- layering


def build(given: dict[str, Any], saved: dict[str, Any] | None = None, refit_of: dict[str, Any] | None = None) -> TrainConfig:
    """defaults < preset < saved (a resumed run's config) < given (--config, then flags).

    The preset is the one given, else the saved run's, else (for a refit that names no model)
    the one of the run it starts from, else the one its model implies."""
    given = check_values(given)
    name = given.get("preset")
    if saved and name and name != implied_preset(saved):
        raise ConfigError(f"--preset {name}: a resumed run keeps its own recipe (preset {implied_preset(saved)}); "
                          "start a new run with --init-from to train it as another preset")  # fmt: skip
    if not name and saved:
        name = implied_preset(saved)
    elif not name and refit_of is not None and "model" not in given:
        name = implied_preset(refit_of or {"model": given.get("model")})
    name = name or implied_preset({"model": given.get("model")})
    values = {**preset(name), "preset": name, **(saved or {}), **given}
    if "augment" in given and values["augment"] != {**preset(name), **(saved or {})}.get("augment"):
        # A preset's ranges belong to its augmentation: one that swaps it (photo's robust for
        # standard) drops the ranges the new one has no use for (photo's jpeg_quality_min).
        own = set(AUGMENT_DEFAULTS.get(values["augment"], {}))
        values |= {k: None for k in AUGMENT_RANGES if k not in given and k not in own}
    if values.get("alternate_flip") and "alternate_flip" not in given and values.get("augment") not in ("standard", "robust"):
        # The preset's mirror schedule belongs to its crop+flip augmentation: a run that swaps the
        # augmentation (e.g. --augment none) drops it; asking for both is refused before the run.
        values["alternate_flip"] = False
    if values.get("calib_jpeg") and "calib_jpeg" not in given and values.get("calibrate") in ("fixed", "none"):
        # The preset's JPEG copies belong to the temperature it fits: a run that fits none (e.g.
        # --preset 90 --calibrate none) drops them; asking for both is refused before the run.
        values["calib_jpeg"] = False
    try:
        return TrainConfig(**values)
    except ValidationError as e:
        raise _one_line(e, "") from None
