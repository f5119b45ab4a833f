"""Region proposals with masks for R-CNN segmentation (thesis 3.2), cached per image.

The thesis uses CPMC's ~150 figure-ground segments per image; CPMC is not available, so regions come from a
selective-search-style hierarchical grouping (Uijlings et al., 2013) of Felzenszwalb-Huttenlocher
superpixels (``skimage.segmentation.felzenszwalb``):

1. for every *strategy* -- a colour space (``rgb``, ``hsv``, ``lab``) x a Felzenszwalb ``scale`` --
   the image is over-segmented into base segments;
2. adjacent segments are merged greedily, most similar pair first, until one region is left. Similarity is
   selective search's sum of colour-histogram intersection (25 bins per channel, L1-normalised), size
   (``1 - (a_i + a_j) / A``: small regions merge early) and fill (``1 - (bbox_ij - a_i - a_j) / A``:
   regions that fill each other's box gaps merge early). Every base segment and every merge is a region,
   so each has an exact binary mask (a union of base segments);
3. the regions of all strategies are pooled, regions under ``min_area`` (fraction of the image) dropped,
   exact duplicates removed, and -- as selective search ranks its boxes -- each region gets the value
   ``level * u`` (``level`` 1 for a hierarchy's last merge, growing towards its base segments, ``u`` uniform
   in [0, 1) from a seeded generator), the ``max_regions`` (150, the thesis's count) smallest kept.

``SegmentProposals.compute(image)`` returns ``(masks, boxes)``: bool R x H x W and float32 R x 4 tight
0-based pixel-edge ``x1, y1, x2, y2`` boxes (``x2 = last column + 1``, as ``datamodules/voc.py``). The
result is a deterministic function of the image and the parameters.

Policy for an image that yields no region (every region under ``min_area``, e.g. a tiny image with a huge
``min_area``): the whole image is its one region, counted as ``whole_image_fallback`` in ``stats``.

``SegmentCache``: an ``ArtifactCache`` (``transferrable.core.artifact_cache``) of one ``.npz`` per image (masks bit-packed,
the manifest inside) named by image id + a digest of the parameters, storing the image size it was computed for; a
size mismatch or unreadable file is reported, counted (``size_mismatch`` / ``corrupt``) and recomputed. Writes are
atomic.
"""

from __future__ import annotations

import hashlib
import heapq
import logging
import re
from collections import Counter
from pathlib import Path

import numpy as np

from transferrable.core.artifact_cache import ABSENT, ArtifactCache, digest

log = logging.getLogger(__name__)

COLOUR_SPACES = ("rgb", "hsv", "lab")
HIST_BINS = 25
CACHE_VERSION = 1  # of the entries' manifests


def to_colour_space(image: np.ndarray, space: str) -> np.ndarray:
    """uint8 RGB -> float H x W x 3 with every channel in [0, 1]."""
    from skimage import color

    rgb = np.asarray(image, np.float32) / 255.0
    if space == "rgb":
        return rgb
    if space == "hsv":
        return color.rgb2hsv(rgb).astype(np.float32)
    if space == "lab":
        lab = color.rgb2lab(rgb).astype(np.float32)
        return np.stack([lab[..., 0] / 100.0, (lab[..., 1] + 128) / 255.0, (lab[..., 2] + 128) / 255.0], -1)
    raise ValueError(f"colour space {space!r}: expected one of {COLOUR_SPACES}")


def _colour_histograms(feat: np.ndarray, labels: np.ndarray, n: int) -> np.ndarray:
    """n x (3 * HIST_BINS) per-segment colour histograms, each L1-normalised."""
    bins = np.clip((feat * HIST_BINS).astype(np.int64), 0, HIST_BINS - 1)  # H x W x 3
    lab = labels.ravel()
    hist = np.zeros((n, 3 * HIST_BINS), np.float64)
    for ch in range(3):
        idx = lab * (3 * HIST_BINS) + ch * HIST_BINS + bins[..., ch].ravel()
        hist += np.bincount(idx, minlength=n * 3 * HIST_BINS).reshape(n, 3 * HIST_BINS)
    return hist / np.maximum(hist.sum(1, keepdims=True), 1)


def _adjacent_pairs(labels: np.ndarray) -> set[tuple[int, int]]:
    pairs = set()
    for a, b in ((labels[:, :-1], labels[:, 1:]), (labels[:-1, :], labels[1:, :])):
        m = a != b
        lo, hi = np.minimum(a[m], b[m]), np.maximum(a[m], b[m])
        pairs.update(zip(lo.tolist(), hi.tolist(), strict=True))
    return pairs


def hierarchical_grouping(feat: np.ndarray, labels: np.ndarray) -> tuple[list[np.ndarray], list[int]]:
    """Selective search's greedy grouping of the base segments ``labels`` (0..n-1, H x W) of colour image
    ``feat``. Returns (members, levels): every region (base segments first, then each merge in order) as
    the array of base-segment ids it covers, and its hierarchy level (1 = the last merge)."""
    n = int(labels.max()) + 1
    h, w = labels.shape
    area_img = float(h * w)
    size = np.bincount(labels.ravel(), minlength=n).astype(np.float64)
    from scipy.ndimage import find_objects

    box = np.zeros((n, 4), np.float64)
    for i, sl in enumerate(find_objects(labels + 1)):
        if sl is not None:
            box[i] = [sl[1].start, sl[0].start, sl[1].stop, sl[0].stop]
    hist = list(_colour_histograms(feat, labels, n))
    size, box = list(size), list(box)
    members: list[np.ndarray] = [np.array([i]) for i in range(n)]
    neighbours: dict[int, set[int]] = {i: set() for i in range(n)}
    for a, b in _adjacent_pairs(labels):
        neighbours[a].add(b)
        neighbours[b].add(a)

    def similarity(i: int, j: int) -> float:
        colour = float(np.minimum(hist[i], hist[j]).sum()) / 3.0  # each channel's histogram sums to 1
        s = 1.0 - (size[i] + size[j]) / area_img
        bb = (max(box[i][2], box[j][2]) - min(box[i][0], box[j][0])) * (max(box[i][3], box[j][3]) - min(box[i][1], box[j][1]))
        fill = 1.0 - (bb - size[i] - size[j]) / area_img
        return colour + s + fill

    heap = [(-similarity(a, b), a, b) for a in neighbours for b in neighbours[a] if a < b]
    heapq.heapify(heap)
    alive = set(range(n))
    while heap:
        _, a, b = heapq.heappop(heap)
        if a not in alive or b not in alive:
            continue
        k = len(members)
        sa, sb = size[a], size[b]
        size.append(sa + sb)
        hist.append((hist[a] * sa + hist[b] * sb) / (sa + sb))
        box.append(np.array([min(box[a][0], box[b][0]), min(box[a][1], box[b][1]),
                             max(box[a][2], box[b][2]), max(box[a][3], box[b][3])]))
        members.append(np.concatenate([members[a], members[b]]))
        alive -= {a, b}
        nb = (neighbours.pop(a) | neighbours.pop(b)) - {a, b}
        for m in nb:
            neighbours[m] -= {a, b}
            neighbours[m].add(k)
        neighbours[k] = nb
        alive.add(k)
        for m in nb:
            heapq.heappush(heap, (-similarity(k, m), min(k, m), max(k, m)))
    # selective search's ranking: regions in creation order, the last merge (the whole image) ranked 1
    total = len(members)
    levels = [total - k for k in range(total)]
    return members, levels


def mask_boxes(masks: np.ndarray) -> np.ndarray:
    """Tight 0-based pixel-edge boxes (x1, y1, x2, y2) of bool R x H x W masks (empty mask: zeros)."""
    masks = np.asarray(masks, bool)
    rows, cols = masks.any(2), masks.any(1)
    out = np.zeros((len(masks), 4), np.float32)
    for i in range(len(masks)):
        ys, xs = np.flatnonzero(rows[i]), np.flatnonzero(cols[i])
        if len(ys):
            out[i] = [xs[0], ys[0], xs[-1] + 1, ys[-1] + 1]
    return out


class SegmentProposals:
    """Masked region proposals (see the module docstring)."""

    def __init__(self, colour_spaces: tuple[str, ...] | list[str] = ("hsv", "lab"),
                 scales: tuple[float, ...] | list[float] = (50.0, 150.0), sigma: float = 0.8, min_size: int = 20,
                 min_area: float = 0.002, max_regions: int = 150, width: int | None = None, seed: int = 0):
        bad = [c for c in colour_spaces if c not in COLOUR_SPACES]
        if bad or not colour_spaces:
            raise ValueError(f"segments.colour_spaces={list(colour_spaces)}: expected values from {list(COLOUR_SPACES)}")
        if not scales or int(max_regions) < 1:
            raise ValueError("segments.scales must be non-empty and segments.max_regions >= 1")
        self.colour_spaces, self.scales = list(colour_spaces), [float(s) for s in scales]
        self.sigma, self.min_size, self.min_area = float(sigma), int(min_size), float(min_area)
        self.max_regions, self.width, self.seed = int(max_regions), (int(width) if width else None), int(seed)
        self.stats: Counter = Counter()

    @property
    def params(self) -> dict:
        return {"colour_spaces": self.colour_spaces, "scales": self.scales, "sigma": self.sigma,
                "min_size": self.min_size, "min_area": self.min_area, "max_regions": self.max_regions,
                "width": self.width, "seed": self.seed, "version": 1}

    def base_segments(self, image: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
        """(colour features, base labels) per strategy, at the image's own size."""
        import cv2
        from skimage.segmentation import felzenszwalb

        h, w = image.shape[:2]
        work = image
        if self.width and self.width != w:
            work = cv2.resize(image, (self.width, max(1, round(h * self.width / w))), interpolation=cv2.INTER_LINEAR)
        out = []
        for space in self.colour_spaces:
            feat = to_colour_space(work, space)
            for scale in self.scales:
                labels = felzenszwalb(feat, scale=scale, sigma=self.sigma, min_size=self.min_size, channel_axis=-1)
                if labels.shape != (h, w):
                    labels = cv2.resize(labels.astype(np.int32), (w, h), interpolation=cv2.INTER_NEAREST)
                _, labels = np.unique(labels, return_inverse=True)  # consecutive ids (resizing may drop some)
                labels = labels.reshape(h, w)
                out.append((to_colour_space(image, space) if labels.shape != feat.shape[:2] else feat, labels))
        return out

    def compute(self, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        h, w = image.shape[:2]
        rng = np.random.default_rng(self.seed)
        min_pixels = max(1, int(round(self.min_area * h * w)))
        seen: set[bytes] = set()
        masks, ranks = [], []
        for feat, labels in self.base_segments(image):
            members, levels = hierarchical_grouping(feat, labels)
            n = int(labels.max()) + 1
            sizes = np.bincount(labels.ravel(), minlength=n)
            flat = labels.ravel()
            for mem, level in zip(members, levels, strict=True):
                u = rng.random()  # drawn for every region, so the ranking does not depend on which are kept
                if sizes[mem].sum() < min_pixels:
                    continue
                member = np.zeros(n, bool)
                member[mem] = True
                m = member[flat]
                key = hashlib.sha1(np.packbits(m).tobytes()).digest()
                if key in seen:
                    continue
                seen.add(key)
                masks.append(m)
                ranks.append(level * u)
        if not masks:
            self.stats["whole_image_fallback"] += 1
            full = np.ones((1, h, w), bool)
            return full, mask_boxes(full)
        keep = np.argsort(np.asarray(ranks), kind="stable")[: self.max_regions]
        out = np.stack([masks[i] for i in keep]).reshape(-1, h, w)
        return out, mask_boxes(out)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name)


class SegmentCache:
    """Per-image masked proposals on disk (see the module docstring)."""

    def __init__(self, cache_dir: str | Path | None, proposals: SegmentProposals):
        self.dir = None if cache_dir is None else Path(cache_dir)
        self.cache = None if cache_dir is None else ArtifactCache(cache_dir, version=CACHE_VERSION, what="segment cache")
        self.proposals = proposals
        self.tag = f"seg{proposals.max_regions}-{digest(proposals.params, 10)}"
        self.stats: Counter = Counter()

    def path(self, image_id: str) -> Path | None:
        return None if self.cache is None else self.cache.dir / f"{_safe(image_id)}.{self.tag}.npz"

    def key(self, image_id: str, width: int, height: int) -> dict:
        return {"kind": "segments", "params": self.proposals.params, "max_regions": self.proposals.max_regions,
                "image_id": image_id, "image_size": [int(width), int(height)]}

    def get(self, image_id: str, image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(masks bool R x H x W, boxes float32 R x 4) of one image."""
        h, w = image.shape[:2]
        path = self.path(image_id)
        z, why = (None, ABSENT) if path is None else self.cache.read_arrays(path, self.key(image_id, w, h), warn=False)
        if why != ABSENT:
            size = tuple(int(v) for v in z["image_size"]) if z is not None else None
            if z is None:
                try:  # computed for another image size (regenerated scenes, same ids): not damage
                    with np.load(path, allow_pickle=False) as old:
                        size = tuple(int(v) for v in old["image_size"])
                except Exception:  # noqa: BLE001 - unreadable: reported below
                    size = None
            if size is not None and size != (w, h):
                self.stats["size_mismatch"] += 1
                log.warning("segment cache %s was computed for a %dx%d image, this image is %dx%d: recomputing",
                            path, size[0], size[1], w, h)
            elif z is None:
                self.stats["corrupt"] += 1
                self.cache.warn(path, why)
            else:
                self.stats["hits"] += 1
                n = int(z["count"])
                masks = np.unpackbits(z["masks"], count=n * h * w).reshape(n, h, w).astype(bool)
                return masks, z["boxes"].astype(np.float32)
        self.stats["misses"] += 1
        before = self.proposals.stats["whole_image_fallback"]
        masks, boxes = self.proposals.compute(image)
        if self.proposals.stats["whole_image_fallback"] > before:
            self.stats["whole_image_fallback"] += 1
            log.warning("image %s: no region of at least min_area=%g; using the whole image as its one region",
                        image_id, self.proposals.min_area)
        if path is not None:
            self.cache.write_arrays(path, self.key(image_id, w, h), {
                "masks": np.packbits(masks.ravel()), "boxes": boxes, "count": np.array(len(masks)),
                "image_size": np.array([w, h])})
        return masks, boxes
