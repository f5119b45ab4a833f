"""A generated world of object categories, offline: IFS fractals in colour on clutter, in real datasets' layouts.

The thesis transfers a representation learned on ImageNet (1,000 object categories in clutter) to *novel*
categories (Caltech-101), to the same categories imaged differently (Office-31) and to scenes (VOC). Offline we
have no such photos, so this module makes a world with the same roles:

* an **object category** is an iterated function system (IFS) code -- 2 to 4 contractive affine maps sampled
  well-conditioned by their singular values (the "sigma-factor" of Anderson & Farrell, *Improving Fractal
  Pre-training*, WACV 2022), filtered by how much of its box the attractor fills (as FractalDB does, Kataoka et al.,
  ACCV 2020). Categories are numbered; category ``i`` of a *category set* is a pure function of
  ``(world_seed, set offset + i)``, and the sets are disjoint by construction, so a target's categories are never
  the source's;
* an **instance** is the category's code with every parameter perturbed a little (a new object of the same kind),
  seen at a random rotation (+-20 deg), mirroring, scale and position, coloured by a random three-colour palette
  along the chaos game's map history (colour is not a class cue);
* the **clutter** is a crop of the photos shipped with scikit-image/scikit-learn, a dead-leaves image (Baradad et
  al., *Learning to See by Looking at Noise*, NeurIPS 2021) or a plain gradient, with fragments of other fractals
  (a distractor set disjoint from every category set) behind the object.

Roles and layouts (what the real loaders read; ``datamodules/fractal_world.py`` has the DataModules):

=============  ==============================================  ===========================================
role           layout under the generated directory             like
=============  ==============================================  ===========================================
``imagenet``   ``FractalNet/{train,val}/<class>/<class>_<i>.JPEG``  ImageNet (train/ and val/ class folders)
``caltech``    ``101_ObjectCategories/<class>/image_<i>.jpg``  Caltech-101 (30 per class for training)
``office``     ``office31/<domain>/images/<class>/frame_<i>.jpg``  Office-31 (amazon, webcam, dslr)
=============  ==============================================  ===========================================

Category sets: ``source`` (the ImageNet role), ``validation`` (a Caltech-role target kept apart, on which the
default source is chosen), ``caltech`` (the test target), ``office`` (Office-role classes). Office's domains:
``amazon`` -- product shots: a different instance per image, centred, large, on a plain light background, sharp;
``dslr`` -- five instances per class (shared with webcam, as in Office-31), photographed in clutter at 64 px;
``webcam`` -- the same five instances in clutter, at low resolution (blurred up from 20-26 px), with a colour cast,
sensor noise and strong JPEG compression.

Everything is a function of the parameters: image ``i`` of class ``c`` draws from its own ``SeedSequence``, so the
same parameters give the same bytes. A directory is an ``ArtifactCache`` entry (manifest written last, built in a
hidden sibling and renamed), reused when complete and regenerated when damaged.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from datamodules.base import DatasetError
from transferrable.core.artifact_cache import ArtifactCache, digest
from transferrable.core.progress import progress as progress_bar

log = logging.getLogger(__name__)

GENERATOR_VERSION = 2  # 2: clutter at half contrast, larger source objects (1 did not train from scratch)
ROLES = ("imagenet", "caltech", "office")
CATEGORY_SETS = {"source": 0, "validation": 1_000_000, "caltech": 2_000_000, "office": 3_000_000}
DISTRACTOR_OFFSET = 9_000_000  # fragments in the clutter: a set no category set draws from
N_DISTRACTORS = 512
OFFICE_DOMAINS = ("amazon", "webcam", "dslr")
OFFICE_INSTANCES = 5  # per class, shared by webcam and dslr (amazon: a new instance per image)
LAYOUT_ROOT = {"imagenet": "FractalNet", "caltech": "101_ObjectCategories", "office": "office31"}
FILL_RANGE = (0.12, 0.75)  # occupied fraction of the attractor's 24x24 box grid (FractalDB-like filter)
ALPHA_GAIN = 2.5  # opacity of a pixel = 1 - exp(-gain * its point count / the mean count of covered pixels)
WALKERS, BURN_IN, COLLECT = 1024, 8, 10  # chaos game: parallel points, discarded and kept iterations


# ---------------------------------------------------------------------------------------------------
# categories: IFS codes
# ---------------------------------------------------------------------------------------------------
def _rotation(t: float) -> np.ndarray:
    c, s = np.cos(t), np.sin(t)
    return np.array([[c, -s], [s, c]])


def sample_code(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One well-conditioned IFS code: (A [n,2,2], b [n,2], map probabilities [n]).

    ``A_k = R(theta_k) diag(s_k1, s_k2) R(phi_k) diag(d_k)`` with ``sum_k (s_k1 + 2 s_k2)`` (the sigma-factor)
    drawn from ``[(5 + n) / 2, (6 + n) / 2]`` and every ``s <= 1`` (Anderson & Farrell 2022)."""
    n = int(rng.integers(2, 5))
    alpha = rng.uniform(0.5 * (5 + n), 0.5 * (6 + n))
    while True:
        s = np.sort(rng.uniform(0.05, 1.0, size=(n, 2)), axis=1)[:, ::-1]
        s *= alpha / float((s[:, 0] + 2 * s[:, 1]).sum())
        if s.max() < 0.98:
            break
    mats = []
    for k in range(n):
        d = np.diag(rng.choice([-1.0, 1.0], size=2))
        mats.append(_rotation(rng.uniform(0, 2 * np.pi)) @ np.diag(s[k]) @ _rotation(rng.uniform(0, 2 * np.pi)) @ d)
    A = np.stack(mats)
    b = rng.uniform(-1.0, 1.0, size=(n, 2))
    p = np.abs(np.linalg.det(A)) + 1e-3
    return A, b, p / p.sum()


def chaos_game(A: np.ndarray, b: np.ndarray, p: np.ndarray, rng: np.random.Generator,
               walkers: int = WALKERS) -> tuple[np.ndarray, np.ndarray]:
    """Points of the attractor (after a burn-in) and a colour coordinate in [0, 1] from each point's map history."""
    n = len(p)
    x, y = rng.uniform(-1, 1, size=(2, walkers))
    c = rng.uniform(0, 1, size=walkers)
    shade = np.linspace(0.0, 1.0, n) if n > 1 else np.zeros(1)
    cum = np.cumsum(p)
    a, bb, cc, dd = A[:, 0, 0], A[:, 0, 1], A[:, 1, 0], A[:, 1, 1]
    pts, cols = [], []
    for t in range(BURN_IN + COLLECT):
        k = np.minimum(np.searchsorted(cum, rng.uniform(size=walkers)), n - 1)
        x, y = a[k] * x + bb[k] * y + b[k, 0], cc[k] * x + dd[k] * y + b[k, 1]
        c = 0.5 * (c + shade[k])
        if t >= BURN_IN:
            pts.append(np.stack([x, y], axis=1))
            cols.append(c)
    return np.concatenate(pts), np.concatenate(cols)


def normalise(points: np.ndarray) -> np.ndarray:
    """Points centred and scaled into the unit square, aspect kept."""
    lo, hi = points.min(axis=0), points.max(axis=0)  # after the burn-in every point is on the attractor
    extent = float(max(hi - lo).max()) if np.all(np.isfinite([lo, hi])) else 0.0
    if extent <= 1e-9:
        return np.full_like(points, 0.5)
    return (points - (lo + hi) / 2) / extent + 0.5


def fill_fraction(points: np.ndarray, grid: int = 24) -> float:
    q = np.clip((normalise(points) * grid).astype(int), 0, grid - 1)
    return len(np.unique(q[:, 1] * grid + q[:, 0])) / grid**2


@lru_cache(maxsize=8192)
def category_code(world_seed: int, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Category ``index`` of the world: the first sampled code whose attractor fills its box within
    ``FILL_RANGE`` (rejection sampling, deterministic from ``(world_seed, index)``)."""
    rng = np.random.default_rng(np.random.SeedSequence([world_seed, 17, index]))
    for _ in range(200):
        A, b, p = sample_code(rng)
        pts, _ = chaos_game(A, b, p, rng, walkers=512)
        if FILL_RANGE[0] <= fill_fraction(pts) <= FILL_RANGE[1]:
            return A, b, p
    return A, b, p  # pragma: no cover - 200 rejections in a row have not been seen


def perturb(code, rng: np.random.Generator, amount: float = 0.04):
    """A new instance of the category: every matrix entry and translation moved by N(0, amount), kept contractive."""
    A, b, p = code
    A = A + rng.normal(0, amount, size=A.shape)
    top = np.linalg.svd(A, compute_uv=False)[:, 0]
    A = A * np.minimum(1.0, 0.97 / top)[:, None, None]
    b = b + rng.normal(0, amount, size=b.shape)
    return A, b, p


# ---------------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------------
def _palette(rng: np.random.Generator) -> np.ndarray:
    """Three saturated colours (RGB 0..255) a point's colour coordinate interpolates between."""
    import colorsys

    hues = (rng.uniform() + np.array([0.0, rng.uniform(0.15, 0.5), rng.uniform(0.5, 0.85)])) % 1.0
    return np.array([colorsys.hsv_to_rgb(h, rng.uniform(0.55, 1.0), rng.uniform(0.55, 1.0)) for h in hues]) * 255


def render_object(code, rng: np.random.Generator, size: float, angle: float, mirror: bool
                  ) -> tuple[np.ndarray, np.ndarray]:
    """(colour float32 [h,w,3], alpha [h,w] in [0,1]) of one instance drawn in a ``size``-pixel box."""
    import cv2

    pts, col = chaos_game(*code, rng)
    pts = normalise(pts) - 0.5
    if mirror:
        pts[:, 0] = -pts[:, 0]
    pts = pts @ _rotation(np.deg2rad(angle)).T + 0.5
    side = max(2, int(round(size)))
    ss = 2  # supersampling
    g = side * ss
    q = np.floor(pts * g).astype(np.int64)
    keep = (q >= 0).all(1) & (q < g).all(1)
    q, col = q[keep], col[keep]
    flat = q[:, 1] * g + q[:, 0]
    count = np.bincount(flat, minlength=g * g).astype(np.float32)
    pal = _palette(rng)
    t = col * 2.0  # 0..2 over the three anchors
    lo = np.minimum(t.astype(int), 1)
    frac = (t - lo)[:, None]
    rgb = pal[lo] * (1 - frac) + pal[lo + 1] * frac
    sums = np.stack([np.bincount(flat, weights=rgb[:, ch], minlength=g * g) for ch in range(3)], axis=1)
    count = cv2.resize(count.reshape(g, g), (side, side), interpolation=cv2.INTER_AREA)
    sums = cv2.resize(sums.reshape(g, g, 3).astype(np.float32), (side, side), interpolation=cv2.INTER_AREA)
    colour = sums / np.maximum(count, 1e-6)[..., None]
    occupied = count[count > 0]
    scale = float(occupied.mean()) if occupied.size else 1.0
    alpha = 1.0 - np.exp(-ALPHA_GAIN * count / scale)
    return colour.astype(np.float32), alpha.astype(np.float32)


def paste(canvas: np.ndarray, colour: np.ndarray, alpha: np.ndarray, x0: int, y0: int, opacity: float = 1.0) -> None:
    """Alpha-blend ``colour`` onto ``canvas`` (float32 HxWx3) at (x0, y0), clipped at the borders."""
    h, w = canvas.shape[:2]
    oh, ow = alpha.shape
    xa, ya, xb, yb = max(0, x0), max(0, y0), min(w, x0 + ow), min(h, y0 + oh)
    if xa >= xb or ya >= yb:
        return
    a = alpha[ya - y0 : yb - y0, xa - x0 : xb - x0, None] * opacity
    canvas[ya:yb, xa:xb] = canvas[ya:yb, xa:xb] * (1 - a) + colour[ya - y0 : yb - y0, xa - x0 : xb - x0] * a


def dead_leaves(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Occluding discs of random colours with power-law radii (Baradad et al.'s dead-leaves model)."""
    import cv2

    img = np.full((h, w, 3), rng.uniform(0, 255, size=3), dtype=np.float32)
    side = max(w, h)
    for _ in range(int(rng.integers(15, 40))):
        # radii with density ~ r^-3 between 4% and 40% of the side (a scale-invariant leaf size distribution)
        lo_r, hi_r = 0.04 * side, 0.4 * side
        r = int(round(1.0 / np.sqrt(rng.uniform(1 / hi_r**2, 1 / lo_r**2))))
        cv2.circle(img, (int(rng.integers(0, w)), int(rng.integers(0, h))), max(2, r), rng.uniform(0, 255, size=3).tolist(), -1)
    return img


def plain(rng: np.random.Generator, w: int, h: int, light: bool = False) -> np.ndarray:
    """A flat colour with a soft linear gradient (a light one for product shots)."""
    base = rng.uniform(215, 250, size=3) if light else rng.uniform(0, 255, size=3)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    direction = rng.normal(size=2)
    ramp = (xx * direction[0] + yy * direction[1]) / (np.abs(direction).sum() * max(w, h))
    return np.clip(base[None, None, :] + (12 if light else 40) * ramp[..., None], 0, 255).astype(np.float32)


def photo_crop(rng: np.random.Generator, photos: dict, names: list[str], w: int, h: int) -> np.ndarray:
    import cv2

    photo = photos[names[int(rng.integers(len(names)))]]
    ph, pw = photo.shape[:2]
    cw = max(8.0, min(pw, ph * w / h) * rng.uniform(0.15, 0.8))
    ch = cw * h / w
    x0 = int(rng.integers(0, max(1, int(pw - cw) + 1)))
    y0 = int(rng.integers(0, max(1, int(ph - ch) + 1)))
    patch = cv2.resize(photo[y0 : y0 + int(ch), x0 : x0 + int(cw)], (w, h), interpolation=cv2.INTER_AREA)
    return (patch[:, ::-1] if rng.random() < 0.5 else patch).astype(np.float32)


def background(rng: np.random.Generator, kind: str, w: int, h: int, photos: dict, names: list[str],
               contrast: float = 1.0) -> np.ndarray:
    """A ``kind`` background (mixed: photo 40%, dead leaves 30%, plain 30%); clutter's contrast scaled by
    ``contrast`` around its mean (the object stays the most salient thing, as in a photograph of it)."""
    if kind == "mixed":
        kind = str(rng.choice(["photo", "leaves", "plain"], p=[0.4, 0.3, 0.3]))
    if kind == "photo":
        img = photo_crop(rng, photos, names, w, h)
    elif kind == "leaves":
        img = dead_leaves(rng, w, h)
    else:
        return plain(rng, w, h, light=kind == "light")
    mean = img.mean(axis=(0, 1), keepdims=True)
    return mean + contrast * (img - mean)


# how each role / domain frames its objects: scale range (object box / image side), centre jitter (fraction of
# the side; None = anywhere the object fits), max rotation (deg), background, the clutter's contrast (1 = as is;
# at full contrast caffenet_mini did not learn 100 categories from scratch in 1,500 steps, at 0.5 it did),
# distractors (min, max), image side
STYLES = {
    "imagenet": dict(scale=(0.5, 1.0), jitter=None, angle=20, bg="mixed", contrast=0.5, distractors=(0, 1), side=32),
    "caltech": dict(scale=(0.55, 0.9), jitter=0.08, angle=15, bg="mixed", contrast=0.5, distractors=(0, 2), side=48),
    "amazon": dict(scale=(0.75, 0.95), jitter=0.03, angle=0, bg="light", contrast=1.0, distractors=(0, 0), side=48),
    "dslr": dict(scale=(0.45, 0.8), jitter=0.12, angle=20, bg="mixed", contrast=0.6, distractors=(1, 3), side=64),
    "webcam": dict(scale=(0.45, 0.8), jitter=0.12, angle=20, bg="mixed", contrast=0.6, distractors=(1, 3), side=48),
}


def render_image(world_seed: int, category: int, instance: int, view_seed: tuple, style: dict,
                 photos: dict, names: list[str], degrade: bool = False) -> np.ndarray:
    """One uint8 RGB image: instance ``instance`` of category ``category`` seen as ``style`` says."""
    import cv2

    rng = np.random.default_rng(np.random.SeedSequence([world_seed, 29, *view_seed]))
    side = int(style["side"])
    canvas = background(rng, style["bg"], side, side, photos, names, style.get("contrast", 1.0))
    for _ in range(int(rng.integers(style["distractors"][0], style["distractors"][1] + 1))):
        code = category_code(world_seed, DISTRACTOR_OFFSET + int(rng.integers(N_DISTRACTORS)))
        size = side * rng.uniform(0.2, 0.45)
        col, a = render_object(code, rng, size, rng.uniform(0, 360), bool(rng.random() < 0.5))
        paste(canvas, col, a, int(rng.integers(-size // 3, side - size // 2)), int(rng.integers(-size // 3, side - size // 2)), 0.85)
    inst_rng = np.random.default_rng(np.random.SeedSequence([world_seed, 31, category, instance]))
    code = perturb(category_code(world_seed, category), inst_rng)
    size = side * rng.uniform(*style["scale"])
    angle = rng.uniform(-style["angle"], style["angle"]) if style["angle"] else 0.0
    col, a = render_object(code, rng, size, angle, bool(rng.random() < 0.5))
    if style["jitter"] is None:
        x0, y0 = (int(rng.uniform(0, max(1.0, side - size))) for _ in range(2))
    else:
        x0, y0 = (int(round((side - size) / 2 + rng.normal(0, style["jitter"]) * side)) for _ in range(2))
    paste(canvas, col, a, x0, y0)
    if degrade:  # webcam: low resolution, colour cast, sensor noise (JPEG quality is the writer's)
        small = int(rng.integers(20, 27))
        canvas = cv2.resize(cv2.resize(canvas, (small, small), interpolation=cv2.INTER_AREA), (side, side),
                            interpolation=cv2.INTER_LINEAR)
        canvas = canvas * rng.uniform(0.75, 1.25, size=3)[None, None, :] + rng.uniform(-20, 20)
        canvas = canvas + rng.normal(0, 6, size=canvas.shape)
    return np.clip(canvas, 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------
# parameters, layout, reuse
# ---------------------------------------------------------------------------------------------------
def world_params(role: str, n_classes: int, images_per_class: int, world_seed: int = 0, category_set: str | None = None,
                 val_per_class: int = 0, jpeg_quality: int = 90) -> dict:
    """The parameters that determine a generated directory (what its manifest records and compares)."""
    if role not in ROLES:
        raise DatasetError(f"dataset.role={role!r}: expected one of {list(ROLES)}")
    category_set = category_set or {"imagenet": "source", "caltech": "caltech", "office": "office"}[role]
    if category_set not in CATEGORY_SETS:
        raise DatasetError(f"dataset.category_set={category_set!r}: expected one of {list(CATEGORY_SETS)}")
    if int(n_classes) < 2 or int(images_per_class) < 2:
        raise DatasetError(f"dataset.n_classes={n_classes}, dataset.images_per_class={images_per_class}: expected >= 2 each")
    if role == "imagenet" and int(val_per_class) < 1:
        raise DatasetError(f"dataset.val_per_class={val_per_class}: the ImageNet role needs >= 1 val image per class")
    from datamodules.scene_generator import background_photos

    return {
        "version": GENERATOR_VERSION, "role": role, "category_set": category_set, "n_classes": int(n_classes),
        "images_per_class": int(images_per_class), "val_per_class": int(val_per_class) if role == "imagenet" else 0,
        "world_seed": int(world_seed), "jpeg_quality": int(jpeg_quality), "backgrounds": sorted(background_photos()),
    }


def world_key(params: dict) -> str:
    return digest(params, 12, algo="sha1")


def class_names(params: dict) -> list[str]:
    prefix = {"source": "n", "validation": "v", "caltech": "c", "office": "o"}[params["category_set"]]
    return [f"{prefix}{CATEGORY_SETS[params['category_set']] + i:07d}" for i in range(params["n_classes"])]


def expected_files(params: dict) -> list[str]:
    """Every image's path below the generated directory, in generation order."""
    names, n = class_names(params), params["images_per_class"]
    if params["role"] == "imagenet":
        return [f"FractalNet/{split}/{c}/{c}_{i:05d}.JPEG" for c in names
                for split, count in (("train", n), ("val", params["val_per_class"])) for i in range(count)]
    if params["role"] == "caltech":
        return [f"101_ObjectCategories/{c}/image_{i + 1:04d}.jpg" for c in names for i in range(n)]
    return [f"office31/{d}/images/{c}/frame_{i + 1:04d}.jpg" for d in OFFICE_DOMAINS for c in names for i in range(n)]


def data_root(generated: Path, params: dict, domain: str | None = None) -> Path:
    """The directory a loader's ``data_dir`` points at (an Office domain's ``<domain>/images``)."""
    base = generated / LAYOUT_ROOT[params["role"]]
    if params["role"] != "office":
        return base
    if domain not in OFFICE_DOMAINS:
        raise DatasetError(f"dataset.domain={domain!r}: expected one of {list(OFFICE_DOMAINS)}")
    return base / domain / "images"


def _layout_problem(root: Path, params: dict) -> str | None:
    for rel in expected_files(params)[:: max(1, len(expected_files(params)) // 64)]:
        if not (root / rel).is_file():
            return f"{rel} is missing"
    return None


def generate_world(out_dir: str | Path, params: dict, progress: bool = True) -> Path:
    """Generate (or reuse) ``out_dir/<world_key>`` and return it."""
    root = Path(os.path.expanduser(str(out_dir))) / world_key(params)
    cache = ArtifactCache(root.parent, version=GENERATOR_VERSION, what="generated fractal world")
    return cache.get_or_build(params, lambda tmp: _write(tmp, params, progress), kind="dir", name=root.name,
                              validate=lambda r: _layout_problem(r, params))


def _views(params: dict):
    """(relative path, category, instance, view seed, style, degrade) of every image, in ``expected_files`` order."""
    offset = CATEGORY_SETS[params["category_set"]]
    names, n = class_names(params), params["images_per_class"]
    paths = iter(expected_files(params))
    if params["role"] == "imagenet":
        for ci in range(len(names)):
            for split, count in (("train", n), ("val", params["val_per_class"])):
                for i in range(count):
                    inst = i if split == "train" else n + i
                    yield next(paths), offset + ci, inst, (offset + ci, inst), STYLES["imagenet"], False
    elif params["role"] == "caltech":
        for ci in range(len(names)):
            for i in range(n):
                yield next(paths), offset + ci, i, (offset + ci, i), STYLES["caltech"], False
    else:
        for d, domain in enumerate(OFFICE_DOMAINS):
            for ci in range(len(names)):
                for i in range(n):
                    # amazon: a new product per image; webcam and dslr: the same few instances, other views
                    inst = i if domain == "amazon" else 100_000 + i % OFFICE_INSTANCES
                    yield (next(paths), offset + ci, inst, (offset + ci, inst, d, i), STYLES[domain],
                           domain == "webcam")


def _write(root: Path, params: dict, progress: bool) -> dict:
    import cv2

    from datamodules.scene_generator import background_photos

    photos = background_photos()
    names = params["backgrounds"]
    missing = [b for b in names if b not in photos]
    if missing:
        raise DatasetError(f"background photos {missing} are not available on this machine")
    total = len(expected_files(params))
    made: set[Path] = set()
    desc = f"generating {params['role']}-role images ({params['category_set']} categories)"
    for rel, category, inst, view, style, degrade in progress_bar(_views(params), desc, total, enabled=progress,
                                                                  unit="img", leave=True):
        img = render_image(params["world_seed"], category, inst, view, style, photos, names, degrade)
        path = root / rel
        if path.parent not in made:
            path.parent.mkdir(parents=True, exist_ok=True)
            made.add(path.parent)
        quality = 45 if degrade else params["jpeg_quality"]
        ok, buf = cv2.imencode(".jpg", img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:  # pragma: no cover
            raise DatasetError(f"could not encode {path}")
        path.write_bytes(buf.tobytes())
    return {"generator": "datamodules.fractal_generator", "classes": class_names(params), "images": total}
