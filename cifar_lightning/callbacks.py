"""Callbacks: per-epoch timing and a one-line epoch report that reads well in a log file."""

from __future__ import annotations

import time

import lightning as L


class EpochReport(L.Callback):
    """Times each epoch (training alone, and with validation), logs ``epoch_seconds`` to the
    logger and prints one line per epoch: a progress bar is unreadable in a log file."""

    def __init__(self) -> None:
        self.train_seconds: list[float] = []
        self.epoch_seconds: list[float] = []
        self._start = 0.0
        self._train_end = 0.0

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
        print("  ".join(parts), flush=True)
