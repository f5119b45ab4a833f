"""The few collectives the suite uses under DDP, in one place (data, LightningModules and pipelines share them).

Every function is a no-op on one process (no process group), so single-process runs take the same code paths.
Each collective must be called by every rank at the same point: callers keep their decisions identical on all
ranks. Imports only torch (a core module).
"""

from __future__ import annotations

import torch
import torch.distributed as dist


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
