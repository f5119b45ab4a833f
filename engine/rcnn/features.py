"""R-CNN region features: pool5 of every region written once to a memory-mapped ``ArtifactCache`` entry that
resumes after a kill (one writer under DDP); fc6/fc7 are computed from it, as the original did.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np

from engine.rcnn.cache_keys import CACHE_VERSION, feature_key
from engine.rcnn.state import RCNNRun, sharded_map
from lightning_modules.rcnn import RCNNModule
from models.rcnn.windows import ImageSet
from transferrable.core.artifact_cache import ArtifactCache
from transferrable.core.distributed import gather_objects
from transferrable.core.progress import progress, trainer_bars

log = logging.getLogger(__name__)


def feature_stage(r: RCNNRun, svm_data: ImageSet, test: ImageSet, info: dict) -> tuple[np.ndarray, np.ndarray]:
    model = r.model
    feat_dir = None if r.cache_root is None else r.cache_root / "rcnn_features"
    kw = {"weights": r.digest, "proposals": r.proposals.tag}
    t = time.perf_counter()
    log.info("rcnn: pool5 of %d train and %d test regions (%s)", svm_data.num_regions, test.num_regions,
             model.cfg["feature_mode"])
    extract = (partial(pool5_features_sharded, r) if r.trainer.world_size > 1
               else partial(pool5_features, model, bars=trainer_bars(r.trainer)))
    pool5_train = extract(svm_data, r.mean, r.std, feat_dir, **kw)
    info["train_feature_seconds"] = time.perf_counter() - t  # wall seconds (under DDP: of the sharded extraction)
    info["pool5_regions"] = {"train": int(svm_data.num_regions), "test": int(test.num_regions)}
    test_timing_before = dict(model.timing)
    pool5_test = extract(test, r.mean, r.std, feat_dir, **kw)
    if model.stats.get("feature_cache_test") == "hit":
        model.timing.clear()
        model.timing.update(test_timing_before)
    return pool5_train, pool5_test


def pool5_features(model: RCNNModule, data: ImageSet, mean, std, cache_dir: Path | None, *, weights: str,
                   proposals: str, bars: bool = False) -> np.ndarray:
    """pool5 of every region of ``data`` as a (read-only) np.memmap, computed once per key (:func:`feature_key`).

    An ``ArtifactCache`` memmap entry under ``cache_dir``: ``pool5-<split>-<hash16>.dat`` (rows, ``feature_dtype``)
    and its manifest ``.json`` (version, key, key hash, shape, dtype, bytes; written last). A manifest that does not
    parse, names another key or shape, or a ``.dat`` of another size (truncated) is reported with a
    ``CacheWarning`` and rebuilt. While it is being built the rows go to ``.pool5-<split>-<hash16>.partial`` with a
    progress file saying how many images are on disk (flushed before it is written): a run killed mid-extraction
    resumes from there. ``bars``: a progress bar over the images (:mod:`transferrable.core.progress`).
    """
    key = feature_key(model, data, weights, proposals)
    dtype = np.dtype(model.cfg["feature_dtype"])
    shape = (data.num_regions, model.pool5_dim)
    model.stats[f"pool5_images_computed_{data.name}"] = 0
    if cache_dir is None:
        arr = np.zeros(shape, dtype)
        model.stats[f"feature_cache_{data.name}"] = "miss"
        _extract_pool5(model, data, mean, std, arr, 0, bars=bars)
        return arr
    cache = ArtifactCache(cache_dir, version=CACHE_VERSION, what="pool5 cache", checksum=False, record_key=True,
                          manifest_name="{stem}.json")
    path = cache.path_for(key, prefix=f"pool5-{data.name}-", suffix=".dat")
    rows = cache.open_memmap(path, key, shape, dtype)
    if rows is not None:
        model.stats[f"feature_cache_{data.name}"] = "hit"
        return rows
    with cache.memmap_writer(path, key, shape, dtype) as w:
        if w.start:
            log.info("rcnn: pool5 of %s resumes at image %d of %d (%s)", data.name, w.start, len(data), w.partial)
        model.stats[f"feature_cache_{data.name}"] = "resumed" if w.start else "miss"
        _extract_pool5(model, data, mean, std, w.array, w.start, w.checkpoint, bars=bars)
    return w.result


def pool5_features_sharded(r: RCNNRun, data: ImageSet, mean, std, cache_dir: Path | None, *, weights: str,
                           proposals: str) -> np.ndarray:
    """:func:`pool5_features` on N DDP processes: the same entry, its images sharded by rank (:func:`sharded_map`).

    Rank 0 opens the ``memmap_writer`` (resuming where a killed one-process build stopped); after a barrier every
    rank writes its images' rows into that partial file, flushes, and after a second barrier rank 0 alone commits it
    (rename + manifest); after a third every rank opens the committed entry read-only. Without a cache directory the
    rows are gathered instead."""
    model, trainer = r.model, r.trainer
    key = feature_key(model, data, weights, proposals)
    dtype = np.dtype(model.cfg["feature_dtype"])
    shape = (data.num_regions, model.pool5_dim)
    model.stats[f"pool5_images_computed_{data.name}"] = 0
    if cache_dir is None:
        model.stats[f"feature_cache_{data.name}"] = "miss"
        parts = sharded_map(r, len(data), lambda i: model.image_pool5(data.images[i], data.boxes[i], mean, std))
        arr = np.zeros(shape, dtype)
        for i, rows in enumerate(parts):
            arr[data.rows(i)] = rows
        model.stats[f"pool5_images_computed_{data.name}"] = len(data)
        return arr
    import torch.distributed as dist

    cache = ArtifactCache(cache_dir, version=CACHE_VERSION, what="pool5 cache", checksum=False, record_key=True,
                          manifest_name="{stem}.json")
    path = cache.path_for(key, prefix=f"pool5-{data.name}-", suffix=".dat")
    rows = cache.open_memmap(path, key, shape, dtype)
    hits = gather_objects(rows is not None)  # the proposals' trainer.predict opened the process group
    if all(hits):
        model.stats[f"feature_cache_{data.name}"] = "hit"
        return rows
    del rows
    writer = cache.memmap_writer(path, key, shape, dtype) if trainer.is_global_zero else contextlib.nullcontext()
    with writer as w:
        start = gather_objects(w.start if w is not None else None)[0]  # after rank 0 made the partial file
        if start:
            log.info("rcnn: pool5 of %s resumes at image %d of %d", data.name, start, len(data))
        model.stats[f"feature_cache_{data.name}"] = "resumed" if start else "miss"
        arr = w.array if w is not None else np.memmap(path.with_name(f".{path.stem}.partial"), dtype=dtype,
                                                      mode="r+", shape=shape)

        def write(i: int) -> None:
            i += start
            arr[data.rows(i)] = model.image_pool5(data.images[i], data.boxes[i], mean, std)

        model.eval()
        done = sharded_map(r, len(data) - start, write, f"rcnn: pool5 ({data.name})")  # the predict call opens the process group if none yet
        arr.flush()
        arr = None  # rank 0's writer closes the file when it commits
        model.stats[f"pool5_images_computed_{data.name}"] = len(done)
        model.stats[f"pool5_images_by_rank_{data.name}"] = model.stats["images_by_rank"]
        dist.barrier()  # every rank's rows are in the file before rank 0 commits it
    dist.barrier()  # committed: the entry and its manifest are in place
    rows = w.result if w is not None else cache.open_memmap(path, key, shape, dtype)
    if rows is None:
        raise RuntimeError(f"rcnn: rank {trainer.global_rank} cannot open the pool5 cache {path} rank 0 committed")
    return rows


def _extract_pool5(model: RCNNModule, data: ImageSet, mean, std, arr: np.ndarray, start: int,
                   checkpoint: Callable[[int], None] | None = None, bars: bool = False) -> None:
    model.eval()
    every = max(1, len(data) // 20)  # progress points: a kill loses at most ~5% of the extraction
    for i in progress(range(start, len(data)), f"rcnn: pool5 ({data.name})", total=len(data), initial=start,
                      enabled=bars, unit="img"):
        arr[data.rows(i)] = model.image_pool5(data.images[i], data.boxes[i], mean, std)
        model.stats[f"pool5_images_computed_{data.name}"] += 1
        if checkpoint is not None and ((i + 1) % every == 0) and i + 1 < len(data):
            checkpoint(i + 1)  # the rows reach the file before the progress file says they are there
