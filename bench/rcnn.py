"""``rcnn``: R-CNN test-time cost per image, split into proposals / warping / CNN / scoring+NMS, for both
feature modes (``warp``: every proposal warped and run through conv1..pool5; ``roi_pool``: conv1..conv5 once
per image, pool5 of every proposal pooled from the shared map), and the region throughput of each mode
(warping + CNN up to pool5) against the bare backbone forward over the same regions, already warped --
all in one run. ``--quick``: one image, 60 proposals from selective search at 160 px.

``rcnn_archs``: the per-image feature cost (warping + CNN to pool5, the part the backbone changes) of
``experiment=rcnn_archs``'s two backbones -- AlexNet and VGG16(-BN), both at 64 px with a 2x2 pool5 grid, random
weights -- on the same images and proposals, interleaved in one run: VGG16's seconds per image against AlexNet's.

* **stages**: exactly ``task=rcnn``'s test path: ``ProposalCache.compute`` (selective search, the task's
  defaults: fast mode at 240 px, at most 500 boxes), ``RCNNModule.image_pool5`` (which times its warping and
  CNN parts), fc7 from pool5 + linear scores for the 10 classes (the SVMs' ``X @ W.T + b``) + per-class NMS
  and the top 100 (``models.rcnn.detection.detect_boxes``).
* **bare forward**: ``backbone.forward_taps(x, "pool5")`` on pre-warped region batches of the same size
  (``feature_batch``), same memory format and autocast: pure CNN compute, the best a warp pipeline can do.

Shape: ``caffenet_mini`` at 32 px (random weights: weights do not change the speed), 160x120 crops of the
scikit-image photos (the scenes' image size), regions per image as selective search returns them.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from bench.registry import Context, Figure, Stats, benchmark
from bench.suite import CONF_DIR, quiet

IMAGE_SIZE = (160, 120)
STAGES = ("proposals", "warp", "cnn", "scoring_nms")
MEAN, STD = (0.286,) * 3, (0.353,) * 3


def _images(n: int) -> list[np.ndarray]:
    import cv2
    from skimage import data

    photos = [data.astronaut(), data.coffee(), data.chelsea(), data.rocket()]
    out = []
    for i in range(n):
        p = photos[i % len(photos)]
        h, w = p.shape[:2]
        x0, y0 = (i * 37) % max(1, w - h), 0
        crop = np.ascontiguousarray(p[y0:y0 + h, x0:x0 + int(h * 4 / 3)])
        out.append(cv2.resize(crop, IMAGE_SIZE, interpolation=cv2.INTER_AREA))
    return out


def _module(mode: str, max_proposals: int, width: int | None = None, backbone_cfg=None):
    from lightning_modules.rcnn import RCNNModule

    cfg = backbone_cfg if backbone_cfg is not None else OmegaConf.load(CONF_DIR / "backbone" / "caffenet_mini.yaml")
    cfg.weights = None
    torch.manual_seed(0)
    proposals = {"max_proposals": max_proposals, **({"width": width} if width else {})}
    # every other rcnn.* value is conf/task/rcnn.yaml's (the module reads it); proposals are merged into its node
    return RCNNModule(instantiate(cfg), 10, proposals=proposals, feature_mode=mode, cache=False).eval()


def _one_pass(module, images, svm_w, svm_b) -> dict[str, float]:
    """Seconds per image of each stage over ``images`` (test path of ``task=rcnn``), and regions per image."""
    from models.rcnn.detection import detect_boxes
    from models.rcnn.proposals import ProposalCache

    cache = ProposalCache(None, **module.cfg["proposals"])
    module.timing.clear()
    t_prop = t_score = 0.0
    regions = 0
    for img in images:
        t = time.perf_counter()
        boxes = cache.compute(img)
        t_prop += time.perf_counter() - t
        pool5 = module.image_pool5(img, boxes, MEAN, STD)
        t = time.perf_counter()
        scores = module.from_pool5(pool5, "fc7") @ svm_w.T + svm_b
        detect_boxes(boxes, scores, None, img.shape[1::-1], module.cfg["nms_threshold"], module.cfg["max_per_image"])
        t_score += time.perf_counter() - t
        regions += len(boxes)
    n = len(images)
    return {"proposals": t_prop / n, "warp": module.timing["warp"] / n, "cnn": module.timing["cnn"] / n,
            "scoring_nms": t_score / n, "regions": regions / n}


@benchmark("rcnn")
def rcnn(ctx: Context) -> list[Figure]:
    from models.rcnn.proposals import ProposalCache
    from models.rcnn.regions import image_tensor, warp_regions

    n_images, max_proposals, width = (1, 60, 160) if ctx.quick else (8, 500, None)
    images = _images(n_images)
    torch.set_grad_enabled(False)
    figures = []
    with quiet():
        modules = {mode: _module(mode, max_proposals, width) for mode in ("warp", "roi_pool")}
        warp_mod = modules["warp"]
        rng = np.random.default_rng(0)
        svm_w = rng.normal(size=(10, warp_mod.backbone.feature_dim("fc7"))).astype(np.float32)
        svm_b = np.zeros(10, np.float32)
        # the bare forward's input: every image's proposals, warped once beforehand, in feature_batch chunks
        cache = ProposalCache(None, **warp_mod.cfg["proposals"])
        warped = torch.cat([warp_regions(image_tensor(img, MEAN, STD), cache.compute(img), warp_mod.size,
                                         warp_mod.pad) for img in images])
        bs = int(warp_mod.cfg["feature_batch"])
        chunks = [warped[s:s + bs].contiguous(memory_format=torch.channels_last) for s in range(0, len(warped), bs)]
        backbone = warp_mod.backbone

        def bare() -> float:
            t = time.perf_counter()
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
                for x in chunks:
                    backbone.forward_taps(x, "pool5")
            return len(warped) / (time.perf_counter() - t)

        splits: dict[str, list[dict]] = {m: [] for m in modules}

        def path(mode: str):
            def run() -> float:
                s = _one_pass(modules[mode], images, svm_w, svm_b)
                splits[mode].append(s)
                return s["regions"] / (s["warp"] + s["cnn"])  # regions/s of the feature stage
            return run

        runs = {"warp": path("warp"), "roi_pool": path("roi_pool"), "bare": bare}
        for run in runs.values():  # warm-up: oneDNN kernels, selective search's first call
            run()
        for m in splits:
            splits[m].clear()
        from bench.timing import interleave

        rates = interleave(runs, ctx.repeats)
    torch.set_grad_enabled(True)
    ref = Stats(rates["bare"])
    for mode in ("warp", "roi_pool"):
        per = {k: Stats([s[k] for s in splits[mode]]) for k in (*STAGES, "regions")}
        total = Stats([sum(s[k] for k in STAGES) for s in splits[mode]])
        ctx.log(f"{mode}: " + ", ".join(f"{k} {per[k].median * 1e3:.1f} ms" for k in STAGES)
                + f" = {total.median:.3f} s/img, {per['regions'].median:.0f} regions/img; "
                f"{Stats(rates[mode]).median:.0f} regions/s vs bare forward {ref.median:.0f}")
        for k in STAGES:
            if per[k].median == 0:  # roi_pool has no warping stage (its image tensor counts as CNN)
                continue
            figures.append(Figure(f"R-CNN {mode} per-image {k}", per[k], "s/img",
                                  note=f"{per['regions'].median:.0f} regions/img, caffenet_mini 32 px, 160x120"))
        figures.append(Figure(f"R-CNN {mode} per-image total", total, "s/img",
                              note="proposals + warping + CNN + scoring/NMS"))
        figures.append(Figure(
            f"R-CNN {mode} region throughput (warping + CNN to pool5)", Stats(rates[mode]), "regions/s",
            reference=ref, reference_name="bare forward_taps(pool5) over the same regions, pre-warped, same batches",
            note="warp: < 1 by the warping cost; roi_pool: > 1 when one conv map per image beats a forward per region"))
    return figures


ARCHS = ("alexnet", "vgg16")


@benchmark("rcnn_archs")
def rcnn_archs(ctx: Context) -> list[Figure]:
    from models.rcnn.proposals import ProposalCache
    from transferrable.run.nested_run import compose_train_config

    n_images, max_proposals = (1, 20) if ctx.quick else (4, 200)
    images = _images(n_images)
    torch.set_grad_enabled(False)
    with quiet():
        # the experiment's own backbone configs (its 64 px, 2x2 pool5; VGG16-BN from conf/task_backbone)
        cfgs = {a: compose_train_config(["experiment=rcnn_archs", f"backbone={a}"]).backbone for a in ARCHS}
        modules = {a: _module("warp", max_proposals, backbone_cfg=cfgs[a]) for a in ARCHS}
        cache = ProposalCache(None, **modules[ARCHS[0]].cfg["proposals"])
        boxes = [cache.compute(img) for img in images]

        def per_image(arch: str):
            module = modules[arch]

            def run() -> float:
                module.timing.clear()
                for img, b in zip(images, boxes, strict=True):
                    module.image_pool5(img, b, MEAN, STD)
                return (module.timing["warp"] + module.timing["cnn"]) / len(images)
            return run

        runs = {a: per_image(a) for a in ARCHS}
        for run in runs.values():  # warm-up
            run()
        from bench.timing import interleave

        secs = interleave(runs, ctx.repeats)
    torch.set_grad_enabled(True)
    regions = float(np.mean([len(b) for b in boxes]))
    ref = Stats(secs["alexnet"])
    ctx.log(", ".join(f"{a} {Stats(secs[a]).median:.3f} s/img" for a in ARCHS) + f" ({regions:.0f} regions/img)")
    return [Figure(f"R-CNN {a} 64 px per-image warping + CNN", Stats(secs[a]), "s/img",
                   reference=ref if a != "alexnet" else None,
                   reference_name="AlexNet on the same images and proposals" if a != "alexnet" else None,
                   note=f"{regions:.0f} regions/img, pool5 2x2, experiment=rcnn_archs's configs") for a in ARCHS]
