"""Command-line entry points: parsers, the call into the package, errors -> exit statuses.

    cifar-train --data-dir ../shared/data/cifar10                  # the default recipe (--preset 94)
    cifar-train --preset seed --print-config > my.yaml             # a recipe to read and edit
    cifar-evaluate lightning_logs/version_0/checkpoints/last.ckpt

Nothing heavy is imported at load time: ``--help`` reads no torch or Lightning. Exit statuses:
0 done; 2 a user error (bad flag, file or model: one line); 1 a failure (one line, or a
traceback with CIFAR_LIGHTNING_DEBUG=1); 128+N stopped by signal N after saving a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cifar_lightning import recipes
from cifar_lightning.errors import ConfigError, RunInterruptedError, TrainingFailedError, UserError
from cifar_lightning.export import FORMATS
from cifar_lightning.recipes import ACCELERATORS, AUGMENT_RANGES, AUGMENTS, FIELDS, SECTIONS, TTA_LEVELS, WHY


class OneLineParser(argparse.ArgumentParser):
    """argparse that reports a bad flag in one line (no usage dump) and exits with 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def _no_calibrate_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="raw probabilities: leave out the temperature fitted after training")


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


# ----------------------------------------------------------------------------- train

METAVARS = {"resume": "PATH|last", "init_from": "CKPT", "log_images_every": "K", "checkpoint_every_steps": "N", "widths": "A,B,C"}
BY_PRESET = {"model", "epochs", "batch_size", "lr", "optimizer", "schedule", "val_size", "augment", "precision", "tta", "widths", "depth",
             "calibrate"}


def _by_preset(name: str) -> str:
    """Help text: what each preset sets this option to, e.g. ' (94: 13, 90: 6, 93: 8, seed: 20)'."""
    default = FIELDS[name].default

    def show(v: Any) -> str:
        return ",".join(map(str, v)) if isinstance(v, list) else str(v)

    return " (" + ", ".join(f"{p}: {show(recipes.preset(p).get(name, default))}" for p in recipes.preset_names()) + ")"


def _add_knob(group: argparse._ArgumentGroup, name: str) -> None:
    f, kind = FIELDS[name], str(FIELDS[name].type)
    help_text = (WHY[name] + (_by_preset(name) if name in BY_PRESET else "")).replace("%", "%%")
    flag = recipes.flag(name)
    if kind.startswith("bool"):
        group.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"{help_text} (default {f.default})")
        return
    kw: dict[str, Any] = {"help": help_text, "metavar": METAVARS.get(name)}
    if "choices" in f.metadata:
        kw["choices"], kw["metavar"] = f.metadata["choices"], None
    if kind.startswith("int") and name != "devices":
        kw["type"] = int
    elif kind.startswith("float"):
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
    return recipes.resolve({**(recipes.read_yaml(args.pop("config")) if "config" in args else {}), **args})


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
        from cifar_lightning.train import run_training, summary

        results = run_training(cfg)
        if results["global_rank"] == 0:
            print(summary(results))
        return 0

    return _guarded("cifar-train", body)


# ----------------------------------------------------------------------------- evaluate


def evaluate_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="cifar-evaluate",
        description="Evaluate a checkpoint or an export (with its test-time augmentation): metrics.json, confusion heatmaps, "
        "prediction grids, calibration, training curves and report.md in one folder.",
    )
    p.add_argument("model", help="a .ckpt written by cifar-train, or a .safetensors/.onnx written by cifar-export")
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
        from cifar_lightning import report
        from cifar_lightning.evaluate import evaluate
        from cifar_lightning.inference import device_for

        out, metrics = evaluate(
            args.model, args.data_dir, args.split, args.out, args.overwrite, device_for(args.accelerator), args.batch_size,
            args.grid, args.download, calibrate=args.calibrate, corruptions=args.corruptions, seed=args.seed,
        )  # fmt: skip
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
        from cifar_lightning import report

        out = _new_file(args.out or ("data_grid.png" if args.augment == "none" else f"data_grid_{args.augment}.png"), args.overwrite)
        ranges = {k: recipes.check_value(k, getattr(args, k)) for k in AUGMENT_RANGES if getattr(args, k) is not None}
        fig = report.data_grid_of(args.data_dir, args.augment, ranges, args.per_class, args.n_augmented, args.seed, args.download)
        try:
            report.save_figure(fig, out)
        except OSError as e:
            raise ConfigError(f"--out {out}: cannot write ({e.strerror or e})") from None
        print(out)
        return 0

    return _guarded("cifar-show-data", body)


# ----------------------------------------------------------------------------- export


def export_parser() -> argparse.ArgumentParser:
    p = OneLineParser(
        prog="cifar-export",
        description="Export a checkpoint to safetensors (+ JSON metadata), ONNX or TorchScript, checked against "
        "the PyTorch network on real test images. The checkpoint's test-time augmentation goes with it.",
    )
    p.add_argument("checkpoint", help="a Lightning .ckpt written by cifar-train")
    p.add_argument("--format", choices=FORMATS, required=True)
    p.add_argument("--out", required=True, help="output file; its metadata goes to OUT.json")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    p.add_argument("--tta", type=int, choices=TTA_LEVELS,
                   help="test-time views built into the export: 0 the plain network, 1 + mirror, 2 + translations "
                   "(default: the checkpoint's own, so the export scores what the checkpoint scored)")  # fmt: skip
    p.add_argument("--data-dir", help="test images for the check (default: the run's data dir)")
    p.add_argument("--check-images", type=_positive_int, default=256, help="test images in the check (default 256)")
    p.add_argument("--random-check", action="store_true", help="no test images at hand: check on seeded random images (numerics only)")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="a graph that outputs raw logits (the temperature is still recorded in OUT.json)")
    p.add_argument("--no-download", dest="download", action="store_false", help="never download CIFAR-10")
    return p


def export_main(argv: list[str] | None = None) -> int:
    """Entry point of cifar-export."""
    args = export_parser().parse_args(argv)

    def body() -> int:
        from cifar_lightning.checkpoint import classifier_from_checkpoint, load_checkpoint, refuse_overlap, sidecar_path
        from cifar_lightning.export import check_images, export, export_path

        ckpt_path = Path(args.checkpoint)
        module = classifier_from_checkpoint(load_checkpoint(ckpt_path), ckpt_path)
        out = export_path(Path(args.out), args.format)
        refuse_overlap(out, {"checkpoint": ckpt_path})
        refuse_overlap(sidecar_path(out), {"checkpoint": ckpt_path})
        out = _new_file(str(out), args.overwrite)
        images, where = check_images(ckpt_path, args.data_dir, args.check_images, args.download, args.random_check)
        try:
            check = export(module, ckpt_path, args.format, out, images, tta=args.tta, calibrate=args.calibrate)
        except OSError as e:
            raise ConfigError(f"--out {out}: cannot write ({e.strerror or e})") from None
        print(f"wrote {out} and {out.name}.json (test-time views: {module.hparams.tta if args.tta is None else args.tta})")
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
    p.add_argument("--accelerator", choices=ACCELERATORS, default="cpu")
    _no_calibrate_flag(p)
    return p


def predict_main(argv: list[str] | None = None) -> int:
    """Entry point of cifar-predict."""
    args = predict_parser().parse_args(argv)

    def body() -> int:
        from cifar_lightning.inference import device_for, expand_inputs, load_classifier, predict_files

        clf = load_classifier(args.model, device=device_for(args.accelerator), calibrate=args.calibrate)
        files = expand_inputs(args.paths)
        if not files:
            raise ConfigError("no image files found in the given paths")
        results = predict_files(clf, files, args.top_k, args.batch_size)
        if args.json:
            print(json.dumps(results, indent=2, allow_nan=False))
        for r in results if not args.json else []:
            if "error" in r:
                print(f"error: {r['error']}", file=sys.stderr)
                continue
            print(r["path"] + "".join(f"\n  {t['class']:<12} {t['probability']:.4f}" for t in r["top_k"]))
        return 0 if all("top_k" in r for r in results) else 1

    return _guarded("cifar-predict", body)


# ----------------------------------------------------------------------------- serve


def serve_parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="cifar-serve", description="Serve a model over HTTP: POST /predict, GET /info, GET /health, "
                      "and a page at / to drop an image on. Batches concurrent requests (LitServe).")  # fmt: skip
    p.add_argument("model", help="a .ckpt, or a .safetensors / .onnx export (ONNX Runtime is the fastest on a CPU)")
    p.add_argument("--host", default="127.0.0.1", help="interface to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000, help="(default 8000)")
    p.add_argument("--max-batch-size", type=_positive_int, default=32, help="requests run together (default 32; 1: no batching)")
    p.add_argument("--batch-timeout", type=float, default=0.005, help="seconds a batch waits to fill (default 0.005)")
    p.add_argument("--workers", type=_positive_int, default=1, help="model workers per device (default 1)")
    p.add_argument("--accelerator", choices=("cpu", "cuda", "gpu", "mps", "auto"), default="cpu")
    p.add_argument("--top-k", type=_positive_int, default=5, help="classes per answer unless the request says (default 5)")
    p.add_argument("--max-upload-mb", type=float, default=10.0, help="larger uploads are refused unread (default 10)")
    _no_calibrate_flag(p)
    return p


def serve_main(argv: list[str] | None = None) -> int:
    """Entry point of cifar-serve."""
    args = serve_parser().parse_args(argv)

    def body() -> int:
        if not (0 <= args.port <= 65535 and 0 <= args.batch_timeout < 60 and 0 < args.max_upload_mb <= 1024):
            raise ConfigError("--port, --batch-timeout or --max-upload-mb out of range")
        from cifar_lightning.serve import build_server

        server = build_server(args.model, args.max_batch_size, args.batch_timeout, args.workers, args.accelerator, args.top_k,
                              args.max_upload_mb, args.calibrate)  # fmt: skip
        import signal

        main_pid = os.getpid()

        def stop(signum: int, frame: object) -> None:
            if os.getpid() != main_pid:  # a forked LitServe process: die as SIGTERM means
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
                os.kill(os.getpid(), signal.SIGTERM)
            raise KeyboardInterrupt  # LitServe's own shutdown path: it stops its workers too

        signal.signal(signal.SIGTERM, stop)
        print(f"cifar-serve: {args.model} on http://{args.host}:{args.port}/ (Ctrl-C stops)", flush=True)
        try:
            server.run(host=args.host, port=args.port, generate_client_file=False, log_level="warning")
        except KeyboardInterrupt:
            pass
        return 0

    return _guarded("cifar-serve", body)


# ----------------------------------------------------------------------------- errors -> exit statuses


def _new_file(path: str, overwrite: bool) -> Path:
    """An output file that may be written: a user's earlier result is replaced only when asked."""
    out = Path(path)
    if out.exists() and not overwrite:
        raise ConfigError(f"--out {out}: exists; pass --overwrite or choose another path")
    return out


def _user_errors() -> tuple[type[BaseException], ...]:
    """UserError, and Lightning's own configuration error when Lightning was loaded at all."""
    lightning_errors = sys.modules.get("lightning.fabric.utilities.exceptions")
    return (UserError, *([lightning_errors.MisconfigurationException] if lightning_errors else []))


def _fail(prog: str, message: str, code: int) -> int:
    print(f"{prog}: error: {' '.join(message.split())}", file=sys.stderr)
    return code


def _guarded(prog: str, body: Callable[[], int]) -> int:
    """Run body(); user errors become one line and exit 2, anything else one line and exit 1."""
    try:
        return body()
    except RunInterruptedError as e:
        return _fail(prog, str(e), e.code)
    except TrainingFailedError as e:
        return _fail(prog, str(e), 1)
    except KeyboardInterrupt:
        return _fail(prog, "interrupted", 130)
    except Exception as e:
        if isinstance(e, _user_errors()):
            return _fail(prog, str(e), 2)
        if isinstance(e, OSError):
            # A full disk, an unwritable folder: say which file; files are written atomically,
            # so the ones already there are intact.
            where = f" {e.filename}" if e.filename else ""
            return _fail(prog, f"cannot write or read{where}: {e.strerror or e} (files written before are intact)", 1)
        if os.environ.get("CIFAR_LIGHTNING_DEBUG"):
            raise
        return _fail(prog, f"{type(e).__name__}: {e} (set CIFAR_LIGHTNING_DEBUG=1 for a traceback)", 1)
