"""Command-line entry points: each parses its flags and hands over to the module that does the
work; ``errors.exit_status`` maps what it raises to an exit status. ``--help`` reads no torch,
numpy, PIL or Lightning, so each body's module is imported inside its function.

    cifar-train --preset seed --print-config > my.yaml             # a recipe to read and edit
"""

from __future__ import annotations

import argparse
from typing import Any

from cifar_lightning import recipes, runs
from cifar_lightning.errors import exit_status
from cifar_lightning.recipes import ACCELERATORS, AUGMENT_RANGES, AUGMENTS, EXPORT_FORMATS, FIELDS, SECTIONS, TTA_LEVELS, WHY


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage dump) and exits with 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _no_calibrate_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false", help="raw probabilities: leave out the fitted temperature")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# ----------------------------------------------------------------------------- train

METAVARS = {"resume": "PATH|last", "init_from": "CKPT|pretrained:NAME", "log_images_every": "K", "checkpoint_every_steps": "N",
            "widths": "A,B,C"}
BY_PRESET = {"model", "epochs", "batch_size", "lr", "optimizer", "schedule", "val_size", "augment", "precision", "tta", "widths", "depth",
             "calibrate"}


def _by_preset(name: str) -> str:
    """Help text: what each preset sets this option to, e.g. ' (94: 13, 90: 6, 93: 8, seed: 20)'."""
    default = FIELDS[name].default

    def show(v: Any) -> str:
        return ",".join(map(str, v)) if isinstance(v, list) else str(v)

    return " (" + ", ".join(f"{p}: {show(recipes.preset(p).get(name, default))}" for p in recipes.preset_names()) + ")"


def _add_knob(group: argparse._ArgumentGroup, name: str) -> None:
    f, kind = FIELDS[name], recipes.field_kind(name)
    help_text = (WHY[name] + (_by_preset(name) if name in BY_PRESET else "")).replace("%", "%%")
    flag = recipes.flag(name)
    if kind == "bool":
        group.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"{help_text} (default {f.default})")
        return
    kw: dict[str, Any] = {"help": help_text, "metavar": METAVARS.get(name)}
    if recipes.choices(name):
        kw["choices"], kw["metavar"] = recipes.choices(name), None
    if kind == "int" and name != "devices":
        kw["type"] = int
    elif kind == "float":
        kw["type"] = float
    group.add_argument(flag, **kw)


def train_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="cifar-train",
        description="Train a CIFAR-10 classifier with PyTorch Lightning, then test it on the official test set.",
        argument_default=argparse.SUPPRESS,  # only flags actually given override the recipe
        epilog=f"Presets are YAML files, e.g. {recipes.preset_file(recipes.DEFAULT_PRESET)}",
    )
    p.add_argument("--config", metavar="YAML", help="a recipe file: any of these options (keys as flag names, - or _)")
    p.add_argument("--preset", choices=recipes.preset_names(),
                   help=f"a whole recipe: 90/93/94 (the fast network, aimed at that test accuracy) or seed (the Keras notebook); "
                   f"flags override its values (default {recipes.DEFAULT_PRESET}, or seed with --model seed)")  # fmt: skip
    p.add_argument("--print-config", action="store_true", help="print the resolved recipe as YAML (that --config takes back) and exit")
    for title, names in SECTIONS.items():
        group = p.add_argument_group(title)
        for name in names:
            _add_knob(group, name)
    return p


def _recipe(args: dict[str, Any]) -> recipes.TrainConfig:
    """--config values, then the flags given on top of them, layered over preset and defaults."""
    args = {k: v for k, v in args.items() if k != "print_config"}
    return runs.resolve_recipe({**(recipes.read_yaml(args.pop("config")) if "config" in args else {}), **args})


def resolve_train_config(argv: list[str] | None) -> recipes.TrainConfig:
    """The recipe a cifar-train command line asks for."""
    return _recipe(vars(train_parser().parse_args(argv)))


def train_main(argv: list[str] | None = None) -> int:
    """Entry point of cifar-train."""
    args = vars(train_parser().parse_args(argv))

    def body() -> int:
        cfg = _recipe(args)
        if args.get("print_config"):
            print(cfg.to_yaml(), end="")
            return 0
        from cifar_lightning.training import train_command  # torch and Lightning load only now

        train_command(cfg)
        return 0

    return exit_status("cifar-train", body, sigterm=False)  # Lightning saves a checkpoint on SIGTERM


# ----------------------------------------------------------------------------- evaluate


def evaluate_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="cifar-evaluate",
        description="Evaluate a checkpoint or an export (with its test-time augmentation): metrics.json, confusion heatmaps, "
        "prediction grids, calibration, training curves and report.md in one folder.",
    )
    p.add_argument("model", help="a .ckpt written by cifar-train, a .safetensors/.onnx/.pt2 written by cifar-export, or pretrained:NAME")
    p.add_argument("--data-dir", help="default: the data dir of the model's training run (its config.yaml), else 'data'")
    p.add_argument("--split", choices=("test", "val"), default="test", help="val = the run's held-out split (default test)")
    p.add_argument("--out", help="report folder (default: report/ beside the run's checkpoints/, or MODEL_report/; _2... if taken)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    p.add_argument("--accelerator", choices=ACCELERATORS, default="auto")
    p.add_argument("--batch-size", type=_positive_int, default=500)
    p.add_argument("--grid", type=_positive_int, default=25, help="images in predictions.png and misclassified.png")
    p.add_argument("--corruptions", nargs="?", const="all", metavar="NAMES",
                   help="also score corrupted copies of the split: all (JPEG, noise, blur, brightness, contrast, pixelation), "
                   "or some, e.g. jpeg,gaussian_noise")
    p.add_argument("--seed", type=int, default=0, help="seed of the corruptions' noise (default 0)")
    _no_calibrate_flag(p)
    p.add_argument("--no-download", dest="download", action="store_false", help="never download CIFAR-10")
    return p


def evaluate_main(argv: list[str] | None = None) -> int:
    """Entry point of cifar-evaluate."""
    args = evaluate_parser().parse_args(argv)

    def body() -> int:
        from cifar_lightning.evaluate import evaluate_command  # torch loads only now

        return evaluate_command(**vars(args))

    return exit_status("cifar-evaluate", body)


# ----------------------------------------------------------------------------- show data


def show_data_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="cifar-show-data",
        description="Look at the data: a grid of training images per class, or with --augment, "
        "originals beside augmented versions of them.",
    )
    p.add_argument("--data-dir", default="data", help="as for cifar-train (default data)")
    p.add_argument("--augment", choices=AUGMENTS, default="none")
    group = p.add_argument_group("augmentation ranges (as for cifar-train)")
    for name in AUGMENT_RANGES:
        _add_knob(group, name)
    p.set_defaults(**dict.fromkeys(AUGMENT_RANGES))
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
        ranges = recipes.check_values({k: getattr(args, k) for k in AUGMENT_RANGES if getattr(args, k) is not None})
        from cifar_lightning.show_data import show_data_command  # torch and matplotlib load only now

        show_data_command(args.data_dir, args.augment, ranges, args.per_class, args.n_augmented, args.seed, args.out, args.overwrite,
                          args.download)  # fmt: skip
        return 0

    return exit_status("cifar-show-data", body)


# ----------------------------------------------------------------------------- export


def export_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="cifar-export",
        description="Export a checkpoint (or weights) to safetensors, ONNX, a torch.export program (pt2) or TorchScript (deprecated: "
        "for C++ users), each with OUT.json metadata, checked against "
        "the PyTorch network on real test images. The checkpoint's test-time augmentation goes with it.",
    )
    p.add_argument("checkpoint", help="a .ckpt written by cifar-train, a safetensors export or pretrained:NAME")
    p.add_argument("--format", dest="fmt", metavar="{" + ",".join(EXPORT_FORMATS) + "}", choices=EXPORT_FORMATS, required=True,
                   help="pt2: a torch.export program for Python; torchscript is deprecated (torch 2.14), kept for C++")
    p.add_argument("--out", required=True, help="output file; its metadata goes to OUT.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--tta", type=int, choices=TTA_LEVELS,
                   help="test-time views built into the export: 0 the plain network, 1 + mirror, 2 + translations where unsure, 3 on all "
                   "(default: the checkpoint's own, so the export scores what the checkpoint scored)")  # fmt: skip
    p.add_argument("--data-dir", help="test images for the check (default: the run's data dir)")
    p.add_argument("--check-images", dest="n_check", metavar="N", type=_positive_int, default=256, help="test images checked (default 256)")
    p.add_argument("--random-check", action="store_true", help="no test images at hand: check on seeded random images (numerics only)")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="a graph that outputs raw logits (the temperature is still recorded in OUT.json)")
    p.add_argument("--no-download", dest="download", action="store_false", help="never download CIFAR-10")
    p.add_argument("--half", action="store_true",
                   help="safetensors only: store the weights in float16 (half the size; loaded back into float32)")
    return p


def export_main(argv: list[str] | None = None) -> int:
    """Entry point of cifar-export."""
    args = export_parser().parse_args(argv)

    def body() -> int:
        from cifar_lightning.export import export_command  # torch loads only now

        return export_command(**vars(args))

    return exit_status("cifar-export", body)


# ----------------------------------------------------------------------------- predict


def predict_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="cifar-predict",
        description="Classify image files (or folders, recursively) with a .ckpt, .safetensors, .onnx or .pt2 model, or a "
        "bundled one (pretrained:NAME; with no model given, the bundled default). "
        "Exit status: 0 every input predicted, 1 some inputs failed, 2 bad model or flags.",
        usage="%(prog)s [MODEL] PATH [PATH ...] [options]",
    )
    p.add_argument("paths", nargs="+", metavar="[MODEL] PATH",
                   help="a model (a Lightning .ckpt, a cifar-export .safetensors or .pt2 with its .json, an .onnx, or pretrained:NAME), "
                   "then image files or folders; without a model, the bundled default classifies them")  # fmt: skip
    p.add_argument("--top-k", type=_positive_int, default=3, help="classes shown per image; at most the model's (default 3)")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of tables")
    p.add_argument("--batch-size", type=_positive_int, default=256)
    p.add_argument("--accelerator", choices=ACCELERATORS, default="cpu")
    _no_calibrate_flag(p)
    return p


def predict_main(argv: list[str] | None = None) -> int:
    """Entry point of cifar-predict."""
    args = predict_parser().parse_args(argv)

    def body() -> int:
        from cifar_lightning.predict import predict_command, split_model_argument  # torch loads only now

        return predict_command(*split_model_argument(args.paths), args.top_k, args.json, args.batch_size, args.accelerator,
                               args.calibrate)  # fmt: skip

    return exit_status("cifar-predict", body)


# ----------------------------------------------------------------------------- serve


def serve_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="cifar-serve", description="Serve a model over HTTP: POST /predict, GET /info, GET /health, "
                      "and a page at / to drop an image on. Batches concurrent requests (LitServe).")  # fmt: skip
    p.add_argument("model", nargs="?", help="a .ckpt, a .safetensors / .onnx / .pt2 export (ONNX Runtime is the fastest on a CPU) or "
                   "pretrained:NAME (default: the bundled default model)")  # fmt: skip
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="(default 8000)")
    p.add_argument("--max-batch-size", type=_positive_int, default=32, help="requests run together (default 32; 1: no batching)")
    p.add_argument("--batch-timeout", type=float, default=0.005, help="seconds a batch waits to fill (default 0.005)")
    p.add_argument("--workers", type=_positive_int, default=1, help="model workers per device (default 1)")
    p.add_argument("--accelerator", choices=("cpu", "cuda", "gpu", "mps", "auto"), default="cpu")
    p.add_argument("--top-k", type=_positive_int, default=5, help="classes per answer unless asked; at most the model's (default 5)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="larger uploads are refused unread (default 10)")
    _no_calibrate_flag(p)
    return p


def serve_main(argv: list[str] | None = None) -> int:
    """Entry point of cifar-serve."""
    args = serve_parser().parse_args(argv)

    def body() -> int:
        from cifar_lightning.serve import serve_command  # torch and LitServe load only now

        return serve_command(**vars(args))

    return exit_status("cifar-serve", body, sigterm=False)  # uvicorn shuts down on SIGTERM
