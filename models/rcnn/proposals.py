"""Category-independent region proposals: OpenCV selective search or sliding windows, cached per image.

``selective_search(image, mode, width)``: the image is resized to a fixed ``width`` first (the original used
500 px for VOC; the generated 160 x 120 scenes default to 320 px in ``conf/task/rcnn.yaml``, i.e. upsampled 2x,
so that the graph segmentation's minimum region size does not swallow small objects), and the boxes are
scaled back to the image. ``mode``: ``fast`` (the thesis's setting), ``quality`` or ``single`` (one strategy,
the cheapest). Boxes are returned as 0-based pixel-edge ``x1, y1, x2, y2`` float32, clipped to the image,
boxes narrower/shorter than ``min_size`` pixels dropped, duplicates removed, in selective search's order
(best first) and capped at ``max_proposals``.

Policy for an image where proposals come back empty (a flat image, or everything filtered): fall back to
``sliding_windows`` of that image (counted as ``empty_fallback`` in ``ProposalCache.stats`` and logged), so
every image is scored; the whole image box is always among those windows.

``ProposalCache``: an ``ArtifactCache`` (``transferrable.core.artifact_cache``) of one ``.npz`` per image under the cache
directory, named by image id + method + the parameters (mode, width, ...); it stores the image size it was computed for. A file whose stored size
differs from the image's (a cache left from another image size with the same ids, e.g. regenerated scenes)
is reported with a warning, counted as ``size_mismatch`` and recomputed; a truncated or damaged file, or one
whose manifest (inside the ``.npz``: version, key hash, each array's shape, dtype and sha256)
does not match, with a ``CacheWarning`` (``corrupt``). Writes are atomic.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np

from transferrable.core.artifact_cache import ABSENT, ArtifactCache, digest

log = logging.getLogger(__name__)

METHODS = ("selective_search", "sliding_window")
SS_MODES = ("fast", "quality", "single")
CACHE_VERSION = 1  # of the entries' manifests


class ProposalError(RuntimeError):
    pass


def clean_boxes(boxes: np.ndarray, width: int, height: int, min_size: float = 2.0,
                max_proposals: int | None = None) -> np.ndarray:
    """Clip to the image, drop boxes under ``min_size`` px in either side, drop exact duplicates (keeping
    the first occurrence, so the order is preserved), cap the count."""
    b = np.asarray(boxes, dtype=np.float32).reshape(-1, 4).copy()
    b[:, [0, 2]] = np.clip(b[:, [0, 2]], 0, width)
    b[:, [1, 3]] = np.clip(b[:, [1, 3]], 0, height)
    keep = ((b[:, 2] - b[:, 0]) >= min_size) & ((b[:, 3] - b[:, 1]) >= min_size)
    b = b[keep]
    if len(b):
        _, first = np.unique(np.round(b, 2), axis=0, return_index=True)
        b = b[np.sort(first)]
    if max_proposals is not None:
        b = b[: int(max_proposals)]
    return b


def _seed_c_rand(seed: int) -> None:
    """OpenCV's selective search ranks its regions with the C library's ``rand()`` (level x random): unseeded, the
    same image gives another box order -- and another top-``max_proposals`` set -- on every call. Seeding it
    before each image makes the proposals a function of the image alone."""
    import ctypes

    ctypes.CDLL(None).srand(ctypes.c_uint(int(seed) & 0xFFFFFFFF))


def selective_search(image: np.ndarray, mode: str = "fast", width: int | None = 500, min_size: float = 2.0,
                     max_proposals: int | None = 2000, threads: int | None = 1, seed: int = 0) -> np.ndarray:
    """Selective search boxes (see the module docstring) for a uint8 H x W x 3 RGB image; ``seed`` seeds the
    randomised ranking (the same image and seed give the same boxes in the same order)."""
    import cv2

    if mode not in SS_MODES:
        raise ValueError(f"selective search mode {mode!r}: expected one of {SS_MODES}")
    if threads is not None:
        cv2.setNumThreads(int(threads))
    h, w = image.shape[:2]
    scale = 1.0 if not width else float(width) / w
    bgr = np.ascontiguousarray(image[:, :, ::-1])
    if scale != 1.0:
        interp = cv2.INTER_AREA if scale < 1 else cv2.INTER_LINEAR
        bgr = cv2.resize(bgr, (int(round(w * scale)), max(1, int(round(h * scale)))), interpolation=interp)
    ss = cv2.ximgproc.segmentation.createSelectiveSearchSegmentation()
    ss.setBaseImage(bgr)
    {"fast": ss.switchToSelectiveSearchFast, "quality": ss.switchToSelectiveSearchQuality,
     "single": ss.switchToSingleStrategy}[mode]()
    _seed_c_rand(seed)
    rects = np.asarray(ss.process(), dtype=np.float32).reshape(-1, 4)  # x, y, w, h in the resized image
    boxes = np.stack([rects[:, 0], rects[:, 1], rects[:, 0] + rects[:, 2], rects[:, 1] + rects[:, 3]], 1)
    sx, sy = bgr.shape[1] / w, bgr.shape[0] / h
    boxes = boxes / np.array([sx, sy, sx, sy], dtype=np.float32)
    return clean_boxes(boxes, w, h, min_size, max_proposals)


def sliding_windows(width: int, height: int, scales: tuple[float, ...] = (0.2, 0.35, 0.5, 0.75, 1.0),
                    aspect_ratios: tuple[float, ...] = (0.5, 1.0, 2.0), stride_fraction: float = 0.25,
                    max_proposals: int | None = None) -> np.ndarray:
    """A multi-scale grid of windows: side ``scale * min(width, height)`` (times sqrt(aspect) in width and
    divided by it in height), stride ``stride_fraction`` of the window; always includes the whole image."""
    out = [np.array([[0, 0, width, height]], dtype=np.float32)]
    base = min(width, height)
    for s in scales:
        for a in aspect_ratios:
            bw, bh = min(width, s * base * np.sqrt(a)), min(height, s * base / np.sqrt(a))
            xs = np.arange(0, max(width - bw, 0) + 1e-6, max(1.0, stride_fraction * bw))
            ys = np.arange(0, max(height - bh, 0) + 1e-6, max(1.0, stride_fraction * bh))
            gx, gy = np.meshgrid(xs, ys)
            gx, gy = gx.ravel(), gy.ravel()
            out.append(np.stack([gx, gy, gx + bw, gy + bh], 1).astype(np.float32))
    return clean_boxes(np.concatenate(out), width, height, 1.0, max_proposals)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


class ProposalCache:
    """Per-image proposals on disk (see the module docstring). ``method``: ``selective_search`` or
    ``sliding_window``; ``params`` the method's keyword arguments (part of the file name)."""

    def __init__(self, cache_dir: str | Path | None, method: str = "selective_search", **params):
        if method not in METHODS:
            raise ValueError(f"rcnn.proposals.method={method!r}: expected selective_search or sliding_window")
        self.dir = None if cache_dir is None else Path(cache_dir)
        self.cache = None if cache_dir is None else ArtifactCache(cache_dir, version=CACHE_VERSION, what="proposal cache")
        self.method, self.params = method, dict(params)
        mode = self.params.get("mode", "sw") if method == "selective_search" else "sw"
        self.tag = f"{mode}-w{self.params.get('width', 'n')}-{digest([method, self.params], 10)}"
        self.stats: Counter = Counter()

    def path(self, image_id: str) -> Path | None:
        return None if self.cache is None else self.cache.dir / f"{_safe(image_id)}.{self.tag}.npz"

    def compute(self, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        if self.method == "sliding_window":
            return sliding_windows(w, h, **{k: v for k, v in self.params.items() if k != "width"})
        boxes = selective_search(image, **self.params)
        if len(boxes) == 0:
            self.stats["empty_fallback"] += 1
            if self.stats["empty_fallback"] <= 5:
                log.warning("selective search returned no boxes for a %dx%d image: using sliding windows", w, h)
            boxes = sliding_windows(w, h, max_proposals=self.params.get("max_proposals"))
        return boxes

    def key(self, image_id: str, width: int, height: int) -> dict:
        return {"kind": "proposals", "method": self.method, "params": self.params, "image_id": image_id,
                "image_size": [int(width), int(height)]}

    def get(self, image_id: str, image: np.ndarray) -> np.ndarray:
        h, w = image.shape[:2]
        path = self.path(image_id)
        arrays, why = (None, ABSENT) if path is None else self.cache.read_arrays(path, self.key(image_id, w, h), warn=False)
        if why != ABSENT:
            size = tuple(int(v) for v in arrays["image_size"]) if arrays is not None else None
            if arrays is None:
                try:  # a file computed for another image size (regenerated scenes, same ids) is not damage
                    with np.load(path, allow_pickle=False) as z:
                        size = tuple(int(v) for v in z["image_size"])
                except Exception:  # noqa: BLE001 - unreadable: reported below
                    size = None
            if size is not None and size != (w, h):
                self.stats["size_mismatch"] += 1
                log.warning("proposal cache %s was computed for a %dx%d image, this image is %dx%d: recomputing",
                            path, size[0], size[1], w, h)
            elif arrays is None:
                self.stats["corrupt"] += 1
                self.cache.warn(path, why)
            else:
                self.stats["hits"] += 1
                return arrays["boxes"].astype(np.float32)
        self.stats["misses"] += 1
        boxes = self.compute(image)
        if path is not None:
            self.cache.write_arrays(path, self.key(image_id, w, h), {"boxes": boxes, "image_size": np.array([w, h])})
        return boxes
