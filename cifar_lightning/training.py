"""One training run in named steps: data, module, trainer, fit and test, results.

    import cifar_lightning
    result = cifar_lightning.train(preset="seed", data_dir="../shared/data/cifar10", epochs=2)
    result.metrics["test_acc"], result.checkpoint, result.classifier().predict(["cat.jpg"])

Each step is a function a benchmark or a test can call or replace; ``run_training`` strings
them together and is what ``cifar-train`` runs after resolving its recipe; ``train`` is the
same path for Python (a notebook), raising the project's exceptions instead of exiting.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import sys
import threading
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.strategies import StrategyRegistry
from lightning.pytorch.utilities.exceptions import SIGTERMException

from cifar_lightning import bundled, calibration, runs
from cifar_lightning.callbacks import EpochReport, Lookahead, RunEstimate, StepCheckpoint, StopOnSignal, TensorBoardImages
from cifar_lightning.checkpoint import checkpoint_bytes, load_checkpoint, non_finite_tensor, state_dict_mismatch
from cifar_lightning.corruptions import jpeg
from cifar_lightning.data import CIFAR10DataModule
from cifar_lightning.devices import device_for, resolve_precision
from cifar_lightning.errors import (
    CheckpointError,
    ConfigError,
    ModelError,
    RunInterruptedError,
    TrainingFailedError,
    shown_names,
    sigterm_raises,
)
from cifar_lightning.fileio import atomic_write_bytes, atomic_write_text, is_temp_sibling, refuse_overlap
from cifar_lightning.inference import Classifier, checkpoint_classifier, load_classifier
from cifar_lightning.modelfile import open_model
from cifar_lightning.models import MODELS
from cifar_lightning.module import ImageClassifier, NonFiniteLossError
from cifar_lightning.recipes import FIELDS, SECTIONS, TrainConfig, parse_max_time, read_yaml
from cifar_lightning.recipes import build as build_recipe


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint writes that a kill or a full disk can never leave half-done.

    Lightning writes through an fsspec transaction whose temporary file lives in the system
    temp dir: across file systems the final move is a copy, which a kill can cut short. Here
    the bytes, serialised in memory, go through ``fileio.atomic_write_bytes`` (a hidden sibling, flushed to disk, then
    renamed); on any error the previous checkpoint is untouched.
    """

    def save_checkpoint(self, checkpoint: dict, path: str | Path, storage_options: object = None) -> None:
        path = Path(path)
        bad = non_finite_tensor(checkpoint.get("state_dict", {}))
        if bad:
            # Never a poisoned checkpoint: the previous one stays the last good one.
            raise NonFiniteLossError(f"the weights became non-finite ({bad}) by step {checkpoint.get('global_step')}; not saved")

        try:
            atomic_write_bytes(path, checkpoint_bytes(checkpoint), fsync=True)
        except OSError as e:
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None


def keep_freed_memory() -> None:
    """Ask glibc to keep freed memory for reuse. By default it returns every large freed block
    to the system, and the next training step faults the same pages back in: about 2,000 page
    faults per step of the seed network at batch 64, 12% of its CPU step. A training process
    allocates the same sizes every step, so keeping up to 1 GiB of free heap costs nothing it
    would not hold at its peak anyway. A no-op where the C library is not glibc."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_top_pad, m_mmap_threshold = -1, -2, -3
    mallopt(m_mmap_threshold, 32 << 20)  # glibc's ceiling; larger blocks (the dataset) stay mmap'd
    mallopt(m_trim_threshold, 1 << 30)
    mallopt(m_top_pad, 64 << 20)


def launch_rank() -> int:
    """This process's rank as its launcher set it before Lightning starts: 0 for a plain run and
    for the process that Lightning's DDP launcher starts from; torchrun, SLURM and Lightning's
    launcher set these variables for the others."""
    for key in ("RANK", "SLURM_PROCID", "LOCAL_RANK", "NODE_RANK"):
        value = os.environ.get(key, "")
        if value.isdigit() and int(value) > 0:
            return int(value)
    return 0


def quiet_lightning() -> None:
    """Silence warnings that do not apply to this design (in-memory data needs no workers)."""
    warnings.filterwarnings("ignore", message=r".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=r".*`isinstance\(treespec, LeafSpec\)` is deprecated.*")


def versions() -> dict[str, str]:
    """What produced a run: recorded in results.json beside its figures."""
    try:
        ours = metadata.version("cifar-lightning")
    except metadata.PackageNotFoundError:
        ours = "unknown"
    return {"cifar_lightning": ours, "torch": torch.__version__, "lightning": L.__version__, "python": sys.version.split()[0]}


# ----------------------------------------------------------------------------- the steps


def check_before_start(cfg: TrainConfig) -> None:
    """Step 0: what only the installed torch and Lightning can judge, checked before anything is
    created, so a bad option is one line naming it and never a half-made run directory."""
    if cfg.model not in MODELS:
        raise ConfigError(f"--model {cfg.model!r}: unknown; choose from {', '.join(sorted(MODELS))}")
    if cfg.alternate_flip and cfg.augment not in ("standard", "robust"):
        raise ConfigError(f"--alternate-flip needs --augment standard or robust (got {cfg.augment}); or add --no-alternate-flip")
    if cfg.robust_from and cfg.augment != "robust":
        raise ConfigError(f"--robust-from {cfg.robust_from}: delays the photo operations of --augment robust (got {cfg.augment})")
    if cfg.robust_from and int(cfg.robust_from * cfg.epochs) == 0:
        raise ConfigError(f"--robust-from {cfg.robust_from} of {cfg.epochs} epoch(s) leaves no whole epoch of crop and flip only; "
                          f"use at least {1 / cfg.epochs:.3g}, or 0")  # fmt: skip
    if cfg.calibrate == "val" and cfg.val_size == 0:
        raise ConfigError("--calibrate val needs a validation split (--val-size > 0); use --calibrate heldout or auto")
    if cfg.calibrate == "fixed" and cfg.temperature is None:
        raise ConfigError("--calibrate fixed needs --temperature T (fitted once on held-out images of the same recipe)")
    if cfg.calib_jpeg and cfg.calibrate in ("fixed", "none"):
        raise ConfigError(f"--calib-jpeg adds JPEG copies to the images a temperature is fitted on; --calibrate "
                          f"{cfg.calibrate} fits none (use heldout, val or auto)")  # fmt: skip
    if cfg.strategy != "auto" and cfg.strategy not in StrategyRegistry.available_strategies():
        raise ConfigError(f"--strategy {cfg.strategy!r}: not a Lightning strategy; e.g. auto, ddp, ddp_spawn, fsdp")
    device_for(cfg.accelerator)  # an accelerator this machine lacks: one line, before anything
    if cfg.data_dir and not cfg.resume:
        # A run folder inside the data would become a class folder of the next run's data.
        refuse_overlap(Path(cfg.log_dir), {}, inside={"data dir": Path(cfg.data_dir)}, flag="--log-dir")
    launched = "WORLD_SIZE" in os.environ or "SLURM_NTASKS" in os.environ or {"MASTER_ADDR", "NODE_RANK"} <= set(os.environ)
    if cfg.num_nodes > 1 and not launched:
        raise ConfigError(
            f"--num-nodes {cfg.num_nodes}: start each node with torchrun or SLURM (or set MASTER_ADDR, MASTER_PORT and "
            "NODE_RANK); without them the processes would wait for each other forever"
        )


def build_data(cfg: TrainConfig) -> CIFAR10DataModule:
    """Step 1: the data module, loaded and split. Data problems surface here, before a run
    directory exists: so does a split that leaves nothing to train or calibrate on, which would
    otherwise fail only after training."""
    dm = CIFAR10DataModule.from_config(cfg)
    dm.prepare_data()
    dm.setup("fit")
    if len(dm.train_set) == 0:
        raise ConfigError(f"no training images left after --val-size {cfg.val_size} (the data has {len(dm.train_set) + len(dm.val_set)})")
    split = cfg.calibration_split()
    fit_on = dm.calib_set if split == "heldout" else dm.val_set if split == "val" else None
    if fit_on is not None and len(fit_on) == 0:
        left = len(dm.train_set) + len(dm.calib_set)
        raise ConfigError(
            f"--calibrate {split}: no images to fit the temperature on ({left} images are left after --val-size "
            f"{cfg.val_size}, and at most a tenth of them are held out); lower --val-size, or use --calibrate none"
        )
    return dm


@dataclass
class RunStart:
    """Where a run starts: its module, its folder and, when resuming, the checkpoint."""

    module: ImageClassifier
    run_dir: Path
    resume_ckpt: Path | None


def build_module(cfg: TrainConfig, classes: list[str]) -> RunStart:
    """Step 2: the module (fresh, from --init-from weights, or resumed) and its run folder."""
    if cfg.resume:
        resume_ckpt = Path(cfg.resume)
        module = ImageClassifier.from_checkpoint(resume_ckpt)
        check_resume_agrees(cfg, classes, module)
        run_dir = runs.run_dir_of_resumed(resume_ckpt)
    else:
        resume_ckpt = None
        module = ImageClassifier.from_config(cfg, classes)
        if cfg.init_from:
            load_init_weights(module, cfg)
        # Under DDP only rank 0 claims a run directory; Lightning broadcasts its checkpoint
        # folder to the other processes, which write nothing of their own.
        rank = launch_rank()
        run_dir = runs.claim_new_run_dir(Path(cfg.log_dir)) if rank == 0 else Path(cfg.log_dir) / f".rank{rank}"
    if cfg.channels_last:
        module = module.to(memory_format=torch.channels_last)
        module.channels_last = True
    return RunStart(module, run_dir, resume_ckpt)


def check_resume_agrees(cfg: TrainConfig, classes: list[str], module: ImageClassifier) -> None:
    """A resumed run trains the checkpoint's network with its own hyper-parameters: a data dir
    of other classes, or a flag asking for another network or optimiser, is refused before the
    run's record changes (its config.yaml must stay true to what trains)."""
    hp = module.hparams
    names = list(hp.get("class_names") or [])
    if len(classes) != int(hp.num_classes) or (names and names != list(classes)):
        raise ConfigError(
            f"--resume {cfg.resume}: the run trains {int(hp.num_classes)} classes ({shown_names(names)}), "
            f"--data-dir {cfg.data_dir} has {len(classes)} ({shown_names(classes)}); resume on the run's data"
        )
    for key, wanted in ImageClassifier.config_args(cfg, classes).items():
        if key not in ("num_classes", "class_names") and key in hp and hp[key] != wanted:
            flag = {"model_args": "--widths/--depth"}.get(key, "--" + key.replace("_", "-"))
            raise ConfigError(
                f"{flag}: a resumed run keeps its checkpoint's value ({str(hp[key])[:60]}), not {str(wanted)[:60]}; "
                "start a new run with --init-from to change it"
            )



def load_init_weights(module: ImageClassifier, cfg: TrainConfig) -> None:
    """--init-from: the network's weights from another run (a refit) or from a safetensors
    export such as ``pretrained:94`` (a fine-tune), nothing of its state:
    any weights file ``modelfile.open_model`` reads and checks. A float16 export is widened to
    the module's float32."""
    try:
        source = open_model(cfg.init_from)
    except (ModelError, CheckpointError) as e:
        raise ConfigError(f"--init-from: {e}") from None
    if source.weights is None:
        raise ConfigError(f"--init-from {cfg.init_from}: a {source.kind.name} graph holds no weights to start from; "
                          "give a checkpoint, a .safetensors export or pretrained:NAME")  # fmt: skip
    kind, state = source.meta.get("model"), source.weights
    if kind != cfg.model:
        raise ConfigError(f"--init-from {cfg.init_from}: a {kind!r} network cannot initialise --model {cfg.model!r}")
    own = module.net.state_dict()
    try:
        module.net.load_state_dict({k: v.to(own[k].dtype) if k in own else v for k, v in state.items()})
    except RuntimeError as e:
        raise ConfigError(f"--init-from {cfg.init_from}: weights do not fit ({state_dict_mismatch(e)})") from None


@dataclass
class Checkpoints:
    """The run's checkpoint callbacks: best (by val_acc, with a validation split), last (every
    epoch), steps (every N steps, optional) and the signal handler that saves on a stop."""

    best: ModelCheckpoint | None
    last: ModelCheckpoint
    steps: ModelCheckpoint | None
    stop: StopOnSignal

    def callbacks(self) -> list[L.Callback]:
        return [c for c in (self.best, self.last, self.steps, self.stop) if c is not None]

    def tested(self) -> str:
        """The checkpoint the final test reads: the best one with a validation split, else last."""
        if self.best and self.best.best_model_path:
            return self.best.best_model_path
        return self.last.last_model_path or self.last.best_model_path

    def last_good(self) -> str:
        """The newest checkpoint on disk (these callbacks monitor nothing, so Lightning records
        their file as best_model_path)."""
        found = [c.last_model_path or c.best_model_path for c in (self.steps, self.last) if c is not None]
        return next((p for p in found if p and Path(p).is_file()), "")


def build_checkpoints(cfg: TrainConfig, run_dir: Path) -> Checkpoints:
    folder = runs.checkpoints_dir(run_dir)
    # Two callbacks, because Lightning's save_last only refreshes last.ckpt when the monitored
    # checkpoint is saved (i.e. when val_acc improves): last.ckpt must be the latest epoch.
    best = ModelCheckpoint(
        dirpath=folder, filename="best-epoch{epoch:02d}-val_acc{val_acc:.4f}", monitor="val_acc", mode="max",
        auto_insert_metric_name=False,
    ) if cfg.val_size > 0 else None  # fmt: skip
    last = ModelCheckpoint(dirpath=folder, filename=Path(runs.LAST).stem, monitor=None, enable_version_counter=False)
    # Mid-epoch saves to the same last.ckpt, so a kill loses at most this many steps; the run
    # resumes from that exact step (see data.ResumableLoader and the module's RNG state).
    steps = StepCheckpoint(
        dirpath=folder, filename=Path(runs.LAST).stem, monitor=None, enable_version_counter=False,
        every_n_train_steps=cfg.checkpoint_every_steps, save_on_train_epoch_end=False,
    ) if cfg.checkpoint_every_steps else None  # fmt: skip
    return Checkpoints(best, last, steps, StopOnSignal(last))


def build_trainer(cfg: TrainConfig, run_dir: Path, classes: list[str], checkpoints: Checkpoints, steps_per_epoch: int,
                  callbacks: list[L.Callback] | None = None) -> L.Trainer:  # fmt: skip
    """Step 3: the Trainer with its logger, checkpoints and callbacks. Losses and the learning
    rate are logged every few steps (at least four times an epoch), so the schedule's warm-up
    and decay show in TensorBoard even for short runs."""
    for stale in runs.checkpoints_dir(run_dir).glob(".*"):  # left by a run killed mid-write
        if is_temp_sibling(stale):
            stale.unlink(missing_ok=True)
    progress = cfg.progress_bar if cfg.progress_bar is not None else sys.stderr.isatty()
    logger = TensorBoardLogger(save_dir=str(run_dir.parent), name="", version=run_dir.name, default_hp_metric=False)
    has_val = cfg.val_size > 0
    return L.Trainer(
        max_epochs=cfg.epochs, accelerator=cfg.accelerator, devices=cfg.devices,
        precision=resolve_precision(cfg.precision, cfg.accelerator), deterministic=cfg.deterministic,
        max_time=parse_max_time(cfg.max_time), strategy=cfg.strategy, num_nodes=cfg.num_nodes,
        logger=logger, plugins=[AtomicCheckpointIO()],
        callbacks=[
            *checkpoints.callbacks(), LearningRateMonitor("step"), EpochReport(),
            TensorBoardImages(classes, every_n_epochs=cfg.log_images_every),
            *([Lookahead()] if cfg.lookahead else []), RunEstimate(long_run_hint(cfg)), *(callbacks or []),
        ],
        enable_progress_bar=progress, log_every_n_steps=max(1, min(10, steps_per_epoch // 4)), enable_model_summary=progress,
        **({} if has_val else {"limit_val_batches": 0, "num_sanity_val_steps": 0}),
    )  # fmt: skip


def fit_and_test(trainer: L.Trainer, start: RunStart, dm: CIFAR10DataModule, checkpoints: Checkpoints,
                 calibrate: str = "none", temperature: float | None = None, with_jpeg: bool = False) -> tuple[dict, str]:  # fmt: skip
    """Step 4: train (resuming if asked), fit the softmax temperature of the final checkpoints
    (``calibrate``: 'heldout', 'val', 'fixed': ``temperature`` as given, or 'none'; ``with_jpeg``:
    on the images and a JPEG-75 copy of each), then test
    the chosen one on the test set. Returns (test metrics, the checkpoint tested)."""
    try:
        trainer.fit(start.module, datamodule=dm, ckpt_path=str(start.resume_ckpt) if start.resume_ckpt else None)
    except SIGTERMException:
        stop = checkpoints.stop
        name = stop.signal_name or "SIGTERM"
        where = f"at epoch {trainer.current_epoch + 1}, step {trainer.global_step}"
        code = 128 + int(getattr(signal, name))
        if stop.saved:
            hint = f"saved {stop.saved}; resume with: cifar-train --resume {stop.saved}"
            raise RunInterruptedError(f"stopped by {name} {where}; {hint}", code) from None
        raise RunInterruptedError(f"stopped by {name} {where}", code) from None
    except SystemExit as e:  # Lightning's answer to a second Ctrl-C: its graceful shutdown, then sys.exit(1)
        if not isinstance(e.__context__, KeyboardInterrupt):
            raise  # someone else's exit (a callback's), not Lightning's
        where = f"at epoch {trainer.current_epoch + 1}, step {trainer.global_step}"
        kept = checkpoints.last_good()
        raise RunInterruptedError(f"interrupted by Ctrl-C {where}{f'; resume with: cifar-train --resume {kept}' if kept else ''}",
                                  128 + signal.SIGINT) from None  # fmt: skip
    except NonFiniteLossError as e:
        kept = checkpoints.last_good()
        raise TrainingFailedError(f"{e}; stopped{f', the last good checkpoint is {kept}' if kept else ''}") from None
    if trainer.interrupted:
        raise ConfigError(f"training interrupted; resume with: cifar-train --resume {runs.last_checkpoint(start.run_dir)}")
    tested = checkpoints.tested()
    with sigterm_raises():  # fit is over: a SIGTERM now stops at once, and the atomic writes clean up
        if calibrate != "none":
            calibrate_checkpoints(trainer, dm, [tested, checkpoints.last_good()], calibrate, temperature, with_jpeg)
        return test_checkpoint(trainer, dm, tested), tested


def test_checkpoint(trainer: L.Trainer, dm: CIFAR10DataModule, tested: str) -> dict[str, float]:
    """Step 4c: the tested checkpoint on the official test set through the one scoring path
    (``Classifier.score``, batches of 500 as ``cifar-evaluate`` runs them), so results.json's
    test_acc is cifar-evaluate's on the same checkpoint, to the image."""
    dm.setup("test")
    clf = load_classifier(tested, device=str(trainer.strategy.root_device))
    scored = clf.score(dm.test_set.images, dm.test_set.labels, batch_size=500)
    trainer.lightning_module.calibration = clf.info.get("calibration")
    for callback in trainer.callbacks:
        if isinstance(callback, TensorBoardImages):
            callback.log_final(trainer, dm.test_set.images, dm.test_set.labels, scored["probs"])
    return {"test_acc": scored["accuracy"], "test_loss": scored["loss"], "test_ece": scored["ece"],
            "test_ece_uncalibrated": scored["ece_uncalibrated"]}  # fmt: skip


def calibrate_checkpoints(trainer: L.Trainer, dm: CIFAR10DataModule, paths: list[str], split: str,
                          temperature: float | None = None, with_jpeg: bool = False) -> None:  # fmt: skip
    """Step 4b: fit each final checkpoint's temperature on the calibration (or validation)
    images, or take the recipe's (``split`` 'fixed'), and store it in the file. Every process
    computes the same T; rank 0 writes. ``with_jpeg``: a JPEG quality-75 copy of each image joins
    the fit, so that T also holds on photos (chosen over other copies in research/photo_calibration.py)."""
    ds = dm.calib_set if split == "heldout" else dm.val_set
    if split != "fixed" and (ds is None or len(ds) == 0):
        raise ConfigError(f"--calibrate {split}: no images to fit the temperature on (check --calib-size / --val-size)")
    given = temperature if split == "fixed" else None
    images, labels = (ds.images, ds.labels) if given is None else (None, None)
    if with_jpeg and images is not None:
        images, labels, split = torch.cat([images, jpeg(images, 75)]), torch.cat([labels, labels]), f"{split} + jpeg75"
    for path in dict.fromkeys(p for p in paths if p and Path(p).is_file()):
        calibrate_checkpoint(Path(path), images, labels, split, trainer.strategy.root_device, write=trainer.is_global_zero,
                             given=given)  # fmt: skip
    trainer.strategy.barrier("calibrated")


def calibrate_checkpoint(path: Path, images: torch.Tensor | None, labels: torch.Tensor | None, split: str,
                         device: torch.device | str, write: bool = True, given: float | None = None) -> dict[str, Any]:  # fmt: skip
    """Fit T for the checkpoint at ``path`` on (images, labels) and write it into the file
    (atomically: a kill leaves the old file). The logits come through the one inference path
    (``inference.checkpoint_classifier``), raw (``calibrate=False``), with the model's test-time views: exactly what inference divides
    by T. ``given`` (--calibrate fixed): write that T, fitted on nothing here. Returns the calibration entry."""
    ckpt = load_checkpoint(path)  # read once: classified, then written back with T
    if given is not None:
        entry = {"temperature": float(given), "fitted_on": "the recipe's (--temperature)", "images": 0}
    else:
        logits = checkpoint_classifier(ckpt, path, device=str(device), calibrate=False).logits(images, batch_size=500)
        entry = calibration.summary(logits, labels.cpu(), calibration.fit_temperature(logits, labels), split)
    if write:
        ckpt["calibration"] = entry
        atomic_write_bytes(path, checkpoint_bytes(ckpt), fsync=True)
    return entry


#: what a run may change of its preset and still train the preset's model: where the data lives,
#: the seed, and how the trainer runs (the --help sections "trainer" and "runs and checkpoints")
_NOT_THE_RECIPE = {"data_dir", "data_source", "download", "num_workers", *SECTIONS["trainer"], *SECTIONS["runs and checkpoints"]}


def long_run_hint(cfg: TrainConfig) -> str | None:
    """What a long run's estimate adds: the bundled model that is this very recipe, already
    trained (``bundled.trained``), else the next preset of the fast network that costs clearly
    less. 93 (0.27 PFLOP) is no longer that for 94 (Muon, 0.265): both name 90."""
    done = bundled.trained(cfg.preset)
    if done:
        plain, mine = build_recipe({"preset": cfg.preset}).to_dict(), cfg.to_dict()
        if all(mine[k] == plain[k] for k in plain if k not in _NOT_THE_RECIPE):
            return f"{done} is this recipe, already trained"
    faster = {"96": "95", "95": "94", "94": "90", "93": "90"}.get(cfg.preset)
    return f"for a quicker run try --preset {faster}" if faster else None


def write_results(cfg: TrainConfig, trainer: L.Trainer, run_dir: Path, test_metrics: dict, tested: str,
                  checkpoints: Checkpoints, wall: float) -> dict[str, Any]:  # fmt: skip
    """Step 5: results.json (figures, the exact recipe, versions) and TensorBoard's HPARAMS."""
    report = next(c for c in trainer.callbacks if isinstance(c, EpochReport))
    best = checkpoints.best
    results = {
        "test_acc": float(test_metrics["test_acc"]),
        "test_loss": float(test_metrics["test_loss"]),
        # 15-bin ECE of the test probabilities with the fitted temperature, and without it.
        "test_ece": float(test_metrics["test_ece"]),
        "test_ece_uncalibrated": float(test_metrics["test_ece_uncalibrated"]),
        "calibration": trainer.lightning_module.calibration,  # the tested checkpoint's, loaded by the test
        "best_val_acc": float(best.best_model_score) if best and best.best_model_score is not None else None,
        "best_checkpoint": str(tested),
        "last_checkpoint": str(runs.last_checkpoint(run_dir)),
        "epochs_run": trainer.current_epoch,
        "epoch_seconds": report.epoch_seconds,
        "train_seconds": report.train_seconds,
        "wall_seconds": wall,
        "run_dir": str(run_dir),
        "versions": versions(),
        "config": cfg.to_dict(),
    }
    if trainer.is_global_zero:
        atomic_write_text(run_dir / runs.RESULTS, json.dumps(results, indent=2))
        # The HPARAMS tab of TensorBoard: this run's configuration next to its final metrics.
        hparams = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in cfg.to_dict().items()}
        final = {"hp/test_acc": results["test_acc"], "hp/test_loss": results["test_loss"], "hp/test_ece": results["test_ece"]}
        if results["best_val_acc"] is not None:
            final["hp/best_val_acc"] = results["best_val_acc"]
        trainer.logger.log_hyperparams(hparams, final)
        trainer.logger.finalize("success")
    return {**results, "global_rank": trainer.global_rank}


def run_training(cfg: TrainConfig, callbacks: list[L.Callback] | None = None) -> dict[str, Any]:
    """Train, checkpoint, test on the official test set; returns the results written to
    results.json in the run directory. ``callbacks`` are added to the Trainer's (benchmarks
    use this to probe a run without changing it)."""
    with signals_restored():
        return _run_training(cfg, callbacks)


@contextlib.contextmanager
def signals_restored() -> Iterator[None]:
    """The SIGINT and SIGTERM handlers as they were before the run, whatever the run installed
    (StopOnSignal, Lightning's connector) and however it ended: a later Ctrl-C in the same
    notebook is the notebook's again."""
    main = threading.current_thread() is threading.main_thread()
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    try:
        yield
    finally:
        for signum, handler in saved.items():
            if handler is not None:
                signal.signal(signum, handler)


def _run_training(cfg: TrainConfig, callbacks: list[L.Callback] | None = None) -> dict[str, Any]:
    t0 = time.perf_counter()
    check_before_start(cfg)
    quiet_lightning()
    keep_freed_memory()
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    dm = build_data(cfg)
    classes = list(dm.classes)
    start = build_module(cfg, classes)
    checkpoints = build_checkpoints(cfg, start.run_dir)
    try:
        steps_per_epoch = -(-len(dm.train_set) // cfg.batch_size)
        trainer = build_trainer(cfg, start.run_dir, classes, checkpoints, steps_per_epoch, callbacks)
        # The record is written once everything that can be checked before training has been:
        # a resumed run's config.yaml changes only when the run goes ahead.
        if launch_rank() == 0:
            config = {k: v for k, v in cfg.to_dict().items() if k != "resume"}
            atomic_write_text(start.run_dir / runs.CONFIG, TrainConfig(**config).to_yaml())
    except BaseException:
        if not start.resume_ckpt:  # a new run that never started: leave no empty run directory behind
            shutil.rmtree(start.run_dir, ignore_errors=True)
        raise
    test_metrics, tested = fit_and_test(trainer, start, dm, checkpoints, cfg.calibration_split(), cfg.temperature,
                                        cfg.calib_jpeg)
    return write_results(cfg, trainer, start.run_dir, test_metrics, tested, checkpoints, time.perf_counter() - t0)


def train_command(cfg: TrainConfig) -> dict[str, Any]:
    """cifar-train: one run, then its summary (printed once, by rank 0)."""
    results = run_training(cfg)
    if results["global_rank"] == 0:
        print(summary(results))
    return results


@dataclass
class TrainResult:
    """A finished run, as ``train`` returns it: its folder, the checkpoint the test scored and
    what results.json holds."""

    run_dir: Path
    checkpoint: Path
    metrics: dict[str, Any]

    def classifier(self, device: str = "cpu", calibrate: bool = True) -> Classifier:
        """The tested checkpoint through the one inference path (its test-time views and temperature)."""
        return load_classifier(self.checkpoint, device=device, calibrate=calibrate)


def train(preset: str | None = None, data_dir: str | os.PathLike | None = None, config: str | os.PathLike | None = None,
          **overrides: Any) -> TrainResult:  # fmt: skip
    """``cifar-train`` from Python: the same recipe layers (preset < ``config`` YAML < overrides,
    named like ``TrainConfig``'s fields, e.g. ``epochs=2``), the same run and the same summary.
    A bad value raises ``ConfigError``, bad data ``DataError``, a failed run
    ``TrainingFailedError``, a stop by Ctrl-C ``RunInterruptedError``: nothing exits."""
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise ConfigError(f"train(): unknown option(s) {', '.join(unknown[:5])}; the options are TrainConfig's fields")

    def plain(v: Any) -> Any:  # paths and tuples as a YAML recipe or a flag would give them
        return os.fspath(v) if isinstance(v, os.PathLike) else list(v) if isinstance(v, tuple) else v

    given = {k: plain(v) for k, v in {"preset": preset, "data_dir": data_dir, **overrides}.items() if v is not None}
    cfg = runs.resolve_recipe({**(read_yaml(os.fspath(config)) if config is not None else {}), **given})
    try:
        results = train_command(cfg)
    except KeyboardInterrupt:  # a Ctrl-C outside fit (data loading, calibration, the test)
        raise RunInterruptedError("interrupted by Ctrl-C", 128 + signal.SIGINT) from None
    run_dir = Path(results["run_dir"])
    recorded = run_dir / runs.RESULTS
    metrics = json.loads(recorded.read_text()) if recorded.is_file() else {k: v for k, v in results.items() if k != "global_rank"}
    return TrainResult(run_dir, Path(results["best_checkpoint"]), metrics)


def summary(r: dict[str, Any]) -> str:
    """What cifar-train prints at the end of a run."""
    per_epoch = r["train_seconds"]
    mean_epoch = sum(per_epoch) / len(per_epoch) if per_epoch else float("nan")
    return (
        "\n"
        f"test accuracy   {r['test_acc']:.4f}   (official test set, {Path(r['best_checkpoint']).name})\n"
        f"test loss       {r['test_loss']:.4f}\n"
        f"calibration     {calibration_line(r)}\n"
        f"wall time       {r['wall_seconds']:.1f} s   ({mean_epoch:.1f} s per training epoch, {len(per_epoch)} epochs this session)\n"
        f"best checkpoint {r['best_checkpoint']}\n"
        f"results         {Path(r['run_dir']) / runs.RESULTS}\n"
        f"watch it        tensorboard --logdir {Path(r['run_dir']).parent}"
    )


def calibration_line(r: dict[str, Any]) -> str:
    cal = r.get("calibration")
    ece, raw = r.get("test_ece"), r.get("test_ece_uncalibrated")
    if not cal:
        return f"none (test ECE {ece:.4f})" if ece is not None else "none"
    where = f"fitted on {cal['images']} {cal['fitted_on']} images" if cal.get("images") else cal.get("fitted_on", "given")
    line = f"temperature {cal['temperature']:.3f} {where}; test ECE {raw:.4f} -> {ece:.4f}"
    if not cal.get("images") and ece is not None and ece > calibration.GIVEN_T_ECE_LIMIT:
        # A shipped T fits the recipe it was fitted for: other flags (epochs, widths...) need their own.
        line += (f" (above {calibration.GIVEN_T_ECE_LIMIT}: the given temperature does not fit this run; "
                 "fit one with --calibrate heldout)")
    return line
