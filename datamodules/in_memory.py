"""Image splits held in memory as uint8 tensors, and loaders that index whole batches out of them (BiGAN).

:func:`load_splits` materialises every split of a suite image DataModule at a given resolution and channel count;
:func:`batch_sampler_loader` serves one split in batches without per-sample collation, shuffled as a function of
``(seed, epoch)`` alone, so that a run resumed mid-training sees the same batches as an uninterrupted one.

Under DDP (``shard=True``) every rank draws the same epoch permutation and keeps its interleaved share of it
(rows ``rank, rank + W, ...`` of the first ``W * (N // W)``, like ``DistributedSampler(drop_last=True)``), so each
rank trains on its own shard of every epoch with the same number of batches; the rank is read from
``torch.distributed`` when the loader is iterated (inside ``trainer.fit``), so the task sets
``trainer.use_distributed_sampler: false`` (Lightning would otherwise shard the batches a second time).
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch
from torch.utils.data import BatchSampler, DataLoader, Sampler, SequentialSampler, TensorDataset

from transferrable.core.distributed import rank_and_world

log = logging.getLogger(__name__)


class SplitTensors:
    """One split as uint8 ``(N, C, H, W)`` images in [0, 255] plus labels (pixels at the encoder's size)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, limit: int | None = None):
        n = len(self) if limit is None else min(len(self), limit)
        for start in range(0, n, batch_size):
            yield self.images[start : min(start + batch_size, n)].float() / 255.0, self.labels[start : start + batch_size]


def materialise_split(dataset, size: int, channels: int, batch_size: int = 512, mean=None, std=None) -> SplitTensors:
    """Every image of a suite ``ImageDataset`` as uint8 at ``size`` x ``size`` with ``channels`` channels.

    Fast path: grayscale uint8 arrays already at ``size`` (Fashion-MNIST/MNIST IDX at 28 px) are taken as
    they are (the eval transform would only normalise them). Otherwise every image goes through the
    dataset's transform and the normalisation is undone (``x * std + mean``).
    """
    images = getattr(dataset, "images", None)
    labels = torch.as_tensor(np.asarray(dataset.labels), dtype=torch.long)
    if isinstance(images, np.ndarray) and images.dtype == np.uint8 and images.ndim == 3 and images.shape[1:] == (size, size):
        x = torch.from_numpy(np.array(images, copy=True))[:, None]
        return SplitTensors(x.expand(-1, channels, -1, -1).contiguous(), labels)
    m = torch.tensor(mean if mean is not None else (0.0, 0.0, 0.0)).reshape(1, -1, 1, 1)
    s = torch.tensor(std if std is not None else (1.0, 1.0, 1.0)).reshape(1, -1, 1, 1)
    out = []
    for x, _ in DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=0):
        x01 = (x.float() * s + m).clamp(0, 1)[:, :channels]
        out.append((x01 * 255).round().to(torch.uint8))
    return SplitTensors(torch.cat(out), labels)


def load_splits(datamodule, size: int, channels: int) -> dict[str, SplitTensors]:
    """Every split of ``datamodule`` in memory at ``size`` px with ``channels`` channels (uint8)."""
    datamodule.setup("fit")
    if getattr(datamodule, "augment", "none") != "none":
        log.warning("in-memory splits: dataset.augment=%s is applied once, not per epoch", datamodule.augment)
    t0 = time.perf_counter()
    data = {name: materialise_split(ds, size, channels, mean=datamodule.mean, std=datamodule.std)
            for name, ds in datamodule.splits.items()}
    log.info("in memory: %s (%.1fs)", ", ".join(f"{k} {len(v)}" for k, v in data.items()), time.perf_counter() - t0)
    return data


class EpochPermutation(Sampler):
    """A shuffle that is a function of ``(seed, epoch)`` alone (Lightning calls ``set_epoch``): a run resumed from a
    mid-training checkpoint sees the same batches in its next epochs as an uninterrupted run. (A ``RandomSampler``
    with a generator seeded once would replay epoch 0's order after a resume.) With ``shard=True``, this rank's
    interleaved share of the permutation (every rank the same length; the last ``N % W`` rows of it sit out)."""

    def __init__(self, n: int, seed: int, shard: bool = False):
        self.n, self.seed, self.epoch, self.shard = int(n), int(seed), 0, bool(shard)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        world = rank_and_world()[1] if self.shard else 1
        return self.n // world if world > 1 else self.n

    def __iter__(self):
        epoch_seed = int(np.random.SeedSequence([self.seed, self.epoch]).generate_state(1, np.uint64)[0] >> 1)
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(epoch_seed))
        rank, world = rank_and_world() if self.shard else (0, 1)
        if world > 1:
            order = order[: world * (self.n // world)][rank::world]
        return iter(order.tolist())


class EpochBatchSampler(BatchSampler):
    def set_epoch(self, epoch: int) -> None:  # the DataLoader's sampler is this one: pass the epoch on
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(epoch)


def batch_sampler_loader(split: SplitTensors, batch_size: int, shuffle: bool, seed: int, drop_last: bool,
                         shard: bool = False) -> DataLoader:
    """A DataLoader that indexes whole batches out of the in-memory tensors (no per-sample collation); with
    ``shard=True`` (needs ``shuffle``) each DDP rank gets its own share of every epoch."""
    if shard and not shuffle:
        raise ValueError("batch_sampler_loader: shard=True shards the shuffled training order (shuffle=True)")
    data = TensorDataset(split.images, split.labels)
    base = EpochPermutation(len(data), seed, shard) if shuffle else SequentialSampler(data)
    # a private generator: creating an iterator draws a base seed, and a resumed run creates its first one at
    # another point of the global RNG stream than an uninterrupted run does
    return DataLoader(data, batch_size=None, sampler=EpochBatchSampler(base, batch_size, drop_last=drop_last),
                      generator=torch.Generator().manual_seed(seed))
