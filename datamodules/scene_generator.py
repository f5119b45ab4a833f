"""Generated detection scenes, offline: real object crops on real photos, written in VOC layout.

``generate_scenes(out_dir, n_train, n_val, n_test, ...)`` composes Fashion-MNIST items (the item's own
intensity, thresholded and hole-filled, is its mask; recoloured with a named colour and a pattern, rescaled to
varied scales and aspect ratios, sometimes mirrored) at varied positions, 1-6 per image, with partial occlusion
and truncation at the borders, on random crops of the photos shipped in scikit-image and scikit-learn. Train
and val scenes use Fashion-MNIST's train items, test scenes its t10k items. Everything is a function of the
seed: image ``i`` draws from its own ``SeedSequence([seed, i])``, so the same seed gives the same bytes.

The result is a VOC directory, ``out_dir/VOCScenes/``::

    JPEGImages/<id>.jpg
    Annotations/<id>.xml              VOC XML: 1-based inclusive bndbox of the visible pixels, truncated
                                      (cut by the border), difficult (visible < 40% of the in-image part, or
                                      the visible box is tiny), pose Unspecified
    ImageSets/Main/{train,val,trainval,test}.txt, <cls>_<split>.txt (1 present, 0 difficult only, -1 absent)
    SegmentationClass/<id>.png        palette PNG (VOC colormap): 0 background, class index + 1, 255 void
    SegmentationObject/<id>.png       palette PNG: 0 background, instance i + 1 (= i-th XML object), 255 void
    ImageSets/Segmentation/{train,val,trainval,test}.txt
    Attributes/<id>.json              per object: class, colour, pattern, scale, bbox, position words,
                                      occlusion, depth order, who occludes whom; the background photo
    manifest.json                     generator version, parameters, counts (written last)

Void (255) marks the inner ``void_width``-pixel border of every object's visible region, as VOC marks object
outlines; boxes are the extent of the visible region including that border. Paint order is back to front,
so instance ``i + 1`` may be occluded only by instances with a larger id.

The directory is an ``ArtifactCache`` directory entry (``transferrable.core.artifact_cache``): a complete directory whose
manifest has the same parameters is reused; a partial or mismatched one warns and is regenerated. Generation writes
into a hidden temporary directory next to the target and renames it into place, so the target name only ever holds
a complete data set.
"""

from __future__ import annotations

import io
import json
import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import dataclass, fields
from functools import lru_cache
from pathlib import Path

import numpy as np

from datamodules.base import DatasetError
from transferrable.core.artifact_cache import ArtifactCache, digest
from transferrable.core.progress import progress as progress_bar
from transferrable.viz.palette import voc_colormap

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
DATASET_NAME = "VOCScenes"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
# the 10 Fashion-MNIST classes (as in datamodules.fashion_mnist, no spaces)
CLASSES = ["t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle-boot"]
SPLITS = ("train", "val", "test")

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (210, 35, 35),
    "green": (40, 160, 60),
    "blue": (40, 80, 215),
    "yellow": (240, 215, 40),
    "orange": (245, 135, 25),
    "purple": (125, 50, 165),
    "pink": (245, 135, 190),
    "brown": (125, 80, 40),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
    "cyan": (40, 200, 215),
}
PATTERNS = ("plain", "stripes", "checks", "dots")
PATTERN_P = (0.55, 0.2, 0.15, 0.1)

# photos shipped with scikit-image (no download needed) and scikit-learn's two sample images
SKIMAGE_PHOTOS = (
    "astronaut", "coffee", "chelsea", "rocket", "brick", "grass", "gravel", "camera", "coins",
    "hubble_deep_field", "immunohistochemistry", "stereo_motorcycle",
)
SKLEARN_PHOTOS = ("china", "flower")

# placement constraints
MIN_VISIBLE_FRACTION = 0.3  # an object keeps at least this much of its in-image part visible
MIN_IN_IMAGE_FRACTION = 0.6  # at most 40% of an object is cut off by the border
MIN_INTERIOR_PIXELS = 4  # labelled pixels left inside the void border
DIFFICULT_OCCLUSION = 0.6  # more occluded than this -> difficult
SCALE_RANGE = (0.14, 0.75)  # object height / image height, log-uniform
ASPECT_JITTER = 0.35  # width multiplied by exp(U(-a, a))
MAX_WIDTH_FRACTION = 0.8  # object width / image width


# ---------------------------------------------------------------------------------------------------
# sources
# ---------------------------------------------------------------------------------------------------
def _photo(name: str) -> np.ndarray:
    if name in SKLEARN_PHOTOS:
        from sklearn.datasets import load_sample_image

        img = load_sample_image(f"{name}.jpg")
    else:
        import skimage.data

        img = getattr(skimage.data, name)()
        if isinstance(img, tuple):  # stereo pairs
            img = img[0]
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise TypeError(f"photo {name}: dtype {img.dtype}")
    if img.ndim == 2:
        img = np.repeat(img[:, :, None], 3, axis=2)
    return np.ascontiguousarray(img[:, :, :3])


@lru_cache(maxsize=1)
def background_photos() -> dict[str, np.ndarray]:
    """The background photos available offline on this machine (name -> uint8 RGB)."""
    out = {}
    for name in (*SKIMAGE_PHOTOS, *SKLEARN_PHOTOS):
        try:
            out[name] = _photo(name)
        except Exception as err:  # a photo that needs a download (or an older library) is left out
            log.debug("background photo %s unavailable: %s", name, err)
    if not out:
        raise DatasetError("no background photos: install scikit-image and scikit-learn")
    return out


def _idx_fingerprint(data_dir: Path) -> dict:
    from datamodules.idx import find_idx

    files = {}
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        p = find_idx(data_dir, stem)
        files[stem] = None if p is None else p.stat().st_size
    return {"data_dir": str(data_dir.resolve()), "sizes": files}


@lru_cache(maxsize=2)
def load_items(data_dir: str, fingerprint: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from datamodules.fashion_mnist import HOW_TO_GET
    from datamodules.idx import load_idx_split

    d = Path(data_dir)
    return {
        "train": load_idx_split(d, "train", "Fashion-MNIST", HOW_TO_GET),
        "t10k": load_idx_split(d, "t10k", "Fashion-MNIST", HOW_TO_GET),
    }


def _item_cutout(item: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(intensity in [0, 1], mask) cropped to the item's mask: its own intensity, thresholded, holes filled."""
    from scipy.ndimage import binary_fill_holes

    item = item.astype(np.float32)
    peak = float(item.max())
    if peak <= 0:
        return None
    mask = binary_fill_holes(item > max(8.0, 0.1 * peak))
    ys, xs = np.nonzero(mask)
    if len(ys) < 8:
        return None
    sl = (slice(ys.min(), ys.max() + 1), slice(xs.min(), xs.max() + 1))
    return item[sl] / peak, mask[sl]


# ---------------------------------------------------------------------------------------------------
# parameters, manifest, reuse
# ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SceneSpec:
    """What a generated scene data set is made of: one definition of the knobs and their defaults (the DataModules,
    the caption generator and the clutter-object world build one from their own keys)."""

    n_train: int = 300
    n_val: int = 100
    n_test: int = 200
    image_size: Sequence[int] = (160, 120)  # width, height
    seed: int = 0
    min_objects: int = 1
    max_objects: int = 6
    source: str = "fashion_mnist"
    data_dir: str | Path = FASHION_MNIST_DIR
    void_width: int = 1
    jpeg_quality: int = 90

    @classmethod
    def pop_from(cls, kwargs: dict, **given) -> SceneSpec:
        """A spec from ``given`` and the keys of ``kwargs`` named like its other fields (removed from ``kwargs``; a
        DataModule's own ``seed`` and ``data_dir`` stay, its scene seed and source come in ``given``)."""
        names = {f.name for f in fields(cls)} - set(given)
        return cls(**{k: kwargs.pop(k) for k in list(kwargs) if k in names}, **given)

    def params(self) -> dict:
        """The parameters that determine the data set (what the manifest records and compares)."""
        w, h = (int(v) for v in self.image_size)
        counts = {"n_train": int(self.n_train), "n_val": int(self.n_val), "n_test": int(self.n_test)}
        if any(v < 0 for v in counts.values()) or sum(counts.values()) == 0:
            raise ValueError(f"scene counts must be >= 0 and not all 0, got {counts}")
        if w < 32 or h < 32:
            raise ValueError(f"image_size={list(self.image_size)}: expected (width, height), each at least 32")
        if not 1 <= int(self.min_objects) <= int(self.max_objects):
            raise ValueError(f"expected 1 <= min_objects <= max_objects, got {self.min_objects}, {self.max_objects}")
        if self.source != "fashion_mnist":
            raise ValueError(f"source={self.source!r}: only 'fashion_mnist' is supported")
        return {
            "version": GENERATOR_VERSION,
            **counts,
            "image_size": [w, h],
            "seed": int(self.seed),
            "min_objects": int(self.min_objects),
            "max_objects": int(self.max_objects),
            "source": self.source,
            "source_files": _idx_fingerprint(Path(os.path.expanduser(str(self.data_dir)))),
            "backgrounds": sorted(background_photos()),
            "void_width": int(self.void_width),
            "jpeg_quality": int(self.jpeg_quality),
        }


def scene_params(*args, **kwargs) -> dict:
    """``SceneSpec(*args, **kwargs).params()``: the parameters that determine a generated data set."""
    return SceneSpec(*args, **kwargs).params()


def scene_key(params: dict) -> str:
    """A short hash of the parameters: the cache sub-directory of a data set."""
    return digest(params, 12, algo="sha1")


def _read_ids(path: Path) -> list[str]:
    return [ln.split()[0] for ln in path.read_text().splitlines() if ln.strip()]


def _layout_problem(root: Path, params: dict) -> str | None:
    """Why ``root`` does not hold every scene of ``params`` in VOC layout (checked beyond the manifest's file list,
    which a manifest from before file lists lacks)."""
    ids = [i for s in SPLITS for i in _read_ids(root / "ImageSets" / "Main" / f"{s}.txt")]
    if len(ids) != params["n_train"] + params["n_val"] + params["n_test"]:
        return f"the split lists name {len(ids)} images"
    for sub, ext in (("JPEGImages", ".jpg"), ("Annotations", ".xml"), ("Attributes", ".json"),
                     ("SegmentationClass", ".png"), ("SegmentationObject", ".png")):
        present = set(os.listdir(root / sub))
        missing = [i for i in ids if f"{i}{ext}" not in present]
        if missing:
            return f"{sub}/{missing[0]}{ext} is missing"
    return None


def _cache(root: Path) -> ArtifactCache:
    return ArtifactCache(root.parent, version=GENERATOR_VERSION, what="generated scenes")


def is_complete(root: str | Path, params: dict) -> bool:
    """True when ``root`` holds a finished data set generated with exactly ``params``."""
    root = Path(root)
    return _cache(root).dir_problem(root, params, lambda r: _layout_problem(r, params)) is None


# ---------------------------------------------------------------------------------------------------
# the generator
# ---------------------------------------------------------------------------------------------------
def generate_scenes(out_dir: str | Path, name: str = DATASET_NAME, progress: bool = True, **spec) -> Path:
    """Generate (or reuse) the scenes of ``SceneSpec(**spec)`` in ``out_dir/<name>`` and return that VOC root.

    ``image_size`` is (width, height). Raises ``DatasetError`` when the Fashion-MNIST IDX files are missing.
    """
    params = scene_params(**spec)
    root = Path(os.path.expanduser(str(out_dir))) / name
    return _cache(root).get_or_build(params, lambda tmp: _write_dataset(tmp, params, name, progress), kind="dir",
                                     name=name, validate=lambda r: _layout_problem(r, params))


def _write_dataset(root: Path, params: dict, name: str, progress: bool) -> dict:
    """The VOC layout under ``root``; returns the manifest's extra fields (the cache writes the manifest last).
    Over 60 lines: it writes each of the layout's folders in turn, kept in one place to read against VOC's."""
    data_dir = params["source_files"]["data_dir"]
    items = load_items(data_dir, json.dumps(params["source_files"], sort_keys=True))
    photos = background_photos()
    bg_names = params["backgrounds"]
    missing = [b for b in bg_names if b not in photos]
    if missing:
        raise DatasetError(f"background photos {missing} are not available on this machine")
    for sub in ("JPEGImages", "Annotations", "Attributes", "SegmentationClass", "SegmentationObject",
                "ImageSets/Main", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)

    sizes = {"train": params["n_train"], "val": params["n_val"], "test": params["n_test"]}
    split_ids: dict[str, list[str]] = {s: [] for s in SPLITS}
    presence: dict[str, dict[str, int]] = {}  # image id -> class -> 1 / 0 (difficult only)
    n_objects = np.zeros(len(CLASSES), dtype=np.int64)
    n_difficult = n_truncated = 0
    per_image = []
    index = 0
    with progress_bar(total=sum(sizes.values()), desc="generating scenes", unit="img", enabled=progress,
                      leave=True) as bar:
        for split in SPLITS:
            pool_name = "t10k" if split == "test" else "train"
            pool = items[pool_name]
            for _ in range(sizes[split]):
                image_id = f"{index:06d}"
                rng = np.random.default_rng(np.random.SeedSequence([params["seed"], index]))
                scene = compose_scene(rng, params, pool, pool_name, photos, bg_names)
                scene["image_id"], scene["split"] = image_id, split
                _write_scene(root, name, scene, params)
                split_ids[split].append(image_id)
                flags: dict[str, int] = {}
                for o in scene["objects"]:
                    n_objects[o["class_index"]] += 1
                    n_difficult += o["difficult"]
                    n_truncated += o["truncated"]
                    flags[o["class"]] = max(flags.get(o["class"], 0), 0 if o["difficult"] else 1)
                presence[image_id] = flags
                per_image.append(len(scene["objects"]))
                index += 1
                bar.update(1)

    split_ids["trainval"] = split_ids["train"] + split_ids["val"]
    for split in (*SPLITS, "trainval"):
        ids = split_ids[split]
        text = "".join(f"{i}\n" for i in ids)
        _put(root / "ImageSets" / "Main" / f"{split}.txt", text.encode())
        _put(root / "ImageSets" / "Segmentation" / f"{split}.txt", text.encode())
        for cls in CLASSES:
            lines = "".join(f"{i} {presence[i].get(cls, -1):2d}\n" for i in ids)
            _put(root / "ImageSets" / "Main" / f"{cls}_{split}.txt", lines.encode())
    per_image_arr = np.asarray(per_image)
    return {
        "generator": "datamodules.scene_generator",
        "classes": CLASSES,
        "counts": {
            "images": {s: len(split_ids[s]) for s in (*SPLITS, "trainval")},
            "objects": int(n_objects.sum()),
            "objects_per_class": {c: int(n) for c, n in zip(CLASSES, n_objects, strict=True)},
            "objects_per_image": {"min": int(per_image_arr.min()), "max": int(per_image_arr.max()),
                                  "mean": round(float(per_image_arr.mean()), 3)},
            "difficult": int(n_difficult),
            "truncated": int(n_truncated),
        },
    }


def _background(rng: np.random.Generator, photos: dict, names: list[str], w: int, h: int) -> tuple[np.ndarray, dict]:
    import cv2

    def crop(name: str, out_w: int, out_h: int) -> tuple[np.ndarray, list[int]]:
        photo = photos[name]
        ph, pw = photo.shape[:2]
        max_w = min(pw, ph * out_w / out_h)
        cw = max(8.0, max_w * rng.uniform(0.25, 1.0))
        ch = cw * out_h / out_w
        x0 = int(rng.integers(0, max(1, int(pw - cw) + 1)))
        y0 = int(rng.integers(0, max(1, int(ph - ch) + 1)))
        patch = photo[y0 : y0 + int(ch), x0 : x0 + int(cw)]
        patch = cv2.resize(patch, (out_w, out_h), interpolation=cv2.INTER_AREA)
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        return patch, [x0, y0, int(cw), int(ch)]

    name = names[int(rng.integers(len(names)))]
    bg, box = crop(name, w, h)
    bg = bg.astype(np.float32)
    info = {"background": name, "background_crop": box, "clutter": None}
    if rng.random() < 0.4:  # clutter: a rectangle cut from another photo
        other = names[int(rng.integers(len(names)))]
        pw_, ph_ = int(w * rng.uniform(0.2, 0.5)), int(h * rng.uniform(0.2, 0.5))
        patch, _ = crop(other, pw_, ph_)
        x0, y0 = int(rng.integers(0, w - pw_ + 1)), int(rng.integers(0, h - ph_ + 1))
        bg[y0 : y0 + ph_, x0 : x0 + pw_] = patch
        info["clutter"] = {"photo": other, "box": [x0, y0, x0 + pw_, y0 + ph_]}
    return bg, info


def _pattern_field(rng: np.random.Generator, ph: int, pw: int, size: float, image_side: int) -> tuple[str, np.ndarray]:
    """A pattern over the object: a few repeats on a small object, a fabric-like period on a large one."""
    pattern = str(rng.choice(PATTERNS, p=PATTERN_P))
    yy, xx = np.mgrid[0:ph, 0:pw].astype(np.float32)
    period = max(3.0, min(size / rng.uniform(3.0, 6.0), rng.uniform(6.0, 12.0) * image_side / 120))
    if pattern == "stripes":
        theta = float(rng.choice([0.0, np.pi / 4, np.pi / 2, 3 * np.pi / 4]))
        field = ((xx * np.cos(theta) + yy * np.sin(theta)) // (period / 2)) % 2 == 1
    elif pattern == "checks":
        field = ((xx // period) + (yy // period)) % 2 == 1
    elif pattern == "dots":
        field = ((xx % period) - period / 2) ** 2 + ((yy % period) - period / 2) ** 2 < (period / 3) ** 2
    else:
        field = np.zeros((ph, pw), dtype=bool)
    return pattern, field


def compose_scene(rng: np.random.Generator, params: dict, pool, pool_name: str, photos: dict, bg_names: list[str]) -> dict:
    """One scene: the image, the instance/class maps and the objects' attributes (back to front).

    Long on purpose: one sequential draw from ``rng`` per object; splitting it would reorder the draws (and change
    every generated data set's bytes, which tests pin) or thread a dozen arrays through helpers."""
    import cv2

    w, h = params["image_size"]
    images, labels = pool
    canvas, bg_info = _background(rng, photos, bg_names, w, h)
    inst = np.zeros((h, w), dtype=np.uint8)
    vw = params["void_width"]
    kernel = cv2.getStructuringElement(cv2.MORPH_CROSS, (2 * max(1, vw) + 1, 2 * max(1, vw) + 1))
    n_target = int(rng.integers(params["min_objects"], params["max_objects"] + 1))
    placed: list[dict] = []
    for k in range(n_target):
        required = k < params["min_objects"]
        tries = 60 if required else 12
        cut = None
        while cut is None:
            idx = int(rng.integers(len(images)))
            cut = _item_cutout(images[idx])
        intensity, mask0 = cut
        cls = int(labels[idx])
        flipped = bool(rng.random() < 0.5)
        if flipped:
            intensity, mask0 = intensity[:, ::-1], mask0[:, ::-1]
        lo, hi = np.log(SCALE_RANGE[0]), np.log(SCALE_RANGE[1])
        ok = None
        for attempt in range(tries):
            shrink = 0.8 ** (attempt // 4)
            scale = float(np.exp(rng.uniform(lo, hi))) * shrink
            aspect = float(np.exp(rng.uniform(-ASPECT_JITTER, ASPECT_JITTER)))
            oh = max(6, int(round(scale * h)))
            ow = max(4, int(round(oh * mask0.shape[1] / mask0.shape[0] * aspect)))
            if ow > MAX_WIDTH_FRACTION * w:  # wide items (shoes, bags) stay narrower than the image
                f = MAX_WIDTH_FRACTION * w / ow
                ow, oh = max(4, int(ow * f)), max(6, int(oh * f))
            x0 = int(rng.integers(-int(0.3 * ow), max(-int(0.3 * ow) + 1, w - int(0.7 * ow) + 1)))
            y0 = int(rng.integers(-int(0.3 * oh), max(-int(0.3 * oh) + 1, h - int(0.7 * oh) + 1)))
            alpha = np.clip(cv2.resize(mask0.astype(np.float32), (ow, oh), interpolation=cv2.INTER_LINEAR), 0, 1)
            full = alpha >= 0.5
            total = int(full.sum())
            # the in-image part
            ix0, iy0, ix1, iy1 = max(0, x0), max(0, y0), min(w, x0 + ow), min(h, y0 + oh)
            if ix1 <= ix0 or iy1 <= iy0 or total == 0:
                continue
            local = (slice(iy0 - y0, iy1 - y0), slice(ix0 - x0, ix1 - x0))
            sub = full[local]
            in_image = int(sub.sum())
            if in_image < max(12, MIN_IN_IMAGE_FRACTION * total):
                continue
            trial = inst.copy()
            region = trial[iy0:iy1, ix0:ix1]
            region[sub] = k + 1
            counts = np.bincount(trial.ravel(), minlength=k + 2)
            if any(counts[j + 1] < max(10, MIN_VISIBLE_FRACTION * p["in_image"]) for j, p in enumerate(placed)):
                continue
            # every object keeps pixels inside its void border (no sliver that is all outline)
            interior = (cv2.erode(trial, kernel, borderType=cv2.BORDER_REPLICATE) == trial) & (
                cv2.dilate(trial, kernel, borderType=cv2.BORDER_REPLICATE) == trial)
            if (np.bincount(trial[interior], minlength=k + 2)[1:] < MIN_INTERIOR_PIXELS).any():
                continue
            ok = (scale, aspect, ow, oh, x0, y0, alpha, full, total, (ix0, iy0, ix1, iy1), local, in_image, trial)
            break
        if ok is None:
            if required:  # never reached in practice: a tiny object fits somewhere on the canvas
                raise RuntimeError("could not place the required number of objects")
            continue
        scale, aspect, ow, oh, x0, y0, alpha, full, total, (ix0, iy0, ix1, iy1), local, in_image, trial = ok
        inst = trial
        # appearance: named colour (jittered), optional pattern in a second colour, shaded by the item
        colour = str(rng.choice(list(COLOURS)))
        rgb = np.clip(np.array(COLOURS[colour], np.float32) + rng.uniform(-15, 15, size=3), 0, 255)
        pattern, field = _pattern_field(rng, oh, ow, float(max(oh, ow)), min(w, h))
        colour2 = None
        if pattern != "plain":
            colour2 = str(rng.choice([c for c in COLOURS if c != colour]))
        rgb2 = np.array(COLOURS[colour2 or colour], np.float32)
        shade = 0.35 + 0.65 * cv2.resize(intensity.astype(np.float32), (ow, oh), interpolation=cv2.INTER_LINEAR)
        obj = np.where(field[:, :, None], rgb2, rgb) * np.clip(shade, 0, 1)[:, :, None]
        a = alpha[local][:, :, None]
        canvas[iy0:iy1, ix0:ix1] = canvas[iy0:iy1, ix0:ix1] * (1 - a) + obj[local] * a
        full_in = np.zeros((h, w), dtype=bool)
        full_in[iy0:iy1, ix0:ix1] = full[local]
        placed.append({
            "class_index": cls, "colour": colour, "colour2": colour2, "rgb": [int(round(v)) for v in rgb],
            "pattern": pattern, "flipped": flipped, "scale": round(oh / h, 4), "aspect": round(aspect, 4),
            "source_index": idx, "in_image": in_image, "total": total, "mask": full_in,
        })

    # final visibility and boxes (after every object is painted)
    objects = []
    for j, p in enumerate(placed):
        vis = inst == j + 1
        ys, xs = np.nonzero(vis)
        x1, y1, x2, y2 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
        visible = int(vis.sum())
        occlusion = 1.0 - visible / p["in_image"]
        tiny = max(8, int(round(0.06 * min(w, h))))
        difficult = occlusion > DIFFICULT_OCCLUSION or min(x2 - x1, y2 - y1) < tiny
        occluded_by = [i for i in range(j + 1, len(placed)) if (placed[i]["mask"] & p["mask"]).any()]
        in_front_of = [i for i in range(j) if (placed[i]["mask"] & p["mask"]).any()]
        cx, cy = (x1 + x2) / 2 / w, (y1 + y2) / 2 / h
        horiz = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else None
        vert = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else None
        words = [v for v in (vert, horiz) if v] or ["center"]
        area = (x2 - x1) * (y2 - y1) / (w * h)
        objects.append({
            "index": j, "instance_id": j + 1, "class": CLASSES[p["class_index"]], "class_index": p["class_index"],
            "colour": p["colour"], "colour2": p["colour2"], "rgb": p["rgb"], "pattern": p["pattern"],
            "flipped": p["flipped"], "scale": p["scale"], "aspect": p["aspect"],
            "bbox": [x1, y1, x2, y2],
            "bbox_voc": [x1 + 1, y1 + 1, x2, y2],
            "center": [round(cx, 4), round(cy, 4)],
            "position": " ".join(words), "position_words": words,
            "size": "small" if area < 0.04 else "medium" if area < 0.15 else "large",
            "occlusion": round(occlusion, 4), "truncated": p["in_image"] < p["total"], "difficult": bool(difficult),
            "depth": j, "occluded_by": occluded_by, "in_front_of": in_front_of,
            "source": {"dataset": "fashion_mnist", "split": pool_name, "index": p["source_index"]},
        })

    void = np.zeros((h, w), dtype=bool)
    if vw > 0 and objects:
        hi_ = cv2.dilate(inst, kernel, borderType=cv2.BORDER_REPLICATE)
        lo_ = cv2.erode(inst, kernel, borderType=cv2.BORDER_REPLICATE)
        void = (inst > 0) & ((hi_ != inst) | (lo_ != inst))
    class_lut = np.zeros(256, dtype=np.uint8)
    for j, o in enumerate(objects):
        class_lut[j + 1] = o["class_index"] + 1
    cls_map = class_lut[inst]
    obj_map = inst.copy()
    cls_map[void] = 255
    obj_map[void] = 255
    return {
        "image": np.clip(np.rint(canvas), 0, 255).astype(np.uint8),
        "class_map": cls_map,
        "object_map": obj_map,
        "objects": objects,
        "width": w,
        "height": h,
        **bg_info,
    }


# ---------------------------------------------------------------------------------------------------
# writing one scene
# ---------------------------------------------------------------------------------------------------
@lru_cache(maxsize=1)
def _palette_list() -> list[int]:
    return voc_colormap(256).ravel().tolist()


def encode_palette_png(labels: np.ndarray) -> bytes:
    """uint8 label map -> indexed-colour PNG bytes with the VOC palette."""
    from PIL import Image

    labels = np.ascontiguousarray(labels, dtype=np.uint8)
    img = Image.frombytes("P", (labels.shape[1], labels.shape[0]), labels.tobytes())
    img.putpalette(_palette_list())
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def voc_xml(folder: str, filename: str, width: int, height: int, objects: Sequence[dict],
            database: str = "Transferrable generated scenes", segmented: bool = True) -> bytes:
    """A VOC annotation; each object dict has ``name``, ``bbox_voc`` (1-based inclusive) and optional
    ``pose``, ``truncated``, ``difficult``."""
    ann = ET.Element("annotation")
    ET.SubElement(ann, "folder").text = folder
    ET.SubElement(ann, "filename").text = filename
    src = ET.SubElement(ann, "source")
    ET.SubElement(src, "database").text = database
    size = ET.SubElement(ann, "size")
    ET.SubElement(size, "width").text = str(width)
    ET.SubElement(size, "height").text = str(height)
    ET.SubElement(size, "depth").text = "3"
    ET.SubElement(ann, "segmented").text = "1" if segmented else "0"
    for o in objects:
        el = ET.SubElement(ann, "object")
        ET.SubElement(el, "name").text = o["name"]
        ET.SubElement(el, "pose").text = o.get("pose", "Unspecified")
        ET.SubElement(el, "truncated").text = str(int(bool(o.get("truncated", False))))
        ET.SubElement(el, "difficult").text = str(int(bool(o.get("difficult", False))))
        bb = ET.SubElement(el, "bndbox")
        for key, v in zip(("xmin", "ymin", "xmax", "ymax"), o["bbox_voc"], strict=True):
            ET.SubElement(bb, key).text = str(int(v))
    ET.indent(ann, space="\t")
    return ET.tostring(ann, encoding="utf-8") + b"\n"


def _put(path: Path, data: bytes) -> None:
    """A plain write: files are only ever written inside the hidden temporary directory, which is renamed into
    place as a whole once complete (per-file fsync would cost 3/4 of the generation time)."""
    with open(path, "wb") as f:
        f.write(data)


def _write_scene(root: Path, folder: str, scene: dict, params: dict) -> None:
    import cv2

    image_id = scene["image_id"]
    ok, jpg = cv2.imencode(".jpg", cv2.cvtColor(scene["image"], cv2.COLOR_RGB2BGR),
                           [cv2.IMWRITE_JPEG_QUALITY, params["jpeg_quality"]])
    if not ok:
        raise RuntimeError(f"JPEG encoding failed for scene {image_id}")
    _put(root / "JPEGImages" / f"{image_id}.jpg", jpg.tobytes())
    _put(root / "SegmentationClass" / f"{image_id}.png", encode_palette_png(scene["class_map"]))
    _put(root / "SegmentationObject" / f"{image_id}.png", encode_palette_png(scene["object_map"]))
    xml_objects = [{"name": o["class"], "bbox_voc": o["bbox_voc"], "truncated": o["truncated"],
                    "difficult": o["difficult"]} for o in scene["objects"]]
    _put(root / "Annotations" / f"{image_id}.xml",
         voc_xml(folder, f"{image_id}.jpg", scene["width"], scene["height"], xml_objects))
    attrs = {k: v for k, v in scene.items() if k not in ("image", "class_map", "object_map")}
    _put(root / "Attributes" / f"{image_id}.json", (json.dumps(attrs, indent=1, sort_keys=True) + "\n").encode())
