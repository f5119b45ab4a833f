"""The few collectives the suite uses under DDP, in one place (data, LightningModules and pipelines share them).

Every function is a no-op on one process (no process group), so single-process runs take the same code paths.
Each collective must be called by every rank at the same point: callers keep their decisions identical on all
ranks. Imports only numpy and torch (a core module).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader


def rank_aware(pipeline):
    """Mark a pipeline (``engine/<method>/...run``) as written for N DDP processes: sharded stages, one writer per
    output. The runner refuses any other pipeline under DDP before any work."""
    pipeline.rank_aware = True
    return pipeline


def is_rank_aware(pipeline) -> bool:
    """Whether ``pipeline`` (a function, or a ``functools.partial`` of one) was marked with :func:`rank_aware`."""
    return bool(getattr(getattr(pipeline, "func", pipeline), "rank_aware", False))


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the number of processes) of the initialised process group, else (0, 1)."""
    return (dist.get_rank(), dist.get_world_size()) if initialized() else (0, 1)


def gather_objects(obj) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank."""
    if not initialized():
        return [obj]
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, obj)
    return parts


def gather_dicts(local: dict) -> dict:
    """Every rank's ``{key: value}`` merged, on every rank (keys a rank repeats, e.g. DistributedSampler's padding,
    count once)."""
    return {k: v for part in gather_objects(local) for k, v in part.items()}


def _collective_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def any_rank(flag: bool) -> bool:
    """``flag`` of any rank (one ``all_reduce``): for a decision every rank must take alike."""
    if rank_and_world()[1] == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def average_over_ranks(grads: tuple[torch.Tensor | None, ...]) -> tuple[torch.Tensor | None, ...]:
    """Tensors (e.g. gradients from ``torch.autograd.grad``, which DDP's reducer never sees) averaged over the ranks
    with one ``all_reduce`` of them flattened. Which entries are None must be the same on every rank."""
    world = rank_and_world()[1]
    present = [g for g in grads if g is not None]
    if world == 1 or not present:
        return grads
    flat = torch.cat([g.reshape(-1) for g in present])
    dist.all_reduce(flat)
    flat /= world
    out, offset = [], 0
    for g in grads:
        if g is None:
            out.append(None)
            continue
        out.append(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()
    return tuple(out)


def map_shards(jobs: list, fn) -> list:
    """``[fn(job) for job in jobs]`` with job ``i`` run on rank ``i % W`` (the jobs one process would run, so the
    same results) and every result returned to every rank, in order."""
    rank, world = rank_and_world()
    local = {i: fn(job) for i, job in enumerate(jobs) if i % world == rank}
    parts = gather_dicts(local) if world > 1 else local
    return [parts[i] for i in range(len(jobs))]


# -- what a pipeline needs on N processes ----------------------------------------------------------------
# What a pipeline needs to run on N DDP processes: rows gathered back into dataset order, decisions agreed by
# every rank (so that each rank makes the same trainer calls), and one writer per output.
# 
# Lightning predicts with an unpadded sampler (``UnrepeatedDistributedSampler``): rank ``r`` of ``W`` gets rows
# ``r, r + W, r + 2W, ...`` of a dataset in order, and no row twice, so the gathered rows are exactly one pass.


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


def distributed(trainer) -> bool:
    return trainer.world_size > 1 and initialized()


def sum_over_ranks(trainer, values: dict) -> dict:
    """``values`` summed key by key over the ranks (CPU seconds of a stage)."""
    if not distributed(trainer):
        return dict(values)
    out: dict = {}
    for part in gather_objects(dict(values)):
        for k, v in part.items():
            out[k] = out.get(k, 0) + v
    return out


def sharded_map_on(trainer, model, n: int, job: Callable[[int], Any], desc: str = "") -> list:
    """``[job(i) for i in range(n)]`` (a ``desc`` bar when the trainer shows bars); under DDP a ``trainer.predict`` over the indices (the same call on every rank;
    rank r takes r, r + W, ... through Lightning's unpadded sampler), the answers gathered on every rank. ``model``
    has a ``predict_job`` attribute and a ``predict_step`` that calls it on each index (R-CNN's modules), and a
    ``stats`` dict that records how many images each rank took."""
    if trainer.world_size <= 1:
        from transferrable.core.progress import progress, trainer_bars

        return [job(i) for i in progress(range(n), desc, enabled=bool(desc) and trainer_bars(trainer), unit="img")]
    model.predict_job = job  # Lightning's predict bar shows the progress
    try:
        batches = trainer.predict(model, dataloaders=DataLoader(list(range(n)), batch_size=1, shuffle=False),
                                  return_predictions=True) or []
    finally:
        model.predict_job = None
    merged: dict[int, Any] = {}
    parts = gather_objects({i: v for batch in batches for i, v in batch})
    for part in parts:
        merged.update(part)
    model.stats["images_by_rank"] = [len(p) for p in parts]  # the last sharded call's split of the images
    if sorted(merged) != list(range(n)):
        raise RuntimeError(f"the ranks answered {len(merged)} of {n} images (limit_predict_batches set?)")
    return [merged[i] for i in range(n)]
