"""``memory``: peak resident memory of R-CNN's SVM training with hard-negative mining over a pool5 feature
cache larger than the miner's in-memory budget, at two cache sizes (the second twice the first): bounded
memory means the same peak.

Each size runs in its own subprocess (``python -m bench.memory --worker ...``), so one size's pages and
allocator arenas cannot inflate the other's peak; the worker reports its peak RSS (``VmHWM`` in /proc/self/status, file-backed
pages included; not ``ru_maxrss``, which Linux carries over from the forking parent across exec) and its RSS
right after the imports and set-up (``VmRSS``).

What runs is ``task=rcnn``'s own SVM stage: the pool5 cache is a float16 ``np.memmap`` (the task's
``feature_dtype``) of N images x 200 regions (2 ground-truth boxes first, as ``ImageSet`` lays them out),
read through ``ChunkedRows`` with fc7 computed per chunk by ``RCNNModule.from_pool5`` (the task's default
``layers: [fc7]``), and ``engine.rcnn.svms.train_svms`` (positives, negatives by ``class_max_iou`` < 0.3,
``HardNegativeMiner``). Backbone ``caffenet_mini`` (pool5 1024-d, fc7 512-d, random weights), 5 classes; the
miner's budget is ``max_cache`` negatives per class.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from bench import ROOT
from bench.registry import Context, Figure, Stats, Target, benchmark

REGIONS, GT_PER_IMAGE, CLASSES, POOL5_DIM = 200, 2, 5, 1024
IMAGE_W, IMAGE_H = 160, 120
SVM = {"C": 1e-3, "bias_multiplier": 10.0, "pos_weight": 2.0, "neg_threshold": 0.3, "hard_threshold": -1.0001,
       "easy_threshold": -1.2, "retrain_limit": 2000, "max_cache": 4000, "feature_norm": 20.0, "max_iter": 2000}


def _scene(images: int, seed: int = 0) -> tuple[list[dict], list[np.ndarray]]:
    """Ground truth and proposals of ``images`` 160x120 images: 2 boxes each, 198 proposals around them."""
    rng = np.random.default_rng(seed)
    items, proposals = [], []
    tiny = np.zeros((1, 1, 3), np.uint8)  # train_svms never looks at pixels
    for i in range(images):
        xy = rng.uniform([0, 0], [IMAGE_W - 40, IMAGE_H - 40], (GT_PER_IMAGE, 2))
        wh = rng.uniform(20, 40, (GT_PER_IMAGE, 2))
        gt = np.concatenate([xy, xy + wh], 1).astype(np.float32)
        items.append({"image_id": f"{i:06d}", "image": tiny, "boxes": gt, "difficult": np.zeros(GT_PER_IMAGE, bool),
                      "labels": rng.integers(0, CLASSES, GT_PER_IMAGE)})
        n = REGIONS - GT_PER_IMAGE
        c = rng.uniform([0, 0], [IMAGE_W, IMAGE_H], (n, 2))
        half = rng.uniform(5, 30, (n, 2))
        proposals.append(np.clip(np.concatenate([c - half, c + half], 1), 0, [IMAGE_W, IMAGE_H, IMAGE_W, IMAGE_H])
                         .astype(np.float32))
    return items, proposals


def write_cache(path: Path, images: int, seed: int = 0, chunk_images: int = 256) -> int:
    """A float16 pool5 memmap for ``_scene(images)``: post-ReLU noise, ground-truth rows plus a class pattern.
    Written chunk by chunk (never whole in memory). Returns its size in bytes."""
    rng = np.random.default_rng(seed)
    items, _ = _scene(images, seed)
    patterns = np.maximum(rng.standard_normal((CLASSES, POOL5_DIM)), 0) * 3
    out = np.memmap(path, dtype=np.float16, mode="w+", shape=(images * REGIONS, POOL5_DIM))
    for s in range(0, images, chunk_images):
        e = min(images, s + chunk_images)
        x = np.maximum(rng.standard_normal(((e - s) * REGIONS, POOL5_DIM), dtype=np.float32), 0)
        for k, it in enumerate(items[s:e]):
            x[k * REGIONS: k * REGIONS + GT_PER_IMAGE] += patterns[it["labels"]]
        out[s * REGIONS: e * REGIONS] = x
    out.flush()
    del out
    return path.stat().st_size


def _status_mib(field: str) -> float:
    """A memory line of /proc/self/status (``VmRSS``: now, ``VmHWM``: the peak) in MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/self/status has no {field} line")


def _worker(path: str, images: int) -> dict:
    """Runs in its own process: train_svms over the memmap, reports peak and set-up RSS (MiB)."""
    from functools import partial

    import torch
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from bench.suite import CONF_DIR
    from engine.rcnn.svms import train_svms
    from lightning_modules.rcnn import RCNNModule
    from models.rcnn.feature_rows import ChunkedRows
    from models.rcnn.svm import norm_scale
    from models.rcnn.windows import ImageSet

    torch.set_num_threads(max(1, torch.get_num_threads()))
    cfg = OmegaConf.load(CONF_DIR / "backbone" / "caffenet_mini.yaml")
    cfg.weights = None
    torch.manual_seed(0)
    module = RCNNModule(instantiate(cfg), CLASSES, svm=SVM, cache=False).eval()
    items, proposals = _scene(images)
    data = ImageSet("train", items, proposals, True)
    pool5 = np.memmap(path, dtype=np.float16, mode="r", shape=(data.num_regions, POOL5_DIM))
    setup = _status_mib("VmRSS")
    feats = ChunkedRows(pool5, partial(module.from_pool5, layer="fc7"))
    scale = norm_scale(feats[: min(len(feats), 20000)], SVM["feature_norm"])
    miner = train_svms(module, data, feats, scale)
    # VmHWM, not getrusage's ru_maxrss: Linux carries ru_maxrss across exec, so a worker forked from a big
    # parent would report the parent's resident set as its own peak
    peak = _status_mib("VmHWM")
    return {"peak_mib": peak, "setup_mib": setup, "summary": miner.summary(), "rows": int(data.num_regions)}


def measure(path: Path, images: int) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = subprocess.run([sys.executable, "-m", "bench.memory", "--worker", str(path), str(images)], cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        tail = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        raise RuntimeError(f"memory worker ({images} images) failed: {tail[0]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


@benchmark("memory")
def memory(ctx: Context) -> list[Figure]:
    images = 40 if ctx.quick else 300  # x 200 regions x 1024 x 2 B: 16 MiB / 117 MiB, then twice that
    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        runs = {}
        for n in (images, 2 * images):
            path = Path(tmp) / f"pool5-{n}.dat"
            size = write_cache(path, n)
            runs[n] = {**measure(path, n), "cache_mib": size / 2**20}
            path.unlink()
            r = runs[n]
            ctx.log(f"{n} images, cache {r['cache_mib']:.0f} MiB: peak RSS {r['peak_mib']:.0f} MiB "
                    f"(after set-up {r['setup_mib']:.0f}); miner {r['summary']}")
    small, big = runs[images], runs[2 * images]
    budget = CLASSES * SVM["max_cache"] * 512 * 4 / 2**20
    grew = big["peak_mib"] - big["setup_mib"]
    return [
        Figure(f"R-CNN SVM training peak RSS, {big['cache_mib']:.0f} MiB pool5 cache ({2 * images} images)",
               Stats([big["peak_mib"]]), "MiB", reference=Stats([small["peak_mib"]]),
               reference_name=f"same, {small['cache_mib']:.0f} MiB cache ({images} images)",
               target=Target("<=", 1.1),
               note=f"each size in its own process; miner budget {budget:.0f} MiB of negatives "
                    f"(5 classes x max_cache {SVM['max_cache']} x fc7 512-d)"),
        Figure(f"R-CNN SVM training RSS held by the pass (peak - set-up), {big['cache_mib']:.0f} MiB cache",
               Stats([grew]), "MiB", reference=Stats([small["peak_mib"] - small["setup_mib"]]),
               reference_name=f"same, {small['cache_mib']:.0f} MiB cache", target=Target("<=", 1.1),
               note=f"without the ~{big['setup_mib']:.0f} MiB of imports and set-up; the cache file itself is "
                    f"{big['cache_mib']:.0f} MiB"),
    ]


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m bench.memory")
    p.add_argument("--worker", nargs=2, metavar=("CACHE", "IMAGES"), required=True)
    a = p.parse_args()
    print(json.dumps(_worker(a.worker[0], int(a.worker[1]))))
