"""Callbacks: per-epoch timing and a one-line epoch report that reads well in a log file."""

from __future__ import annotations

import copy
import os
import signal
import statistics
import threading
import time

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch.utils.flop_counter import FlopCounterMode
from torchmetrics.functional.classification import multiclass_confusion_matrix

from cifar_lightning import report
from cifar_lightning.images import denormalize
from cifar_lightning.runs import LAST


class EpochReport(L.Callback):
    """Times each epoch (training alone, and with validation), logs ``epoch_seconds`` to the
    logger and prints one line per epoch: a progress bar is unreadable in a log file."""

    def __init__(self) -> None:
        self.train_seconds: list[float] = []
        self.epoch_seconds: list[float] = []
        self._start = 0.0
        self._train_end = 0.0
        self._first_step = 0  # the global step training started (or resumed) at

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # A run resumed mid-epoch gets no epoch-start hook for its first (partial) epoch.
        self._start = time.perf_counter()
        self._first_step = trainer.global_step

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start = time.perf_counter()
        self._train_end = 0.0

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Validation runs inside the training epoch, after its last batch.
        if trainer.state.fn == "fit":
            self._train_end = self._train_end or time.perf_counter()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        now = time.perf_counter()
        train = (self._train_end or now) - self._start
        self.train_seconds.append(train)
        self.epoch_seconds.append(now - self._start)
        pl_module.log("epoch_seconds", now - self._start, on_epoch=True, on_step=False)
        if not trainer.is_global_zero:
            return
        m = trainer.callback_metrics
        parts = [f"epoch {trainer.current_epoch + 1}/{trainer.max_epochs}"]
        for key in ("train_loss_epoch", "train_acc", "val_loss", "val_acc"):
            if key in m:
                parts.append(f"{key.removesuffix('_epoch')} {float(m[key]):.4f}")
        parts.append(f"{train:.1f} s train + {now - self._start - train:.1f} s val")
        if (left := self.seconds_left(trainer, pl_module)) > 0:
            parts.append(f"about {_duration(left)} left")
        print("  ".join(parts), flush=True)

    def seconds_left(self, trainer: L.Trainer, pl_module: L.LightningModule) -> float:
        """The steps left at the time per step so far. Per step, not per epoch: the first epoch
        of a run resumed mid-epoch is a part of one, and would price every epoch left as short."""
        timed = trainer.global_step - self._first_step  # every step since the start lies in a timed epoch
        if timed <= 0 or not hasattr(pl_module, "total_steps"):
            return 0.0
        return max(pl_module.total_steps() - trainer.global_step, 0) * sum(self.epoch_seconds) / timed


def _duration(seconds: float) -> str:
    """1h02m, 4m05s, 12s: the remaining-time estimate of the epoch line."""
    s = int(round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def training_flops_per_image(net: torch.nn.Module, device: torch.device | str = "cpu", whiten_bias: bool | None = None) -> int:
    """FLOPs of one training image, forward and backward (convolutions and matmuls, torch's own
    count), measured on a copy of ``net`` so that its weights, gradients and BatchNorm
    statistics stay untouched, and on a forked random generator, so that a seeded or resumed run
    draws exactly what it would have drawn without it. ``whiten_bias``: count with the whitening
    layer's bias trained or frozen (None: as it is now); trained, it costs the first conv's
    input gradient too."""
    device = torch.device(device)
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        probe = copy.deepcopy(net).train()
        if whiten_bias is not None and hasattr(probe, "whiten"):
            probe.whiten.bias.requires_grad_(whiten_bias)
        x = torch.zeros(2, 3, 32, 32, device=device, dtype=next(net.parameters()).dtype)  # 64-true runs too
        counter = FlopCounterMode(display=False)
        with counter:
            probe(x).float().logsumexp(-1).sum().backward()
    return counter.get_total_flops() // 2


def phase_flops(module: L.LightningModule, epochs: int) -> list[tuple[int, int]]:
    """(epochs, FLOPs of one training image) for each phase of a run: the whitening bias trains
    for the first ``whiten_bias_epochs`` epochs only (``ImageClassifier.on_train_batch_start``;
    0: throughout), and a step after that costs less (no input gradient for the first conv)."""
    net, device = module.net, module.device
    trained = getattr(module.hparams, "whiten_bias_epochs", 0) if hasattr(net, "whiten") else 0
    if not trained:
        return [(epochs, training_flops_per_image(net, device))]
    early = min(trained, epochs)
    phases = [(early, training_flops_per_image(net, device, whiten_bias=True))]
    return phases + ([(epochs - early, training_flops_per_image(net, device, whiten_bias=False))] if epochs > early else [])


class RunEstimate(L.Callback):
    """Says early how long the run will take here: the recipe's training PFLOP when training
    starts, then, after its first timed steps, the whole run's training time on this machine.
    Machines differ by 5-6x (an AMX CPU in bf16 against an AVX2-only one in fp32), so a figure
    measured elsewhere would mislead. A long run names what is quicker (``training.long_run_hint``).

    The first ``warmup_steps`` are not the steady state (kernels chosen, memory first touched:
    on a 2-core EPYC steps 2-4 ran 12% over the run's median step), so the median of the
    ``timed_steps`` after them is the step time; a later phase's steps (the whitening bias
    frozen) are scaled by their FLOPs. Measured against the training that followed:
    docs/BENCHMARKS.md, "The default run on each kind of machine"."""

    def __init__(self, hint: str | None = None, timed_steps: int = 6, long_seconds: float = 20 * 60,
                 warmup_steps: int = 4) -> None:  # fmt: skip
        self.hint, self.timed_steps, self.long_seconds = hint, timed_steps, long_seconds
        self.warmup_steps = warmup_steps
        self._times: list[float] = []
        self._start = 0.0
        self._phases: list[tuple[int, int]] = []
        self.estimate_seconds: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._times, self.estimate_seconds = [], None
        if not trainer.is_global_zero:
            return
        dm = trainer.datamodule
        epochs = max(trainer.max_epochs or 1, 1)
        per_epoch = len(dm.train_set) if getattr(dm, "train_set", None) is not None else 0
        self._phases = phase_flops(pl_module, epochs)
        flops = per_epoch * sum(n * f for n, f in self._phases)
        print(f"training: {flops / 1e15:.3f} PFLOP ({per_epoch * epochs:,} images seen, forward and backward)", flush=True)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch, batch_idx: int) -> None:  # noqa: ANN001
        self._start = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:  # noqa: ANN001
        if self.estimate_seconds is not None or not trainer.is_global_zero:
            return
        self._times.append(time.perf_counter() - self._start)
        total = int(pl_module.total_steps())
        # A short run is timed on what it has: its steps after the first (always a warm-up).
        skip = min(self.warmup_steps, max(total - 1 - self.timed_steps, 1))
        if len(self._times) < min(skip + self.timed_steps, total):
            return
        step = statistics.median(self._times[skip:] or self._times)
        self.estimate_seconds = step * self.relative_steps(trainer, total, 0)
        left = step * self.relative_steps(trainer, total, trainer.global_step)
        line = (f"estimate: {total} steps at {step:.2f} s a step ({trainer.precision}, measured on the first steps here): "
                f"about {_duration(self.estimate_seconds)} of training in all, {_duration(left)} of it left")  # fmt: skip
        if self.estimate_seconds > self.long_seconds and self.hint:
            line += f"; {self.hint}"
        print(line, flush=True)

    def relative_steps(self, trainer: L.Trainer, total: int, done: int) -> float:
        """The steps from ``done`` to ``total``, each weighted by its phase's FLOPs over those of
        the phase timed now (the one ``trainer.current_epoch`` is in)."""
        per_epoch = total / max(sum(n for n, _ in self._phases), 1)
        first, timed = 0, None
        for n, f in self._phases:
            timed = f if timed is None and trainer.current_epoch < first + n else timed
            first += n
        timed = timed or (self._phases[-1][1] if self._phases else 1)
        weight, first = 0.0, 0
        for n, f in self._phases or [(1, 1)]:
            weight += max((first + n) * per_epoch - max(first * per_epoch, done), 0) * f / timed
            first += n
        return weight


class TensorBoardImages(L.Callback):
    """The confusion-matrix heatmap and a small prediction grid as TensorBoard images: every
    ``every_n_epochs`` validation epochs (0: never), and always for the final test, so even a
    run without a validation split shows what its model gets right and wrong.

    The final test's images come from ``log_final``: the one scoring path's probabilities
    (``inference.Classifier.score``), as evaluation and prediction give them."""

    def __init__(self, class_names: list[str], every_n_epochs: int = 1, grid: int = 16) -> None:
        self.class_names = list(class_names)
        self.every_n_epochs = every_n_epochs
        self.grid = grid
        self._reset()

    def _reset(self) -> None:
        self._preds: list = []
        self._labels: list = []
        self._images = None
        self._probs = None

    def _logging(self, trainer: L.Trainer) -> bool:
        return trainer.is_global_zero and not trainer.sanity_checking and isinstance(trainer.logger, TensorBoardLogger)

    def _val_active(self, trainer: L.Trainer) -> bool:
        return self.every_n_epochs > 0 and self._logging(trainer) and (trainer.current_epoch + 1) % self.every_n_epochs == 0

    def _collect(self, outputs, batch) -> None:  # noqa: ANN001
        x, y = batch
        probs = outputs.softmax(-1).float().cpu()  # the eval steps return logits
        self._preds.append(probs.argmax(-1))
        self._labels.append(y.cpu())
        if self._images is None:
            self._images = denormalize(x[: self.grid].float().cpu())
            self._probs = probs[: self.grid]

    def _log(self, trainer: L.Trainer, stage: str, step: int, title: str) -> None:
        if not self._preds:
            return
        preds, labels = torch.cat(self._preds), torch.cat(self._labels)
        cm = multiclass_confusion_matrix(preds, labels, num_classes=len(self.class_names))
        writer = trainer.logger.experiment
        writer.add_figure(f"{stage}/confusion", report.confusion_figure(cm.numpy(), self.class_names), step)
        n = len(self._probs)
        grid = report.prediction_grid(self._images, labels[:n], self._probs, self.class_names, title=title)
        writer.add_figure(f"{stage}/predictions", grid, step)
        self._reset()

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._reset()

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, dataloader_idx=0) -> None:  # noqa: ANN001
        if self._val_active(trainer):
            self._collect(outputs, batch)

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._val_active(trainer):
            self._log(trainer, "val", trainer.current_epoch, f"epoch {trainer.current_epoch + 1}")

    def log_final(self, trainer: L.Trainer, images: torch.Tensor, labels: torch.Tensor, probs: torch.Tensor) -> None:
        """The final test's figures, from the probabilities the one scoring path gave (uint8 images)."""
        if not self._logging(trainer):
            return
        self._preds, self._labels = [probs.argmax(-1)], [labels.cpu()]
        self._images, self._probs = images[: self.grid], probs[: self.grid]
        self._log(trainer, "test", trainer.current_epoch, "test set (final model)")


class Lookahead(L.Callback):
    """Lookahead weight averaging as airbench uses it: every ``every`` steps the weights (and
    BatchNorm statistics) are pulled into a slow copy, ``slow = lerp(slow, fast, 1 - decay)``,
    and the network continues from the slow copy. ``decay`` grows from 0 to ``alpha`` as
    (step / total)**3, so averaging only bites late in training, when the noise of the last
    steps matters most; at the last step the network ends on the slow copy.

    Its slow copy is saved in checkpoints, so a resumed run averages exactly as an unbroken one.
    """

    def __init__(self, every: int = 5, alpha: float = 0.95**5, power: float = 3.0) -> None:
        self.every, self.alpha, self.power = every, alpha, power
        self.slow: dict | None = None

    def _float_state(self, pl_module: L.LightningModule) -> dict:
        return {k: v for k, v in pl_module.state_dict().items() if v.is_floating_point()}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.slow is None:
            self.slow = {k: v.detach().clone() for k, v in self._float_state(pl_module).items()}

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:  # noqa: ANN001
        step, total = trainer.global_step, max(int(pl_module.total_steps()), 1)
        if step % self.every and step != total:
            return
        decay = 1.0 if step >= total else self.alpha * (step / total) ** self.power
        with torch.no_grad():
            for k, fast in self._float_state(pl_module).items():
                slow = self.slow[k]
                if slow.device != fast.device:  # restored from a checkpoint mapped elsewhere
                    slow = self.slow[k] = slow.to(fast.device)
                slow.lerp_(fast, 1 - decay)
                fast.copy_(slow)

    def state_dict(self) -> dict:
        return {"slow": self.slow}

    def load_state_dict(self, state_dict: dict) -> None:
        self.slow = state_dict["slow"]


class StopOnSignal(L.Callback):
    """Ctrl-C (SIGINT) and SIGTERM end training at the next step boundary with a checkpoint.

    Lightning already turns SIGTERM into a stop after the current batch (``SIGTERMException``);
    a first Ctrl-C is routed the same way instead of raising KeyboardInterrupt in the middle of
    an optimiser step (a second Ctrl-C still stops at once). When the stop comes, the run's
    state is saved as ``last.ckpt`` in the folder of ``checkpoints`` (atomically, like every
    checkpoint; under DDP the folder rank 0 chose), so ``--resume`` continues from that step.
    """

    def __init__(self, checkpoints: ModelCheckpoint) -> None:
        self.checkpoints = checkpoints
        self.signal_name: str | None = None
        self.saved: str | None = None
        self._previous = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if threading.current_thread() is not threading.main_thread():
            return

        def on_sigint(signum: int, frame: object) -> None:
            if self.signal_name:  # the second Ctrl-C: no more waiting
                raise KeyboardInterrupt
            self.signal_name = "SIGINT"
            print("\nCtrl-C: stopping after this step and saving a checkpoint (Ctrl-C again to stop at once)", flush=True)
            # Route it to whatever handles SIGTERM now (Lightning's handler, registered at fit
            # start): training then stops at the next step boundary, as for a SIGTERM.
            on_sigterm = signal.getsignal(signal.SIGTERM)
            if callable(on_sigterm):
                on_sigterm(signal.SIGTERM, frame)
            else:
                raise KeyboardInterrupt

        self._previous = signal.signal(signal.SIGINT, on_sigint)

    def _restore(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
        if isinstance(exception, SIGTERMException) and trainer.state.fn == "fit":
            self.signal_name = self.signal_name or "SIGTERM"
            path = os.path.join(self.checkpoints.dirpath, LAST)
            trainer.save_checkpoint(path)
            self.saved = path


class StepCheckpoint(ModelCheckpoint):
    """``last.ckpt`` every N training steps, except after an epoch's last batch: Lightning 2.6
    resumes a checkpoint saved there as if the following epoch had run too (it skips it), and the
    epoch-end checkpoint comes moments later anyway, after validation."""

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs, batch, batch_idx: int) -> None:  # noqa: ANN001
        if batch_idx + 1 >= trainer.num_training_batches:
            return
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
