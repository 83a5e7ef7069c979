"""ImageClassifier: a registered network plus loss, optimiser, schedule and metrics.

Hyperparameters are plain primitives (saved by ``save_hyperparameters``), so a checkpoint
rebuilds its network from ``checkpoint["hyper_parameters"]`` alone and loads with
``torch.load(path, weights_only=True)``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
import torchmetrics

from cifar_lightning import models
from cifar_lightning.calibration import apply_temperature
from cifar_lightning.checkpoint import check_spec, load_checkpoint, state_dict_mismatch
from cifar_lightning.errors import CheckpointError, ConfigError
from cifar_lightning.images import normalize
from cifar_lightning.optim import MuonSGD
from cifar_lightning.recipes import TrainConfig, check_values, default


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the run stops with the last good checkpoint."""


class ImageClassifier(L.LightningModule):
    """``forward`` returns raw logits; ``predict_step`` returns calibrated softmax probabilities
    (test-time views, divided by the fitted temperature)."""

    #: Feed the network NHWC tensors (about 15% faster for these convs on CPU); set with
    #: ``module.to(memory_format=torch.channels_last)``; not a hyperparameter.
    channels_last: bool = False

    def __init__(
        self,
        model: str = default("model"),
        num_classes: int = 10,
        lr: float = default("lr"),
        optimizer: str = default("optimizer"),
        weight_decay: float = default("weight_decay"),
        momentum: float = default("momentum"),
        schedule: str = default("schedule"),
        label_smoothing: float = default("label_smoothing"),
        model_args: dict | None = None,
        class_names: list[str] | None = None,
        norm_bias_lr_scale: float = default("norm_bias_lr_scale"),
        whiten_bias_epochs: int = default("whiten_bias_epochs"),
        warmup_fraction: float = default("warmup_fraction"),
        tta: int = default("tta"),
        whitening_images: int = 5000,
        muon_lr: float = default("muon_lr"),
        muon_momentum: float = default("muon_momentum"),
    ) -> None:
        super().__init__()
        # The recipe owns the bounds: a module built by hand (not from_config) is held to the same.
        check_values({"lr": lr, "optimizer": optimizer, "weight_decay": weight_decay, "momentum": momentum,
                      "schedule": schedule, "label_smoothing": label_smoothing, "norm_bias_lr_scale": norm_bias_lr_scale,
                      "whiten_bias_epochs": whiten_bias_epochs, "warmup_fraction": warmup_fraction, "tta": tta,
                      "muon_lr": muon_lr, "muon_momentum": muon_momentum})  # fmt: skip
        self.save_hyperparameters()
        self.net = models.build(model, num_classes=num_classes, **(model_args or {}))
        metric = torchmetrics.classification.MulticlassAccuracy
        self.train_acc = metric(num_classes, average="micro", validate_args=False)
        self.val_acc = metric(num_classes, average="micro")
        # The mean loss weighted by images, synced as a sum: under DDP with uneven shards the
        # epoch value still equals the single-process one (a mean of per-process means would not).
        self.val_loss = torchmetrics.MeanMetric()
        #: the fitted softmax temperature and its figures (``calibration.py``); None until fitted
        self.calibration: dict | None = None

    @classmethod
    def from_config(cls, cfg: TrainConfig, classes: list[str]) -> ImageClassifier:
        """The module a recipe asks for (its values were checked by the recipe)."""
        return cls(**cls.config_args(cfg, classes))

    @staticmethod
    def config_args(cfg: TrainConfig, classes: list[str]) -> dict[str, Any]:
        """The constructor's arguments a recipe gives: also what a resumed run must agree with."""
        return dict(
            model=cfg.model, num_classes=len(classes), lr=cfg.lr, optimizer=cfg.optimizer, weight_decay=cfg.weight_decay,
            schedule=cfg.schedule, momentum=cfg.momentum, label_smoothing=cfg.label_smoothing, class_names=list(classes),
            model_args=cfg.model_args(), norm_bias_lr_scale=cfg.norm_bias_lr_scale, warmup_fraction=cfg.warmup_fraction,
            whiten_bias_epochs=cfg.whiten_bias_epochs, tta=cfg.tta, muon_lr=cfg.muon_lr, muon_momentum=cfg.muon_momentum,
        )  # fmt: skip

    @classmethod
    def from_checkpoint(cls, path: str | Path, ckpt: dict | None = None) -> ImageClassifier:
        """The module a checkpoint holds, loaded weights-only and checked (``checkpoint.check_spec``)
        before anything is built; its fitted temperature rides along in ``calibration``."""
        ckpt = load_checkpoint(path) if ckpt is None else ckpt
        hp = check_spec(ckpt, path)
        try:
            module = cls(**hp)
            module.load_state_dict(ckpt["state_dict"])
        except ConfigError as e:
            raise CheckpointError(f"{path}: unusable hyper-parameters: {e}") from None
        except (TypeError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{path}: weights do not fit the network it names ({state_dict_mismatch(e)})") from None
        module.calibration = ckpt.get("calibration")
        return module

    @property
    def temperature(self) -> float:
        return float(self.calibration["temperature"]) if self.calibration else 1.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.is_floating_point() and x.dtype != self.dtype:
            x = x.to(self.dtype)  # true-precision runs (16-true, 64-true...) convert the weights, not the batches
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
        images = dm.train_set.images[: self.hparams.whitening_images]
        init(normalize(images).to(self.device))

    def on_train_start(self) -> None:
        # The weights are about to change: a temperature fitted to earlier ones (a resumed,
        # calibrated checkpoint) must not ride along in the checkpoints saved from here on.
        self.calibration = None

    def on_train_batch_start(self, batch: object, batch_idx: int) -> None:
        # The whitening bias trains for the first few epochs only, then stays fixed (airbench).
        # Per batch, not per epoch: a run resumed mid-epoch gets no epoch-start hook.
        if self.hparams.whiten_bias_epochs and hasattr(self.net, "whiten"):
            self.net.whiten.bias.requires_grad_(self.current_epoch < self.hparams.whiten_bias_epochs)

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # The global RNG drives augmentation and dropout: saved with every checkpoint, so a run
        # resumed from any step draws exactly what an unbroken run would have drawn.
        checkpoint["rng_state"] = {"torch": torch.get_rng_state()}
        if self.calibration:
            checkpoint["calibration"] = self.calibration
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            checkpoint["rng_state"]["cuda"] = torch.cuda.get_rng_state_all()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.calibration = checkpoint.get("calibration")
        rng = checkpoint.get("rng_state") or {}
        if isinstance(rng.get("torch"), torch.Tensor):
            torch.set_rng_state(rng["torch"].cpu())
        if rng.get("cuda") and torch.cuda.is_available() and len(rng["cuda"]) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all([t.cpu() for t in rng["cuda"]])

    def tta_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits averaged over the model's test-time views (``tta``; see ``models.tta_logits``)."""
        return models.tta_logits(self, x, self.hparams.tta, self.temperature)

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
        # update, not forward: the epoch value is all that is logged, and forward also computes
        # a per-batch accuracy (with argument checks) that nothing reads
        self.train_acc.update(logits.detach(), y)
        self.log("train_loss", loss, prog_bar=True, on_step=True, on_epoch=True)
        self.log("train_acc", self.train_acc, prog_bar=True, on_step=False, on_epoch=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        """The validation figures that choose the best checkpoint; the final test is scored by
        the one scoring path (``inference.Classifier.score``), not here."""
        x, y = batch
        logits = self(x)
        self.val_acc(logits, y)
        self.val_loss.update(F.cross_entropy(logits, y), weight=len(y))  # plain CE, comparable across label smoothing
        self.log("val_loss", self.val_loss, prog_bar=True)
        self.log("val_acc", self.val_acc, prog_bar=True)
        return logits.detach()  # callbacks (e.g. TensorBoardImages) read predictions from here

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor] | torch.Tensor, batch_idx: int) -> torch.Tensor:
        x = batch[0] if isinstance(batch, (tuple, list)) else batch
        return apply_temperature(self.tta_logits(x).float(), self.temperature).softmax(dim=-1)

    def total_steps(self) -> int:
        """The run's optimiser steps: the one count the schedule and ``callbacks.Lookahead`` use.
        As ``trainer.estimated_stepping_batches`` counts them but
        without calling it here: that property builds the training loader before a resumed run
        restores the loader's position, which then never is (Lightning issue 20550), so a run
        resumed mid-epoch re-trained the epoch's first batches. From the data module's own
        figures: each rank of Lightning's DistributedSampler gets ceil(N / world) images."""
        trainer, dm = self.trainer, getattr(self.trainer, "datamodule", None)
        train_set, batch = getattr(dm, "train_set", None), getattr(dm, "batch_size", None)
        if train_set is None or batch is None or trainer.max_steps != -1 or trainer.limit_train_batches != 1.0:
            return int(trainer.estimated_stepping_batches)
        per_rank = math.ceil(len(train_set) / trainer.world_size)
        steps = math.ceil(math.ceil(per_rank / batch) / trainer.accumulate_grad_batches)
        return steps * max(trainer.max_epochs, 1)

    def configure_optimizers(self) -> dict:
        hp = self.hparams
        # BatchNorm shifts may learn faster than weights (airbench: 64x); their weight decay
        # is divided by the same factor so that the decay per step stays the same.
        # muon: the trainable conv filters go to Muon, everything else stays on SGD below.
        filters = [p for p in self.parameters() if p.ndim == 4 and p.requires_grad] if hp.optimizer == "muon" else []
        filter_ids = {id(p) for p in filters}
        norm = [p for m in self.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for p in m.parameters()]
        norm_ids = {id(p) for p in norm}
        rest = [p for p in self.parameters() if id(p) not in norm_ids | filter_ids]
        scale = hp.norm_bias_lr_scale
        params = [{"params": rest}]
        if norm:
            params.append({"params": norm, "lr": hp.lr * scale, "weight_decay": hp.weight_decay / scale})
        # One fused kernel per step instead of a chain of foreach ops: the same update, about
        # 12% off the seed network's CPU step (research/seed_step.py: its 2M-weight dense layer); same state_dict.
        fused = {"fused": True} if self.device.type in ("cpu", "cuda") else {}
        if hp.optimizer == "adam":
            opt = torch.optim.Adam(params, lr=hp.lr, weight_decay=hp.weight_decay, **fused)
        elif hp.optimizer == "adamw":
            opt = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay, **fused)
        elif hp.optimizer == "muon":
            opt = MuonSGD(filters, params, lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay,
                          muon_lr=hp.muon_lr, muon_momentum=hp.muon_momentum)  # fmt: skip
        else:
            opt = torch.optim.SGD(params, lr=hp.lr, momentum=hp.momentum, nesterov=True, weight_decay=hp.weight_decay)
        if hp.schedule == "none":
            return {"optimizer": opt}
        total = self.total_steps()
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
