"""What R-CNN's stages share (``RCNNRun``): the network, trainer and data, where outputs and caches go; the
splits with their proposals (computed through ``trainer.predict`` under DDP: ``sharded_map``).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from omegaconf import DictConfig

from lightning_modules.rcnn import RCNNModule
from models.rcnn.proposals import ProposalCache
from models.rcnn.windows import ImageSet
from transferrable.core.artifact_cache import digest
from transferrable.core.distributed import sharded_map_on
from transferrable.core.precision import inference_bf16
from transferrable.metrics.voc_eval import box_iou


@dataclass
class RCNNRun:
    """What the stages share: the network, the trainer and data, where outputs and caches go."""

    model: RCNNModule
    trainer: Any
    datamodule: Any
    output_dir: Path
    cache_root: Path | None
    seed: Any
    proposals: ProposalCache
    mean: Any = None
    std: Any = None
    digest: str = ""
    class_names: list[str] = field(default_factory=list)

    @property
    def finetune_dir(self) -> Path | None:
        return None if self.cache_root is None else self.cache_root / "rcnn_finetune"


def prepare(cfg: DictConfig, trainer, datamodule, model: RCNNModule) -> RCNNRun:
    rc = model.cfg
    model.use_bf16 = inference_bf16(rc["bf16"], trainer.precision)
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    datamodule.setup("fit")
    cache_dir = cfg.paths.get("cache_dir")
    cache_root = Path(cache_dir) if (rc["cache"] and cache_dir) else None
    root_tag = digest(str(getattr(datamodule, "root", "")), 10)
    pc = ProposalCache(None if cache_root is None else cache_root / "proposals" / root_tag, **rc["proposals"])
    names = list(getattr(datamodule, "class_names", None) or [str(i) for i in range(model.num_classes)])
    return RCNNRun(model, trainer, datamodule, output_dir, cache_root, cfg.get("seed"), pc, datamodule.mean,
                   datamodule.std, class_names=names)


def load_split(r: RCNNRun, split_keys: list[str], limit, with_gt: bool, name: str, timed: bool = False) -> ImageSet:
    """The images of ``split_keys`` (the first ``limit``) with their proposals (seconds in ``timing`` if ``timed``)."""
    items = []
    for key in split_keys:
        ds = r.datamodule.datasets.get(key)
        if ds is None:
            raise ValueError(f"rcnn: the data module has no '{key}' split")
        items += [ds[i] for i in range(len(ds))]
    if limit:
        items = items[: int(limit)]
    def proposals_of(i: int) -> tuple[np.ndarray, float]:
        t = time.perf_counter()
        return r.proposals.get(items[i]["image_id"], items[i]["image"]), time.perf_counter() - t

    done = sharded_map(r, len(items), proposals_of, f"rcnn: proposals ({name})")  # each image's cache file written by the rank computing it
    if timed and r.trainer.is_global_zero:  # every rank holds every image's seconds: counted once
        r.model.timing["proposals"] += sum(t for _, t in done)
    return ImageSet(name, items, [p for p, _ in done], with_gt)


def sharded_map(r: RCNNRun, n: int, job: Callable[[int], Any], desc: str = "") -> list:
    """``[job(i) for i in range(n)]``. Under DDP a ``trainer.predict`` over the indices (the same call on every
    rank; rank r takes r, r + W, ... through Lightning's unpadded sampler), the answers gathered on every rank.
    One process: a ``desc`` bar when the run shows bars."""
    return sharded_map_on(r.trainer, r.model, n, job, desc)



def proposal_recall(test: ImageSet) -> float:
    """Share of the non-difficult test objects that some proposal overlaps with IoU >= 0.5."""
    recall = []
    for p, g in zip(test.proposals, test.gt, strict=True):
        m = ~g["difficult"]
        if m.any():
            recall += list(box_iou(g["boxes"][m], p).max(1) >= 0.5) if len(p) else [False] * int(m.sum())
    return float(np.mean(recall)) if recall else float("nan")
