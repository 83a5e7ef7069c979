"""ImageClassifier: a registered network plus loss, optimiser, schedule and metrics.

Hyperparameters are plain primitives (saved by ``save_hyperparameters``), so a checkpoint
rebuilds its network from ``checkpoint["hyper_parameters"]`` alone and loads with
``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

import os
import pickle
import re
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics
from lightning.pytorch.plugins.io import TorchCheckpointIO

from cifar_lightning import models

OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("none", "cosine", "onecycle", "triangle")
#: test-time augmentation levels: 0 none, 1 + mirror, 2 + mirror and 1-px translations (6 views)
TTA_LEVELS = (0, 1, 2)


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the run stops with the last good checkpoint."""


class ImageClassifier(L.LightningModule):
    """``forward`` returns logits; ``predict_step`` returns softmax probabilities."""

    #: Feed the network NHWC tensors (about 15% faster for these convs on CPU); set with
    #: ``module.to(memory_format=torch.channels_last)``; not a hyperparameter.
    channels_last: bool = False

    def __init__(
        self,
        model: str = "seed",
        num_classes: int = 10,
        lr: float = 1e-3,
        optimizer: str = "adam",
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        schedule: str = "none",
        label_smoothing: float = 0.0,
        model_args: dict | None = None,
        class_names: list[str] | None = None,
        norm_bias_lr_scale: float = 1.0,
        whiten_bias_epochs: int = 0,
        warmup_fraction: float = 0.2,
        tta: int = 0,
        whitening_images: int = 5000,
    ) -> None:
        super().__init__()
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown --optimizer {optimizer!r}; choose from {', '.join(OPTIMIZERS)}")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown --schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
        if tta not in TTA_LEVELS:
            raise ValueError(f"--tta must be one of {TTA_LEVELS}, got {tta}")
        if not lr > 0:
            raise ValueError(f"--lr must be > 0, got {lr}")
        self.save_hyperparameters()
        self.net = models.build(model, num_classes=num_classes, **(model_args or {}))
        metric = torchmetrics.classification.MulticlassAccuracy
        self.train_acc = metric(num_classes, average="micro")
        self.val_acc = metric(num_classes, average="micro")
        self.test_acc = metric(num_classes, average="micro")
        # Mean losses weighted by images, synced as sums: under DDP with uneven shards the
        # epoch value still equals the single-process one (a mean of per-process means would not).
        self.val_loss = torchmetrics.MeanMetric()
        self.test_loss = torchmetrics.MeanMetric()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.net(x)

    def on_fit_start(self) -> None:
        """A network with a data-dependent first layer (``fast``) is set from the training
        images once; a resumed or --init-from checkpoint carries it already."""
        init = getattr(self.net, "init_whitening", None)
        dm = getattr(self.trainer, "datamodule", None)
        if init is None or bool(self.net.whitening_ready) or getattr(dm, "train_set", None) is None:
            return
        from cifar_lightning.data import normalize

        images = dm.train_set.images[: self.hparams.whitening_images]
        init(normalize(images).to(self.device))

    def on_train_batch_start(self, batch: object, batch_idx: int) -> None:
        # The whitening bias trains for the first few epochs only, then stays fixed (airbench).
        # Per batch, not per epoch: a run resumed mid-epoch gets no epoch-start hook.
        if self.hparams.whiten_bias_epochs and hasattr(self.net, "whiten"):
            self.net.whiten.bias.requires_grad_(self.current_epoch < self.hparams.whiten_bias_epochs)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The global RNG drives augmentation and dropout: saved with every checkpoint, so a run
        # resumed from any step draws exactly what an unbroken run would have drawn.
        checkpoint["rng_state"] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            checkpoint["rng_state"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        rng = checkpoint.get("rng_state") or {}
        if isinstance(rng.get("torch"), torch.Tensor):
            torch.set_rng_state(rng["torch"].cpu())
        if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([t.cpu() for t in rng["cuda"]])

    def tta_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits averaged over test-time views (``tta``): the image and its mirror, then
        also both shifted one pixel up-left and down-right; weights as in airbench."""
        level = self.hparams.tta
        if level == 0:
            return self(x)

        def mirror(v: torch.Tensor) -> torch.Tensor:
            return 0.5 * self(v) + 0.5 * self(v.flip(-1))

        logits = mirror(x)
        if level == 1:
            return logits
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        h, w = x.shape[-2:]
        shifted = 0.5 * mirror(padded[..., :h, :w]) + 0.5 * mirror(padded[..., 2:, 2:])
        return 0.5 * logits + 0.5 * shifted

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        if not torch.isfinite(loss):
            # Stop before the optimiser writes non-finite weights: the last checkpoint stays good.
            raise NonFiniteLossError(
                f"the training loss became {loss.item()} at step {self.global_step} (epoch {self.current_epoch + 1}, "
                f"batch {batch_idx + 1}); lower --lr or check the data"
            )
        self.train_acc(logits, y)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        self.log("train_acc", self.train_acc, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch: tuple[torch.Tensor, torch.Tensor], stage: str) -> torch.Tensor:
        x, y = batch
        logits = self.tta_logits(x) if stage == "test" else self(x)
        loss = F.cross_entropy(logits, y)  # plain CE: comparable across label-smoothing settings
        acc, mean_loss = (self.val_acc, self.val_loss) if stage == "val" else (self.test_acc, self.test_loss)
        acc(logits, y)
        mean_loss.update(loss, weight=len(y))
        self.log(f"{stage}_loss", mean_loss, prog_bar=True)
        self.log(f"{stage}_acc", acc, prog_bar=True)
        return logits.detach()  # callbacks (e.g. TensorBoardImages) read predictions from here

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "test")

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor] | torch.Tensor, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return self(x).softmax(dim=-1)

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        # BatchNorm shifts may learn faster than weights (airbench: 64x); their weight decay
        # is divided by the same factor so that the decay per step stays the same.
        norm = [p for m in self.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for p in m.parameters()]
        norm_ids = {id(p) for p in norm}
        rest = [p for p in self.parameters() if id(p) not in norm_ids]
        scale = hp.norm_bias_lr_scale
        params = [{"params": rest}]
        if norm:
            params.append({"params": norm, "lr": hp.lr * scale, "weight_decay": hp.weight_decay / scale})
        if hp.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay)
        elif hp.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)
        else:
            opt = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, nesterov=True, weight_decay=hp.weight_decay)
        if hp.schedule == "none":
            return {"optimizer": opt}
        total = int(self.trainer.estimated_stepping_batches)
        if hp.schedule == "triangle":
            # Warm up linearly from 0.2x to the full rate over warmup_fraction of the steps,
            # then decay linearly to zero at the last step.
            peak = max(int(hp.warmup_fraction * total), 1)

            def factor(step: int) -> float:
                if step < peak:
                    return 0.2 + 0.8 * step / peak
                return max(0.0, (total - step) / max(total - peak, 1))

            sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        elif hp.schedule == "cosine":
            sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total, 1))
        else:
            sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in opt.param_groups], total_steps=max(total, 1))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, unreadable, unsafe or of another model."""


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Read a Lightning checkpoint of this project without unpickling arbitrary objects.

    ``weights_only=True`` refuses any pickle that would build an object other than tensors and
    plain containers, so a malicious file fails here instead of running code; ``map_location``
    lets a checkpoint saved on a GPU load on a CPU-only machine.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        found = re.search(r"(?:Unsupported global: GLOBAL|unsupported GLOBAL) ([\w.]+)", text)
        if found:
            raise CheckpointError(
                f"{path}: refused to load: it asks to import {found.group(1)}, which could run code; "
                "only plain-weights checkpoints are loaded"
            ) from None
        detail = re.search(r"WeightsUnpickler error: \s*([^\n]+)", text)
        reason = detail.group(1).strip() if detail else _first_line(e)
        raise CheckpointError(f"{path}: not a readable checkpoint (weights-only unpickler: {reason})") from None
    except Exception as e:  # truncated zip, random bytes, empty file, permission...
        raise CheckpointError(f"{path}: not a readable checkpoint ({type(e).__name__}: {_first_line(e)})") from None
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt or "model" not in (ckpt.get("hyper_parameters") or {}):
        raise CheckpointError(f"{path}: not a cifar-lightning ImageClassifier checkpoint (no state_dict / model name)")
    return ckpt


def classifier_from_checkpoint(ckpt: dict, path: str | Path = "checkpoint") -> ImageClassifier:
    """Rebuild the network from the checkpoint's hyperparameters and load its weights."""
    name = ckpt["hyper_parameters"]["model"]
    if name not in models.MODELS:
        raise CheckpointError(f"{path}: a checkpoint of network {name!r}, which this version does not know ({', '.join(models.MODELS)})")
    try:
        module = ImageClassifier(**ckpt["hyper_parameters"])
        module.load_state_dict(ckpt["state_dict"])
    except (TypeError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path}: weights do not fit the network it names ({str(e).splitlines()[0]})") from None
    return module


class AtomicCheckpointIO(TorchCheckpointIO):
    """Checkpoint writes that a kill or a full disk can never leave half-done.

    Lightning already writes through an fsspec transaction, but its temporary file lives in the
    system temp dir: across file systems the final move is a copy, which a kill can cut short.
    Here the bytes go to a hidden temporary file beside the target, are flushed to disk, and
    only then replace the target with ``os.replace`` (atomic on POSIX and Windows); on any
    error the temporary file is removed and the previous checkpoint is untouched.
    """

    def save_checkpoint(self, checkpoint: dict, path: str | Path, storage_options: object = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            with open(tmp, "wb") as f:
                torch.save(checkpoint, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OSError(e.errno, e.strerror or str(e), str(path)) from None
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
