"""The Lightning behaviour this project leans on beyond its documented API (exact mid-epoch
resume through the loader's state_dict is covered end to end by test_faults.py). ``lightning`` is
capped below the next minor release in pyproject.toml; when the cap is raised, these tests say
exactly what moved instead of letting resume or DDP evaluation break quietly."""

from __future__ import annotations

import importlib
import inspect
import signal

import pytest


@pytest.mark.parametrize(
    "module, name, used_for",
    [
        ("lightning.pytorch.overrides.distributed", "UnrepeatedDistributedSampler", "DDP val/test without repeated images (data.py)"),
        ("lightning.pytorch.utilities.exceptions", "SIGTERMException", "a SIGTERM/Ctrl-C stop with a checkpoint (training.py)"),
        ("lightning.pytorch.plugins.io", "TorchCheckpointIO", "atomic checkpoint writes (training.AtomicCheckpointIO)"),
        ("lightning.fabric.utilities.exceptions", "MisconfigurationException", "Trainer misconfiguration as a one-line error (cli.py)"),
    ],
)
def test_the_lightning_names_we_import_still_exist(module: str, name: str, used_for: str) -> None:
    try:
        found = getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError):
        pytest.fail(f"{module}.{name} is gone from this Lightning release; it is needed for {used_for}")
    assert inspect.isclass(found), f"{module}.{name} is no longer a class; it is needed for {used_for}"


def test_the_trainer_installs_a_callable_sigterm_handler_that_ctrl_c_can_call(tmp_path) -> None:
    """StopOnSignal routes Ctrl-C to whatever handles SIGTERM during fit; it must be callable."""
    import lightning as L
    import torch

    seen = {}

    class Probe(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:  # noqa: ANN001
            seen["handler"] = signal.getsignal(signal.SIGTERM)
            seen["received_before"] = trainer.received_sigterm

    class Tiny(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.layer = torch.nn.Linear(2, 1)

        def training_step(self, batch, batch_idx):  # noqa: ANN001, ANN201
            return self.layer(batch[0]).sum()

        def configure_optimizers(self):  # noqa: ANN201
            return torch.optim.SGD(self.parameters(), lr=0.1)

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 2)), batch_size=2)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path, callbacks=[Probe()])  # fmt: skip
    trainer.fit(Tiny(), loader)
    assert callable(seen["handler"]) and seen["received_before"] is False
