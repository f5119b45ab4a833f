"""Shared plumbing for image-classification DataModules: arrays or files in, albumentations out.

A subclass only says where its images come from (``load_splits``); splitting, transforms and loaders
are here, so every dataset behaves the same way under the same overrides.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, get_worker_info

from transferrable.core.archives import resolve_data_dir
from transferrable.core.errors import DatasetError

__all__ = ["DatasetError"]  # defined in the leaf ``transferrable.core.errors``; datamodules import it from here

log = logging.getLogger(__name__)

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


Images = np.ndarray | Sequence[str]  # uint8 N x H x W (x C) arrays, or image file paths


def read_image(path: str) -> np.ndarray:
    """Read an image file as uint8 RGB; an unreadable file is named in the error."""
    import cv2

    img = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if img is None:
        raise DatasetError(f"unreadable image file: {path} (expected a JPEG/PNG/BMP image)")
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def to_rgb(img: np.ndarray) -> np.ndarray:
    """Grayscale images are replicated to 3 channels so every backbone takes the same input."""
    if img.ndim == 2:
        return np.repeat(img[:, :, None], 3, axis=2)
    if img.shape[2] == 1:
        return np.repeat(img, 3, axis=2)
    return img


def build_transform(input_size: int, mean: Sequence[float], std: Sequence[float], augment: str = "none"):
    """albumentations pipeline; ``augment``: none | flip | flip_crop (pad + random crop + flip) | resized_crop."""
    import albumentations as A
    from albumentations.pytorch import ToTensorV2

    s = int(input_size)
    if augment == "none":
        geo = [A.Resize(s, s)]
    elif augment == "flip":
        geo = [A.Resize(s, s), A.HorizontalFlip()]
    elif augment == "flip_crop":
        pad = max(1, s // 8)
        geo = [A.Resize(s, s), A.PadIfNeeded(s + 2 * pad, s + 2 * pad, border_mode=0), A.RandomCrop(s, s), A.HorizontalFlip()]
    elif augment == "resized_crop":
        geo = [A.RandomResizedCrop(size=(s, s), scale=(0.5, 1.0)), A.HorizontalFlip()]
    else:
        raise ValueError(f"dataset.augment={augment!r}: expected none, flip, flip_crop or resized_crop")
    return A.Compose([*geo, A.Normalize(mean=tuple(mean), std=tuple(std), max_pixel_value=255.0), ToTensorV2()])


class BatchTensorTransform:
    """``build_transform``'s ``none`` / ``flip`` / ``flip_crop`` for a whole batch of in-memory uint8 images, in torch.

    The same operations (bilinear resize, zero padding of ``input_size // 8``, random crop, horizontal flip, then
    normalisation) without a Python call per image: on the 2-core machines the per-sample albumentations pipeline
    was ~10% of a Fashion-MNIST training step. The randomness comes from ``generator``, which the dataset seeds
    from the epoch seed and the batch's first index, so augmentation stays a function of the run's seed.
    """

    AUGMENTS = ("none", "flip", "flip_crop")

    def __init__(self, input_size: int, mean: Sequence[float], std: Sequence[float], augment: str = "none"):
        if augment not in self.AUGMENTS:
            raise ValueError(f"dataset.augment={augment!r}: the batch path supports {list(self.AUGMENTS)}")
        self.size, self.augment = int(input_size), augment
        self.pad = max(1, self.size // 8)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1) * 255.0
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1) * 255.0

    def __call__(self, images: np.ndarray, generator: torch.Generator | None = None) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(images))
        x = x[:, None] if x.ndim == 3 else x.permute(0, 3, 1, 2)  # B x C x H x W
        x = x.float()
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if tuple(x.shape[-2:]) != (self.size, self.size):
            x = torch.nn.functional.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
            x = x.round().clamp(0, 255)  # as the uint8 image albumentations resizes to
        if self.augment == "flip_crop":
            x = self._crop(x, generator)
        if self.augment in ("flip", "flip_crop"):
            flip = torch.rand(x.shape[0], generator=generator) < 0.5
            x = torch.where(flip[:, None, None, None], x.flip(-1), x)
        return ((x - self.mean) / self.std).contiguous()

    def _crop(self, x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        b, s, p = x.shape[0], self.size, self.pad
        padded = torch.nn.functional.pad(x, (p, p, p, p))
        oy, ox = (torch.randint(0, 2 * p + 1, (2, b), generator=generator))
        rows = (oy[:, None] + torch.arange(s))[:, None, :, None]  # B x 1 x s x 1
        cols = (ox[:, None] + torch.arange(s))[:, None, None, :]  # B x 1 x 1 x s
        return padded[torch.arange(b)[:, None, None, None], torch.arange(x.shape[1])[None, :, None, None], rows, cols]


class EpochSeededSampler(Sampler):
    """Shuffles like ``RandomSampler`` and tags every index with this epoch's seed: ``(index, seed)``.

    The order and the epoch seed are functions of ``(seed, epoch)`` alone (Lightning calls ``set_epoch`` at every
    epoch start, as for ``DistributedSampler``), so a run resumed from a checkpoint shuffles exactly as an
    uninterrupted one. albumentations 2.x transforms own their RNG (seeded from the OS unless told, and copied
    as-is into forked workers), so the dataset reseeds its transform from the epoch seed once per epoch and worker.
    """

    def __init__(self, num_samples: int, seed: int = 0) -> None:
        self.num_samples, self.seed, self.epoch = int(num_samples), int(seed), 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self):
        epoch_seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, np.uint64)[0] >> 1)
        order = torch.randperm(self.num_samples, generator=torch.Generator().manual_seed(epoch_seed)).tolist()
        return iter([(i, epoch_seed) for i in order])


class ImageDataset(Dataset):
    """Images (an array or file paths) with integer labels, through an albumentations transform.

    An index may come as ``(index, epoch_seed)`` from ``EpochSeededSampler``: the transform is then reseeded
    when the epoch seed changes, so augmentation is a function of the run's seed alone.
    """

    def __init__(self, images: Images, labels: np.ndarray, transform=None,
                 batch_transform: BatchTensorTransform | None = None):
        if len(images) != len(labels):
            raise ValueError(f"{len(images)} images but {len(labels)} labels")
        self.images, self.labels, self.transform = images, np.asarray(labels, dtype=np.int64), transform
        self._transform_seed: int | None = None
        # in-memory uint8 arrays: the DataLoader fetches whole batches through __getitems__
        in_memory = isinstance(images, np.ndarray) and images.dtype == np.uint8
        self.batch_transform = batch_transform if in_memory else None

    def __len__(self) -> int:
        return len(self.labels)

    def load(self, index: int) -> np.ndarray:
        item = self.images[index]
        return to_rgb(read_image(item) if isinstance(item, str | Path) else np.asarray(item))

    def _reseed(self, epoch_seed: int) -> None:
        if epoch_seed != self._transform_seed and hasattr(self.transform, "set_random_seed"):
            worker = get_worker_info()
            self.transform.set_random_seed((epoch_seed + (worker.id if worker else 0)) % 2**32)
        self._transform_seed = epoch_seed

    def __getitem__(self, index: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        if isinstance(index, tuple):
            index, epoch_seed = index
            self._reseed(epoch_seed)
        try:
            img = self.load(index)
            x = self.transform(image=img)["image"] if self.transform is not None else torch.from_numpy(img)
        except DatasetError:
            raise
        except Exception as err:  # e.g. in a DataLoader worker: name the sample, not only the worker
            raise DatasetError(f"sample {index} ({self.describe(index)}): {type(err).__name__}: "
                               f"{(str(err).strip().splitlines() or [''])[0][:200]}") from err
        return x, int(self.labels[index])

    def __getitems__(self, indices: list) -> list[tuple[torch.Tensor, int]]:
        """A whole batch at once (PyTorch's fetcher calls this when it exists), transformed as tensors."""
        if self.batch_transform is None:
            return [self[i] for i in indices]
        seeded = bool(indices) and isinstance(indices[0], tuple)
        idx = np.array([i[0] if seeded else i for i in indices], dtype=np.int64)
        generator = None
        if self.batch_transform.augment != "none":
            epoch_seed = int(indices[0][1]) if seeded else 0
            state = np.random.SeedSequence([epoch_seed, int(idx[0]) if len(idx) else 0]).generate_state(1, np.uint64)
            generator = torch.Generator().manual_seed(int(state[0] >> 1))
        x = self.batch_transform(self.images[idx], generator)
        return list(zip(x.unbind(0), self.labels[idx].tolist(), strict=True))

    def describe(self, index: int) -> str:
        item = self.images[index]
        return str(item) if isinstance(item, str | Path) else f"array image {index}, label {int(self.labels[index])}"


def stratified_split(labels: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held_out): ``fraction`` of each class held out, deterministic from ``seed``."""
    rng = np.random.default_rng(seed)
    keep, held = [], []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        # at least one held out per class (when the class can spare it), so a small split is never empty
        n = int(np.floor(len(idx) * fraction + 0.5))
        if fraction > 0 and len(idx) >= 2:
            n = min(max(n, 1), len(idx) - 1)
        held.append(idx[:n])
        keep.append(idx[n:])
    return np.sort(np.concatenate(keep)), np.sort(np.concatenate(held))


def subset(images: Images, idx: np.ndarray) -> Images:
    return images[idx] if isinstance(images, np.ndarray) else [images[i] for i in idx]


class ImageClassificationDataModule(L.LightningDataModule):
    """Train/val/test splits of labelled images. Subclasses implement ``load_splits`` and ``class_names``.

    ``load_splits`` returns ``{"train": (images, labels), "test": (...), ["val": (...)]}``; without a
    ``val`` split, ``val_fraction`` of train (stratified, from ``seed``) becomes validation.
    """
    PROVIDES_DATA = ("images", "labels")  # what tasks may ask for (transferrable/run/compat.py)

    name = "images"

    def __init__(
        self,
        data_dir: str | None = None,
        input_size: int = 32,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        val_fraction: float = 0.1,
        seed: int = 0,
        augment: str = "none",
        mean: Sequence[float] = (0.5, 0.5, 0.5),
        std: Sequence[float] = (0.25, 0.25, 0.25),
        pin_memory: bool = False,
        max_train_samples: int | None = None,
    ):
        super().__init__()
        self.data_dir = resolve_data_dir(data_dir)  # a directory, or an archive extracted once (safely)
        self.input_size, self.batch_size = int(input_size), int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers, self.pin_memory = int(num_workers), pin_memory
        self.val_fraction, self.seed, self.augment = float(val_fraction), int(seed), augment
        self.mean, self.std = tuple(mean), tuple(std)
        self.max_train_samples = max_train_samples
        self.splits: dict[str, ImageDataset] = {}

    # -- what a subclass provides ---------------------------------------------------------------
    def load_splits(self) -> dict[str, tuple[Images, np.ndarray]]:
        raise NotImplementedError

    @property
    def class_names(self) -> list[str]:
        raise NotImplementedError

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    # -- Lightning hooks ------------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        raw = self.load_splits()
        train_x, train_y = raw["train"]
        train_y = np.asarray(train_y, dtype=np.int64)
        if "val" in raw:
            val_x, val_y = raw["val"]
        else:
            keep, held = stratified_split(train_y, self.val_fraction, self.seed)
            val_x, val_y = subset(train_x, held), train_y[held]
            train_x, train_y = subset(train_x, keep), train_y[keep]
        if self.max_train_samples and len(train_y) > self.max_train_samples:
            idx = np.sort(np.random.default_rng(self.seed).permutation(len(train_y))[: self.max_train_samples])
            train_x, train_y = subset(train_x, idx), train_y[idx]
        if len(np.unique(train_y)) < 2:
            where = f" at {self.data_dir}" if self.data_dir else ""
            raise DatasetError(f"dataset '{self.name}'{where}: the training split has fewer than 2 classes")
        train_tf = build_transform(self.input_size, self.mean, self.std, self.augment)
        eval_tf = build_transform(self.input_size, self.mean, self.std, "none")
        batched = self.augment in BatchTensorTransform.AUGMENTS  # used for in-memory arrays only
        train_btf = BatchTensorTransform(self.input_size, self.mean, self.std, self.augment) if batched else None
        eval_btf = BatchTensorTransform(self.input_size, self.mean, self.std, "none")
        test_x, test_y = raw["test"]
        self.splits = {
            "train": ImageDataset(train_x, train_y, train_tf, train_btf),
            "val": ImageDataset(val_x, val_y, eval_tf, eval_btf),
            "test": ImageDataset(test_x, test_y, eval_tf, eval_btf),
        }
        log.info(
            "%s: %s", self.name, ", ".join(f"{k} {len(v)}" for k, v in self.splits.items())
        )

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        return DataLoader(
            self.splits[split],
            batch_size=self.batch_size if split == "train" else self.eval_batch_size,
            sampler=EpochSeededSampler(len(self.splits[split]), self.seed) if shuffle else None,
            # worker base seeds from a private generator: building an iterator then leaves the global RNG
            # (dropout; restored on resume by callbacks.rng_state) untouched
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            # a last training batch of one sample would break BatchNorm; evaluation sees every sample
            drop_last=split == "train" and len(self.splits[split]) > self.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
