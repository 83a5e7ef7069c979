"""cifar-show-data: a grid of training images per class, or originals beside augmented
versions of them, to look at the data before training on it.

    cifar-show-data --data-dir ../shared/data/cifar10 --augment robust
"""

from __future__ import annotations

from pathlib import Path

import torch
from matplotlib.figure import Figure

from cifar_lightning.augment import BatchAugment
from cifar_lightning.data import load_splits
from cifar_lightning.errors import ConfigError, printable
from cifar_lightning.fileio import new_file, refuse_overlap
from cifar_lightning.report import data_grid_figure, save_figure


def data_grid_of(data_dir: str, augment: str = "none", ranges: dict[str, float] | None = None, per_class: int = 8,
                 n_augmented: int = 5, seed: int = 0, download: bool = True) -> Figure:  # fmt: skip
    """cifar-show-data: the training images of a data dir, augmented with the named recipe."""
    try:
        augmenter = BatchAugment(augment, **(ranges or {})) if augment != "none" else None
    except ValueError as e:
        raise ConfigError(str(e)) from None
    train = load_splits(data_dir, download=download)["train"]
    torch.manual_seed(seed)
    return data_grid_figure(train.images, train.labels, list(train.classes), per_class, augmenter, n_augmented)


def show_data_command(data_dir: str, augment: str = "none", ranges: dict[str, float] | None = None, per_class: int = 8,
                      n_augmented: int = 5, seed: int = 0, out: str | None = None, overwrite: bool = False,
                      download: bool = True) -> Path:  # fmt: skip
    """cifar-show-data: the grid, written to --out (never over or into the data it shows)."""
    target = Path(out or ("data_grid.png" if augment == "none" else f"data_grid_{augment}.png"))
    refuse_overlap(target, {"data dir": Path(data_dir)}, inside={"data dir": Path(data_dir)})
    target = new_file(target, overwrite)
    fig = data_grid_of(data_dir, augment, ranges, per_class, n_augmented, seed, download)
    save_figure(fig, target, replace=overwrite)  # a full disk: errors.exit_status says so (exit 1)
    print(printable(target))
    return target
