"""What a pipeline needs to run on N DDP processes: rows gathered back into dataset order, decisions agreed by
every rank (so that each rank makes the same trainer calls), and one writer per output.

Lightning predicts with an unpadded sampler (``UnrepeatedDistributedSampler``): rank ``r`` of ``W`` gets rows
``r, r + W, r + 2W, ...`` of a dataset in order, and no row twice, so the gathered rows are exactly one pass.
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from transferrable.distributed import gather_objects, initialized


def gather_rows(local: dict[str, np.ndarray], world_size: int) -> dict[str, np.ndarray]:
    """Every rank's predicted rows (``{name: rows of this rank}``) back in dataset order, on every rank."""
    if world_size <= 1:
        return local
    parts = gather_objects(local)
    out = {}
    for name in local:
        first = parts[0][name]
        rows = np.empty((sum(len(p[name]) for p in parts), *first.shape[1:]), first.dtype)
        for rank, part in enumerate(parts):
            rows[rank::world_size] = part[name]
        out[name] = rows
    return out


def union_in_order(names: list[str], wanted: list[str], world_size: int) -> list[str]:
    """The names any rank still needs, in ``names``' order (a cache hit on one rank only must not make the ranks
    disagree about running a ``trainer.predict``). Before the first trainer call there is no process group yet (the
    launcher starts the other ranks then), and no rank has written anything: the ranks agree already."""
    if world_size <= 1 or not initialized():
        return wanted
    needed = set().union(*gather_objects(list(wanted)))
    return [n for n in names if n in needed]


@contextlib.contextmanager
def output_dir_of(trainer, output_dir: Path) -> Iterator[Path]:
    """The run's output directory on rank 0; a scratch directory, removed afterwards, on the others (every rank
    computes the same tables and figures, only rank 0 keeps them)."""
    if trainer.is_global_zero:
        output_dir.mkdir(parents=True, exist_ok=True)
        yield output_dir
        return
    scratch = Path(tempfile.mkdtemp(prefix=f"rank{trainer.global_rank}-"))
    try:
        yield scratch
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def whole_split_loader(loader, world_size: int):
    """``loader`` as every rank's loader of the whole split, in order, under DDP (one process: ``loader`` itself).

    Lightning leaves a loader whose sampler is already a ``DistributedSampler`` alone, so one over a single replica
    (rank 0 of 1: every index once, in order, no padding) gives each rank the same batches as one process sees: a
    metric computed from them (a validation loss that picks the checkpoint) is the one-process value on every rank,
    with no collective and no sample counted twice."""
    if world_size <= 1:
        return loader
    from torch.utils.data import DataLoader
    from torch.utils.data.distributed import DistributedSampler

    sampler = DistributedSampler(loader.dataset, num_replicas=1, rank=0, shuffle=False)
    return DataLoader(loader.dataset, batch_size=loader.batch_size, sampler=sampler, num_workers=loader.num_workers,
                      collate_fn=loader.collate_fn, pin_memory=loader.pin_memory)
