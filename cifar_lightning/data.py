"""CIFAR-10 as uint8 tensors: sources, on-disk cache, seeded split, normalisation.

Images are decoded once into a (N, 3, 32, 32) uint8 tensor and kept in memory; batches are
sliced from it, moved to the device as uint8 and only there augmented and normalised (see
``on_after_batch_transfer``). On a 2-core machine a per-sample PIL pipeline in DataLoader
workers costs more than the seed network itself.

    python -c "from cifar_lightning import CIFAR10DataModule as D; d=D('../shared/data/cifar10'); d.setup('fit'); print(len(d.train_set))"
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import sys
from collections.abc import Iterator, Sequence, Sized
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from lightning.pytorch.overrides.distributed import UnrepeatedDistributedSampler
from torch.utils.data import DataLoader, Dataset, RandomSampler, Sampler
from torchvision.datasets import CIFAR10

from cifar_lightning.augment import BatchAugment, alternating_flip
from cifar_lightning.errors import DataError, ImageError, printable
from cifar_lightning.fileio import atomic_write
from cifar_lightning.images import CLASSES, IMAGE_SIZE, IMAGE_SUFFIXES, is_image_file, load_image, normalize
from cifar_lightning.recipes import TrainConfig, check_values, default

# 2: image files decode by the one policy of images.py (centre crop + Lanczos, not a squash).
CACHE_VERSION = 2


@dataclass
class Images:
    """Decoded images of one split: uint8 (N, 3, H, W) and int64 labels."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...]


class TensorImages(Dataset):
    """Map-style dataset over in-memory tensors that hands out whole batches.

    ``__getitems__`` lets the DataLoader slice one batch with a single index op instead of
    N ``__getitem__`` calls and a collate; samplers (shuffle, DistributedSampler) still work.
    """

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, with_index: bool = False) -> None:
        self.images = images
        self.labels = labels
        #: batches also carry each image's index in this set (for per-image schedules)
        self.with_index = with_index

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.images[i], self.labels[i]

    def __getitems__(self, indices: Sequence[int]) -> tuple[torch.Tensor, ...]:
        idx = torch.as_tensor(indices, dtype=torch.long)
        if self.with_index:
            return self.images[idx], self.labels[idx], idx
        return self.images[idx], self.labels[idx]


class EpochShuffle(RandomSampler):
    """A shuffle that is a function of (seed, epoch) alone, never of the global RNG: a run resumed
    mid-epoch draws the same permutation again and can skip what it already trained on.
    Lightning calls ``set_epoch`` at every epoch start; under DDP it sees a RandomSampler and
    puts a (seeded, epoch-aware) DistributedSampler in its place."""

    def __init__(self, data_source: Sized, seed: int = 0) -> None:
        super().__init__(data_source)
        self.seed, self.epoch = seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        return iter(torch.randperm(len(self.data_source), generator=g).tolist())


class ResumableLoader(DataLoader):
    """A DataLoader that Lightning checkpoints mid-epoch: ``state_dict`` records how many
    batches of the current epoch the run has trained on, and after ``load_state_dict`` (which
    Lightning calls only when resuming mid-epoch) the next iteration skips them, so a resumed
    run trains on exactly the batches an unbroken run would.

    ``batches_trained`` is counted by the data module as each batch reaches the device for a
    training step (the loader alone cannot tell a trained batch from one Lightning merely
    prefetched). The epoch travels too because Lightning creates the resumed iterator before it
    sets the sampler's epoch.
    """

    batches_trained = 0
    epoch = 0
    _skip = 0

    def __iter__(self) -> Iterator:
        skip, self._skip = self._skip, 0
        self.batches_trained = skip
        it = super().__iter__()
        # Skipped batches are sliced from in-memory tensors and dropped: cheap, and the same
        # indices an unbroken run drew (the shuffle is a function of seed and epoch alone).
        for _ in range(skip):
            next(it, None)
        return it

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.epoch), "batches_trained": int(self.batches_trained)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self._skip = int(state.get("batches_trained", 0))
        set_epoch = getattr(self.sampler, "set_epoch", None)
        if callable(set_epoch) and "epoch" in state:
            set_epoch(int(state["epoch"]))


def batch_collate(batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Collate for ``TensorImages``: the batch is already stacked."""
    return batch


# ----------------------------------------------------------------------------- sources


def detect_source(data_dir: Path) -> str:
    """'imagefolder' for a train|test/<class>/ tree (either folder present), else 'cifar10'
    (torchvision's archive, downloaded when absent)."""
    if (data_dir / "train").is_dir() or (data_dir / "test").is_dir():
        return "imagefolder"
    return "cifar10"


def _class_dirs(split_dir: Path) -> list[Path]:
    return sorted(p for p in split_dir.iterdir() if p.is_dir() and not p.name.startswith("."))


def _check_class_name(class_dir: Path) -> None:
    """A class name is written into results.json, config.yaml, checkpoints and figures, which
    all need text: a folder name that is not UTF-8 is refused here, in one line naming it,
    rather than failing in one of those writers after training. (Image file names may be any
    bytes: they are only opened and hashed.)"""
    try:
        class_dir.name.encode("utf-8")
    except UnicodeError:
        raise DataError(
            f"{printable(class_dir)}: class folder name is not valid UTF-8 (class names go into results and "
            "checkpoints); rename the folder"
        ) from None


def _image_files(class_dir: Path) -> list[Path]:
    return sorted(p for p in class_dir.rglob("*") if is_image_file(p))


def imagefolder_listing(data_dir: Path) -> dict[str, list[tuple[str, list[Path]]]]:
    """{split: [(class, files)]}; checks that both splits hold the same non-empty classes."""
    listing: dict[str, list[tuple[str, list[Path]]]] = {}
    for split in ("train", "test"):
        split_dir = data_dir / split
        if not split_dir.is_dir():
            raise DataError(f"{printable(split_dir)}: missing; an image-folder data dir needs train/<class>/ and test/<class>/")
        classes = _class_dirs(split_dir)
        if not classes:
            raise DataError(f"{printable(split_dir)}: no class folders found")
        entries = []
        for class_dir in classes:
            _check_class_name(class_dir)
            files = _image_files(class_dir)
            if not files:
                raise DataError(f"{printable(class_dir)}: class folder holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            entries.append((class_dir.name, files))
        listing[split] = entries
    train_classes = [c for c, _ in listing["train"]]
    test_classes = [c for c, _ in listing["test"]]
    if train_classes != test_classes:
        raise DataError(
            f"{printable(data_dir)}: train and test class folders differ: "
            f"train has {train_classes}, test has {test_classes}"
        )
    return listing


def decode_image(path: Path) -> np.ndarray:
    """Any image file -> (3, 32, 32) uint8 RGB by the one decode policy (``images.to_rgb32``)."""
    try:
        return load_image(path).transpose(2, 0, 1)
    except ImageError as e:
        raise DataError(f"{printable(path)}: not a readable image ({str(e).removeprefix(f'{printable(path)}: ')})") from None


def decode_listing(entries: list[tuple[str, list[Path]]]) -> Images:
    files = [f for _, fs in entries for f in fs]
    labels = [i for i, (_, fs) in enumerate(entries) for _ in fs]
    images = np.empty((len(files), 3, IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    for i, f in enumerate(files):
        images[i] = decode_image(f)
    return Images(torch.from_numpy(images), torch.tensor(labels, dtype=torch.long), tuple(c for c, _ in entries))


def listing_fingerprint(listing: dict[str, list[tuple[str, list[Path]]]], root: Path) -> str:
    """Hash of every file's relative path, size and mtime: any change makes the cache stale.
    Paths are hashed as the file system's bytes (``os.fsencode``): a name that is not UTF-8 is
    a valid file name, and for every UTF-8 name the bytes are those of ``str.encode``."""
    h = hashlib.sha256(f"v{CACHE_VERSION}".encode())
    for split, entries in listing.items():
        for cls, files in entries:
            for f in files:
                st = f.stat()
                h.update(os.fsencode(f"{split}/{cls}/{f.relative_to(root)}") + f"|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def default_cache_dir() -> Path:
    """Per-user cache, so a read-only data dir works: $CIFAR_LIGHTNING_CACHE or XDG cache."""
    env = os.environ.get("CIFAR_LIGHTNING_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "cifar-lightning"


def cache_path_for(data_dir: Path, cache_dir: Path) -> Path:
    key = hashlib.sha256(os.fsencode(data_dir.resolve())).hexdigest()[:16]
    return cache_dir / f"{data_dir.resolve().name}-{key}.pt"


def _read_cache(path: Path, fingerprint: str) -> dict[str, Images] | None:
    """The cached splits, or None when the cache is absent, stale, truncated or unreadable
    (even its folder: a cache only saves decoding, so any failure here means decode again)."""
    try:
        if not path.is_file():
            return None
        blob = torch.load(path, map_location="cpu", weights_only=True)
        if blob.get("fingerprint") != fingerprint:
            return None
        out = {}
        for split in ("train", "test"):
            images, labels = blob[f"{split}_images"], blob[f"{split}_labels"]
            ok = (
                images.dtype == torch.uint8 and images.ndim == 4 and images.shape[1:] == (3, IMAGE_SIZE, IMAGE_SIZE)
                and labels.dtype == torch.long and len(labels) == len(images)
                and (len(labels) == 0 or 0 <= int(labels.min()) and int(labels.max()) < len(blob["classes"]))
            )  # fmt: skip
            if not ok:
                return None
            out[split] = Images(images, labels, tuple(blob["classes"]))
        return out
    except Exception:  # any failure to read means: rebuild
        return None


def _write_cache(path: Path, fingerprint: str, splits: dict[str, Images]) -> bool:
    """Atomic write (temp file + rename); False, with one warning line, when the cache cannot be
    written (an unwritable or full cache dir, a quota): the cache only saves decoding next
    time, so the run goes on without it.

    The blob is serialised in memory first and written as plain bytes: torch.save writing to a
    file on a full disk fails inside its C++ zip writer with a cryptic RuntimeError, while a
    Python write fails with a clean OSError(ENOSPC), and ``atomic_write`` removes its temporary
    file whatever went wrong, so no partial file is left in the cache dir."""
    blob = {"fingerprint": fingerprint, "classes": list(splits["train"].classes)}
    for split, d in splits.items():
        blob[f"{split}_images"] = d.images
        blob[f"{split}_labels"] = d.labels
    try:
        buffer = io.BytesIO()
        torch.save(blob, buffer)
        atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getbuffer()))
        return True
    except (OSError, RuntimeError, MemoryError) as e:  # RuntimeError: torch's writer
        reason = e.strerror if isinstance(e, OSError) and e.strerror else " ".join(str(e).split())[:200] or type(e).__name__
        print(f"warning: decoded-image cache {printable(path)} not written ({reason}); going on without it "
              "(the images are decoded again next run)", file=sys.stderr, flush=True)  # fmt: skip
        return False


def load_imagefolder(data_dir: Path, cache_dir: Path | None = None) -> dict[str, Images]:
    """Decode a train|test/<class>/ tree, through the on-disk cache."""
    listing = imagefolder_listing(data_dir)
    fingerprint = listing_fingerprint(listing, data_dir)
    path = cache_path_for(data_dir, cache_dir or default_cache_dir())
    cached = _read_cache(path, fingerprint)
    if cached is not None:
        return cached
    splits = {split: decode_listing(entries) for split, entries in listing.items()}
    _write_cache(path, fingerprint, splits)
    return splits


def download_cifar10(data_dir: Path) -> None:
    """torchvision's download into data_dir with its MD5 checks (nothing is fetched when the
    files are there and intact); one clear error offline."""
    made = [p for p in (data_dir, *data_dir.parents) if not p.exists()]  # folders the download would create
    try:
        CIFAR10(str(data_dir), train=True, download=True)
    except Exception as e:  # URLError, HTTPError, socket timeouts, a bad checksum...
        for folder in made:  # a mistyped --data-dir leaves no empty folder behind (nearest first)
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise DataError(
            f"could not download CIFAR-10 into {data_dir} ({type(e).__name__}: {e}); "
            "with no network, point --data-dir at a local copy (an image-folder tree "
            "train|test/<class>/ or a folder holding cifar-10-batches-py)"
        ) from None


def load_torchvision_cifar10(data_dir: Path) -> dict[str, Images]:
    out = {}
    for split in ("train", "test"):
        try:
            ds = CIFAR10(str(data_dir), train=split == "train", download=False)
        except RuntimeError as e:
            raise DataError(f"{data_dir}: CIFAR-10 files missing or corrupt ({e}); drop --no-download to fetch them") from None
        images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
        out[split] = Images(images, torch.tensor(ds.targets, dtype=torch.long), tuple(ds.classes))
    return out


def seeded_split(n: int, val_size: int, seed: int, calib_size: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(train_idx, val_idx, calib_idx): disjoint parts of one fixed permutation of range(n),
    independent of the training seed. The calibration images (for the softmax temperature) come
    after the validation ones, so holding some out leaves the validation split as it was."""
    if not 0 <= val_size < n:
        raise DataError(f"--val-size must be in [0, {n - 1}] for {n} training images, got {val_size}")
    if not 0 <= calib_size < n - val_size:
        raise DataError(
            f"--calib-size {calib_size}: only {n - val_size} training images are left after the validation split; "
            "use a smaller --calib-size or --calibrate val/none"
        )
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return perm[val_size + calib_size :], perm[:val_size], perm[val_size : val_size + calib_size]


def load_splits(data_dir: str | Path, download: bool = True, source: str = "auto") -> dict[str, Images]:
    """The train and test splits of a data dir, decoded (through the cache), unsplit: what a
    command that only reads images (export's check, show-data, benchmarks) needs."""
    dm = CIFAR10DataModule(data_dir=str(data_dir), download=download, source=source)
    dm.prepare_data()
    return dm.load()


# ----------------------------------------------------------------------------- data module


class CIFAR10DataModule(L.LightningDataModule):
    """CIFAR-10 from torchvision's archive or an image-folder tree, augmented on the device.

    ``source``: 'auto' picks 'imagefolder' when data_dir has train/ and test/, else
    'cifar10' (torchvision; downloaded in ``prepare_data`` when absent, MD5-checked).
    """

    def __init__(
        self,
        data_dir: str = default("data_dir"),
        batch_size: int = default("batch_size"),
        val_size: int = default("val_size"),
        split_seed: int = default("split_seed"),
        limit_train_images: int | None = default("limit_train_images"),
        augment: str = default("augment"),
        augment_options: dict[str, float] | None = None,
        source: str = default("data_source"),
        num_workers: int = default("num_workers"),
        eval_batch_size: int = 500,
        download: bool = default("download"),
        cache_dir: str | None = None,
        shuffle_seed: int = default("seed"),
        calib_size: int = 0,
        alternate_flip: bool = default("alternate_flip"),
        robust_from: float = default("robust_from"),
    ) -> None:
        super().__init__()
        # The recipe owns the bounds: a data module built by hand (not from_config) is held to the same.
        check_values({"batch_size": batch_size, "val_size": val_size, "split_seed": split_seed, "augment": augment,
                      "limit_train_images": limit_train_images, "data_source": source, "num_workers": num_workers,
                      "seed": shuffle_seed})  # fmt: skip
        self.save_hyperparameters()
        self.data_dir = Path(data_dir).expanduser()
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        try:
            self.augmenter = BatchAugment(augment, **(augment_options or {}))
        except ValueError as e:
            raise DataError(str(e)) from None
        self.classes: tuple[str, ...] = CLASSES
        self._splits: dict[str, Images] | None = None
        self.train_set: TensorImages | None = None
        self.val_set: TensorImages | None = None
        self.test_set: TensorImages | None = None
        #: images held out of training to fit the softmax temperature (calib_size of them)
        self.calib_set: TensorImages | None = None
        self._train_loader: ResumableLoader | None = None
        #: alternate_flip: the images mirrored in even epochs (odd epochs mirror the others)
        self.flip_base: torch.Tensor | None = None

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> CIFAR10DataModule:
        """The data module a recipe asks for (its values were checked by the recipe)."""
        return cls(
            data_dir=cfg.data_dir, batch_size=cfg.batch_size, val_size=cfg.val_size, split_seed=cfg.split_seed,
            limit_train_images=cfg.limit_train_images, augment=cfg.augment, augment_options=cfg.augment_options(),
            source=cfg.data_source, num_workers=cfg.num_workers, download=cfg.download, shuffle_seed=cfg.seed,
            calib_size=cfg.held_out_for_calibration(), alternate_flip=cfg.alternate_flip, robust_from=cfg.robust_from,
        )  # fmt: skip

    @property
    def source(self) -> str:
        src = self.hparams.source
        return detect_source(self.data_dir) if src == "auto" else src

    def prepare_data(self) -> None:
        """Download only (runs on one process per node, before setup)."""
        if self.data_dir.exists() and not self.data_dir.is_dir():
            raise DataError(f"--data-dir {self.data_dir}: not a directory")
        if self.source == "cifar10" and self.hparams.download:
            download_cifar10(self.data_dir)

    def load(self) -> dict[str, Images]:
        if self._splits is None:
            if not self.data_dir.is_dir():
                raise DataError(f"--data-dir {self.data_dir}: no such directory")
            if self.source == "imagefolder":
                cache = Path(self.hparams.cache_dir) if self.hparams.cache_dir else None
                self._splits = load_imagefolder(self.data_dir, cache)
            else:
                self._splits = load_torchvision_cifar10(self.data_dir)
            self.classes = self._splits["train"].classes
        return self._splits

    def setup(self, stage: str | None = None) -> None:
        splits = self.load()
        if stage in ("fit", "validate", None) and self.train_set is None:
            train = splits["train"]
            hp = self.hparams
            # At most a tenth of what validation leaves: a small dataset keeps most of its images for training.
            calib_size = min(hp.calib_size, max(len(train.labels) - hp.val_size, 0) // 10)
            train_idx, val_idx, calib_idx = seeded_split(len(train.labels), hp.val_size, hp.split_seed, calib_size)
            if hp.limit_train_images:
                train_idx = train_idx[: hp.limit_train_images]
            self.train_set = TensorImages(train.images[train_idx], train.labels[train_idx], with_index=hp.alternate_flip)
            if hp.alternate_flip:
                g = torch.Generator().manual_seed(hp.shuffle_seed * 100_003 + 7)
                self.flip_base = torch.randint(0, 2, (len(train_idx),), generator=g).bool()
            self.val_set = TensorImages(train.images[val_idx], train.labels[val_idx])
            self.calib_set = TensorImages(train.images[calib_idx], train.labels[calib_idx])
        if stage in ("test", "predict", None) and self.test_set is None:
            test = splits["test"]
            self.test_set = TensorImages(test.images, test.labels)

    def _loader(self, ds: TensorImages | None, batch_size: int, shuffle: bool, sampler: Sampler | None = None) -> DataLoader:
        if ds is None or len(ds) == 0:
            raise DataError("no images for this split (check --val-size / --limit-train-images)")
        # A private generator: creating an iterator must not draw from the global RNG, which
        # drives augmentation and dropout, or a resumed run would drift from an unbroken one.
        return ResumableLoader(
            ds, batch_size=batch_size, collate_fn=batch_collate, generator=torch.Generator().manual_seed(0),
            sampler=EpochShuffle(ds, self.hparams.shuffle_seed) if shuffle else sampler,
            num_workers=self.hparams.num_workers, persistent_workers=self.hparams.num_workers > 0,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        self._train_loader = self._loader(self.train_set, self.batch_size, shuffle=True)
        return self._train_loader

    def _eval_loader(self, ds: TensorImages | None) -> DataLoader:
        trainer, sampler = self.trainer, None
        if ds is not None and trainer is not None and trainer.world_size > 1:
            # Lightning's default DistributedSampler pads the last shard with repeated images,
            # which would count some images twice in val/test metrics: give each process a
            # disjoint share of every image, exactly once (shares may differ by one).
            sampler = UnrepeatedDistributedSampler(ds, num_replicas=trainer.world_size, rank=trainer.global_rank, shuffle=False)
        return self._loader(ds, self.eval_batch_size, shuffle=False, sampler=sampler)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def on_after_batch_transfer(self, batch: tuple[torch.Tensor, torch.Tensor], dataloader_idx: int) -> tuple:
        """uint8 on the device -> (augmented, only while training) normalised float."""
        images, labels, *index = batch
        training = self.trainer is not None and self.trainer.training
        epoch = getattr(self.trainer, "current_epoch", 0)
        if training and self._train_loader is not None:
            # This batch is about to be trained on: what a mid-epoch checkpoint must skip.
            self._train_loader.batches_trained += 1
            self._train_loader.epoch = epoch
        if training and index and self.flip_base is not None:
            images = alternating_flip(images, index[0], self.flip_base, epoch)
        if training and self.augmenter.active:
            epochs = getattr(self.trainer, "max_epochs", None) or 1
            images = self.augmenter(images, photo_ops=epoch >= int(self.hparams.get("robust_from", 0.0) * epochs))
        return normalize(images), labels

