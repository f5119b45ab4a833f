"""Region features for R-CNN region segmentation (thesis 3.2): *full* (the warped context-padded box) and *fg*
(background replaced by the mean), fc6 and fc7, every variant in one pass, cached in ``${paths.cache_dir}/features``
(weights hash, segments, geometry, ids); under DDP each rank writes its images' rows, rank 0 saves the entries.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from lightning_modules.rcnn_segmentation import RCNNSegmentationModule
from models.rcnn.feature_rows import RegionIndex
from transferrable.core.artifact_cache import digest
from transferrable.core.distributed import gather_objects, sharded_map_on
from transferrable.core.feature_cache import FeatureCache
from transferrable.core.progress import progress, trainer_bars

CACHE_VERSION = 1


class SegSplit(RegionIndex):
    """One split in memory: ground truth, packed region masks, boxes, row offsets into the feature arrays."""

    def __init__(self, name: str, items: list[dict], regions: list[tuple[np.ndarray, np.ndarray]]):
        self.name = name
        self.ids = [it["image_id"] for it in items]
        self.images = [it["image"] for it in items]
        self.gt = [it["mask"] for it in items]
        self.instances = [it.get("instances") for it in items]
        self.shapes = [m.shape for m in self.gt]
        self.packed = [np.packbits(m.ravel()) for m, _ in regions]  # region masks, bit-packed (memory)
        self.counts = [len(m) for m, _ in regions]
        self.boxes = [b for _, b in regions]
        self.offsets = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)

    def masks(self, i: int) -> np.ndarray:
        h, w = self.shapes[i]
        n = self.counts[i]
        return np.unpackbits(self.packed[i], count=n * h * w).reshape(n, h, w).astype(bool)


def split_features(model: RCNNSegmentationModule, data: SegSplit, mean, std, cache: FeatureCache, weights: str,
                   segment_tag: str, timing: dict, trainer=None) -> dict[tuple[str, str], np.ndarray]:
    """Features of every region of ``data`` for the base kinds (full, fg) the variants need, float16,
    cached per (kind, layer)."""
    if trainer is not None and trainer.world_size > 1:
        return split_features_sharded(trainer, model, data, mean, std, cache, weights, segment_tag, timing)
    base = base_kinds(model)
    keys = feature_keys(model, data, base, weights, segment_tag)
    out = {k: cache.load(f"rcnnseg-{data.name}-{k[0]}-{k[1]}", key) for k, key in keys.items()}
    if all(v is not None for v in out.values()):
        model.stats[f"feature_cache_{data.name}"] = "hit"
        return out
    model.stats[f"feature_cache_{data.name}"] = "miss"
    arrays = {k: np.zeros((data.num_regions, model.backbone.feature_dim(k[1])), np.float16) for k in keys}
    model.backbone.eval()
    t = time.perf_counter()
    for i in progress(range(len(data)), f"rcnn_segmentation: features ({data.name})", unit="img",
                      enabled=trainer is not None and trainer_bars(trainer)):
        feats = model.image_features(data.images[i], data.masks(i), data.boxes[i], mean, std, base)
        for k in keys:
            arrays[k][data.rows(i)] = feats[k]
    timing[f"features_{data.name}"] = time.perf_counter() - t
    for k, key in keys.items():
        cache.save(f"rcnnseg-{data.name}-{k[0]}-{k[1]}", key, arrays[k])
    return arrays


def base_kinds(model: RCNNSegmentationModule) -> list[str]:
    return sorted({k for kind in model.kinds for k in kind.split("+")})


def feature_keys(model: RCNNSegmentationModule, data: SegSplit, base: list[str], weights: str,
                 segment_tag: str) -> dict[tuple[str, str], dict]:
    return {(k, layer): {"version": CACHE_VERSION, "weights": weights, "kind": k, "layer": layer,
                         "segments": segment_tag, "size": model.size, "pad": model.pad,
                         "ids": digest("\n".join(data.ids)),
                         "regions": data.num_regions, "bf16": model.use_bf16}
            for k in base for layer in model.layers}


def split_features_sharded(trainer, model: RCNNSegmentationModule, data: SegSplit, mean, std, cache: FeatureCache,
                           weights: str, segment_tag: str, timing: dict) -> dict[tuple[str, str], np.ndarray]:
    """:func:`split_features` on N DDP processes: the same cache entries, the images sharded by rank.

    Rank 0 makes one scratch memmap per (kind, layer) under the cache root; after a barrier every rank writes its
    images' rows into them (``sharded_map_on``) and flushes; after a second barrier every rank reads the complete
    rows and rank 0 alone saves the cache entries; after a third rank 0 removes the scratch files."""
    import torch.distributed as dist

    base = base_kinds(model)
    keys = feature_keys(model, data, base, weights, segment_tag)
    out = {k: cache.load(f"rcnnseg-{data.name}-{k[0]}-{k[1]}", key) for k, key in keys.items()}
    if all(gather_objects(all(v is not None for v in out.values()))):  # the segments' trainer.predict opened the group
        model.stats[f"feature_cache_{data.name}"] = "hit"
        return out
    model.stats[f"feature_cache_{data.name}"] = "miss"
    shapes = {k: (data.num_regions, model.backbone.feature_dim(k[1])) for k in keys}
    scratch = None
    if trainer.is_global_zero:
        cache.root.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".rcnnseg-{data.name}-", dir=cache.root))
        for n, k in enumerate(keys):
            np.memmap(scratch / f"{n}.dat", dtype=np.float16, mode="w+", shape=shapes[k]).flush()
    scratch = Path(gather_objects(None if scratch is None else str(scratch))[0])  # a barrier: the files exist
    arrays = {k: np.memmap(scratch / f"{n}.dat", dtype=np.float16, mode="r+", shape=shapes[k])
              for n, k in enumerate(keys)}
    model.backbone.eval()
    t = time.perf_counter()

    def write(i: int) -> None:
        feats = model.image_features(data.images[i], data.masks(i), data.boxes[i], mean, std, base)
        for k in keys:
            arrays[k][data.rows(i)] = feats[k]

    sharded_map_on(trainer, model, len(data), write)
    model.stats[f"feature_images_by_rank_{data.name}"] = model.stats.get("images_by_rank")
    for a in arrays.values():
        a.flush()
    timing[f"features_{data.name}"] = time.perf_counter() - t  # this rank's share
    dist.barrier()  # every rank's rows are on disk
    arrays = {k: np.array(a) for k, a in arrays.items()}  # the complete rows, in memory as one process holds them
    if trainer.is_global_zero:
        for k, key in keys.items():
            cache.save(f"rcnnseg-{data.name}-{k[0]}-{k[1]}", key, arrays[k])
    dist.barrier()  # every rank has read the scratch files
    if trainer.is_global_zero:
        shutil.rmtree(scratch, ignore_errors=True)
    return arrays


def variant_matrix(feats: dict, kind: str, layer: str) -> np.ndarray:
    return np.concatenate([np.asarray(feats[(k, layer)], np.float32) for k in kind.split("+")], 1)
