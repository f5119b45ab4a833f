"""Generated motion clips, offline, written in the UCF101 layout (``dataset=moving_objects``).

Each video shows one real object crop (a recoloured Fashion-MNIST item of a random class) moving over a crop of
a real photo (the scikit-image/scikit-learn photos of ``scene_generator``). The **action label is the motion
alone**: the object's class, colour, size, start position and orientation are drawn independently of it, and
the trajectories are built so that a single frame carries (almost) no label information: moving left vs right
visits the same positions in the opposite order, rotating clockwise vs counter-clockwise shows the same
orientations, growing vs shrinking the same sizes, and bounce / zigzag / standing still are only told apart by
how the position changes. Only a model that looks at several frames can beat chance.

Classes (``ACTIONS``, UCF101-style CamelCase): MoveLeft, MoveRight, MoveUp, MoveDown, RotateClockwise,
RotateCounterClockwise, Grow, Shrink, Bounce, Zigzag, StandStill. Knobs: ``distractors`` (extra objects
drifting in random directions, independent of the label), ``camera_jitter`` (whole-frame shake in pixels),
``noise`` (Gaussian pixel noise, std in grey levels), ``frame_size``, ``num_frames``, ``classes`` (a subset).

Output, exactly the UCF101 layout (``datamodules.ucf101`` reads it)::

    <out>/UCF-101/<Class>/v_<Class>_gGG_cCC.avi         MJPG, 25 fps; groups g01..g25 share a background
    <out>/ucfTrainTestlist/classInd.txt                 "1 MoveLeft" ... (1-based, CRLF like the original)
    <out>/ucfTrainTestlist/trainlist0{1,2,3}.txt        "<Class>/v_<Class>_gGG_cCC.avi <label>"
    <out>/ucfTrainTestlist/testlist0{1,2,3}.txt         "<Class>/v_<Class>_gGG_cCC.avi"
    <out>/manifest.json                                 generator version, parameters, counts (written last)

Splits follow UCF101: split k tests groups 7k-6..7k, trains on the others. Video ``(class, group, clip)`` draws
from ``SeedSequence([seed, class, group, clip])`` (the background from ``[seed, group]``), so the same seed
gives the same frames. The directory is an ``ArtifactCache`` directory entry (``transferrable.core.artifact_cache``):
generation goes to a hidden temporary directory that is renamed into place; a complete directory with the same
parameters is reused, a damaged one warns and is regenerated.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from datamodules.base import DatasetError
from datamodules.scene_generator import (
    COLOURS,
    FASHION_MNIST_DIR,
    _idx_fingerprint,
    _item_cutout,
    background_photos,
    load_items,
)
from transferrable.core.artifact_cache import ArtifactCache, digest
from transferrable.core.progress import progress as progress_bar

log = logging.getLogger(__name__)

GENERATOR_VERSION = 1
ACTIONS = (
    "MoveLeft", "MoveRight", "MoveUp", "MoveDown", "RotateClockwise", "RotateCounterClockwise",
    "Grow", "Shrink", "Bounce", "Zigzag", "StandStill",
)
N_SPLITS = 3
GROUPS_PER_TEST_SPLIT = 7  # UCF101: split k tests groups 7k-6..7k
FPS = 25


def split_test_groups(split: int) -> range:
    """The UCF101 test groups of ``split`` (1, 2 or 3)."""
    return range(GROUPS_PER_TEST_SPLIT * (split - 1) + 1, GROUPS_PER_TEST_SPLIT * split + 1)


def video_name(action: str, group: int, clip: int) -> str:
    return f"v_{action}_g{group:02d}_c{clip:02d}.avi"


# ---------------------------------------------------------------------------------------------------
# parameters, manifest, reuse
# ---------------------------------------------------------------------------------------------------
def motion_params(
    classes: Sequence[str] | None = None,
    n_groups: int = 25,
    clips_per_group: int = 2,
    num_frames: int = 24,
    frame_size: int | Sequence[int] = 32,
    seed: int = 0,
    distractors: int = 0,
    camera_jitter: float = 1.0,
    noise: float = 4.0,
    object_size: Sequence[float] = (0.35, 0.5),
    data_dir: str | Path = FASHION_MNIST_DIR,
) -> dict:
    """The parameters that determine a generated data set (what the manifest records and compares)."""
    classes = list(ACTIONS if classes is None else classes)
    unknown = [c for c in classes if c not in ACTIONS]
    if unknown or len(set(classes)) != len(classes) or len(classes) < 2:
        raise ValueError(f"dataset.classes={classes}: expected at least 2 distinct names out of {list(ACTIONS)}")
    if isinstance(frame_size, int):
        frame_size = (frame_size, frame_size)
    w, h = (int(v) for v in frame_size)
    if w < 16 or h < 16:
        raise ValueError(f"dataset.frame_size={[w, h]}: expected (width, height), each at least 16")
    if int(n_groups) < GROUPS_PER_TEST_SPLIT * N_SPLITS + 1:
        raise ValueError(f"dataset.n_groups={n_groups}: UCF101 splits need at least {GROUPS_PER_TEST_SPLIT * N_SPLITS + 1}")
    if int(clips_per_group) < 1 or int(num_frames) < 2:
        raise ValueError("dataset.clips_per_group must be >= 1 and dataset.num_frames >= 2")
    lo, hi = (float(v) for v in object_size)
    return {
        "version": GENERATOR_VERSION,
        "classes": classes,
        "n_groups": int(n_groups),
        "clips_per_group": int(clips_per_group),
        "num_frames": int(num_frames),
        "frame_size": [w, h],
        "seed": int(seed),
        "distractors": int(distractors),
        "camera_jitter": float(camera_jitter),
        "noise": float(noise),
        "object_size": [lo, hi],
        "source_files": _idx_fingerprint(Path(os.path.expanduser(str(data_dir)))),
        "backgrounds": sorted(background_photos()),
    }


def motion_key(params: dict) -> str:
    return digest(params, 12, algo="sha1")


def _all_videos(params: dict) -> list[tuple[int, str, int, int]]:
    return [(ci, a, g, c) for ci, a in enumerate(params["classes"])
            for g in range(1, params["n_groups"] + 1) for c in range(1, params["clips_per_group"] + 1)]


def _layout_problem(root: Path, params: dict) -> str | None:
    """Why ``root`` does not hold every video and split list of ``params`` (beyond the manifest's file list)."""
    for _, action, g, c in _all_videos(params):
        if not (root / "UCF-101" / action / video_name(action, g, c)).is_file():
            return f"UCF-101/{action}/{video_name(action, g, c)} is missing"
    lists = root / "ucfTrainTestlist"
    missing = [f"{kind}list0{k}.txt" for kind in ("train", "test") for k in (1, 2, 3)
               if not (lists / f"{kind}list0{k}.txt").is_file()]
    return f"ucfTrainTestlist/{missing[0]} is missing" if missing else None


def _cache(root: Path) -> ArtifactCache:
    return ArtifactCache(root.parent, version=GENERATOR_VERSION, what="generated videos")


def is_complete(root: str | Path, params: dict) -> bool:
    root = Path(root)
    return _cache(root).dir_problem(root, params, lambda r: _layout_problem(r, params)) is None


# ---------------------------------------------------------------------------------------------------
# rendering
# ---------------------------------------------------------------------------------------------------
def _sprite(rng: np.random.Generator, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, int]:
    """A recoloured, shaded Fashion-MNIST item (float RGB, alpha) and its class, on a square canvas so that
    rotating it never clips."""
    cut = None
    while cut is None:
        idx = int(rng.integers(len(images)))
        cut = _item_cutout(images[idx])
    intensity, mask = cut
    colour = np.clip(np.array(COLOURS[str(rng.choice(list(COLOURS)))], np.float32) + rng.uniform(-15, 15, 3), 0, 255)
    side = int(np.ceil(np.hypot(*mask.shape))) + 2
    rgb = np.zeros((side, side, 3), np.float32)
    alpha = np.zeros((side, side), np.float32)
    y0, x0 = (side - mask.shape[0]) // 2, (side - mask.shape[1]) // 2
    sl = (slice(y0, y0 + mask.shape[0]), slice(x0, x0 + mask.shape[1]))
    rgb[sl] = colour * (0.35 + 0.65 * intensity[:, :, None])
    alpha[sl] = mask.astype(np.float32)
    return rgb, alpha, idx


def _trajectory(action: str, rng: np.random.Generator, n: int, w: int, h: int, size: float) -> dict[str, np.ndarray]:
    """Centre x/y (pixels), angle (degrees, counter-clockwise on screen) and scale per frame.

    Everything a single frame shows (position, angle, size) has the same distribution for the paired classes;
    only the order of the frames differs."""
    t = np.linspace(0.0, 1.0, n)
    steps = np.arange(n, dtype=np.float64)
    cx, cy = w * rng.uniform(0.42, 0.58), h * rng.uniform(0.42, 0.58)
    x, y = np.full(n, cx), np.full(n, cy)
    angle = np.full(n, rng.uniform(-25, 25))
    scale = np.ones(n)
    if action in ("MoveLeft", "MoveRight"):
        travel = w * rng.uniform(0.5, 0.7)
        x = cx + travel * (t - 0.5) * (1 if action == "MoveRight" else -1)
    elif action in ("MoveUp", "MoveDown"):
        travel = h * rng.uniform(0.5, 0.7)
        y = cy + travel * (t - 0.5) * (1 if action == "MoveDown" else -1)
    elif action in ("RotateClockwise", "RotateCounterClockwise"):
        omega = rng.uniform(10, 16) * (-1 if action == "RotateClockwise" else 1)
        angle = rng.uniform(-180, 180) + omega * (steps - n / 2)
    elif action in ("Grow", "Shrink"):
        ratio = rng.uniform(2.2, 3.0)
        scale = ratio ** ((t - 0.5) * (1 if action == "Grow" else -1))
    elif action == "Bounce":  # vertical hops off a floor, no net movement
        period = rng.uniform(7, 11)
        amp = h * rng.uniform(0.2, 0.3)
        y = cy + amp / 2 - amp * np.abs(np.sin(np.pi * (steps / period + rng.uniform(0, 1))))
    elif action == "Zigzag":  # horizontal triangle wave with a slow vertical drift
        period = rng.uniform(7, 11)
        amp = w * rng.uniform(0.15, 0.22)
        phase = steps / period + rng.uniform(0, 1)
        x = cx + amp * (2 * np.abs(2 * (phase - np.floor(phase + 0.5))) - 1)
        y = cy + h * rng.uniform(-0.15, 0.15) * (t - 0.5)
    elif action != "StandStill":
        raise ValueError(f"unknown action {action!r}")
    return {"x": x, "y": y, "angle": angle, "scale": scale * size}


def _paste(canvas: np.ndarray, rgb: np.ndarray, alpha: np.ndarray, cx: float, cy: float, angle: float,
           size: float) -> None:
    """Composite the sprite rotated by ``angle`` and scaled so its canvas side is ``size`` pixels, centred at
    (cx, cy)."""
    import cv2

    side = rgb.shape[0]
    m = cv2.getRotationMatrix2D((side / 2, side / 2), float(angle), float(size / side))
    m[0, 2] += cx - side / 2
    m[1, 2] += cy - side / 2
    hh, ww = canvas.shape[:2]
    a = cv2.warpAffine(alpha, m, (ww, hh), flags=cv2.INTER_LINEAR, borderValue=0)[:, :, None]
    c = cv2.warpAffine(rgb, m, (ww, hh), flags=cv2.INTER_LINEAR, borderValue=0)
    canvas *= 1 - a
    canvas += c * a


def _background(rng: np.random.Generator, photos: dict, names: list[str], w: int, h: int) -> np.ndarray:
    import cv2

    photo = photos[names[int(rng.integers(len(names)))]]
    ph, pw = photo.shape[:2]
    side = int(min(ph, pw) * rng.uniform(0.3, 0.7))
    cw, ch = side, int(side * h / w)
    x0, y0 = int(rng.integers(0, pw - cw + 1)), int(rng.integers(0, ph - ch + 1))
    patch = cv2.resize(photo[y0:y0 + ch, x0:x0 + cw], (w, h), interpolation=cv2.INTER_AREA).astype(np.float32)
    return 0.35 * patch + 0.65 * 90.0  # lower contrast, so the object stays the salient thing


def render_video(params: dict, class_index: int, group: int, clip: int, items: np.ndarray,
                 photos: dict) -> np.ndarray:
    """The frames (uint8, T x H x W x 3 RGB) of one video; a pure function of the parameters and indices."""
    w, h = params["frame_size"]
    n = params["num_frames"]
    jitter = params["camera_jitter"]
    margin = int(np.ceil(jitter))
    bg = _background(np.random.default_rng(np.random.SeedSequence([params["seed"], group])), photos,
                     params["backgrounds"], w + 2 * margin, h + 2 * margin)
    rng = np.random.default_rng(np.random.SeedSequence([params["seed"], class_index, group, clip]))
    side = min(w, h)
    lo, hi = params["object_size"]
    sprite = _sprite(rng, items)
    size = side * rng.uniform(lo, hi) * sprite[0].shape[0] / 28.0
    main = _trajectory(params["classes"][class_index], rng, n, w, h, size)
    others = []
    for _ in range(params["distractors"]):
        spr = _sprite(rng, items)
        start = rng.uniform(0.1, 0.9, 2) * (w, h)
        vel = rng.normal(0, 0.3, 2) * side / n * 2
        others.append((spr, start, vel, side * rng.uniform(0.5, 0.8) * lo * spr[0].shape[0] / 28.0,
                       rng.uniform(-180, 180), rng.normal(0, 4)))
    shakes = rng.uniform(-jitter, jitter, size=(n, 2)) if jitter > 0 else np.zeros((n, 2))
    noise = rng.normal(0.0, params["noise"], size=(n, h, w, 3)) if params["noise"] > 0 else 0.0
    frames = np.empty((n, h + 2 * margin, w + 2 * margin, 3), np.float32)
    for i in range(n):
        canvas = bg.copy()
        for (rgb, alpha, _), start, vel, osize, a0, spin in others:
            pos = start + vel * i
            _paste(canvas, rgb, alpha, pos[0] + margin, pos[1] + margin, a0 + spin * i, osize)
        _paste(canvas, sprite[0], sprite[1], main["x"][i] + margin, main["y"][i] + margin, main["angle"][i],
               main["scale"][i])
        frames[i] = canvas
    out = np.empty((n, h, w, 3), np.float32)
    for i in range(n):  # camera shake: a sub-pixel shift of the whole frame
        import cv2

        m = np.float32([[1, 0, shakes[i, 0] - margin], [0, 1, shakes[i, 1] - margin]])
        out[i] = cv2.warpAffine(frames[i], m, (w, h), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_REFLECT)
    return np.clip(out + noise, 0, 255).round().astype(np.uint8)


def write_avi(path: str | Path, frames: np.ndarray, fps: int = FPS) -> None:
    """Write RGB frames as an MJPG .avi (what OpenCV writes everywhere without extra codecs)."""
    import cv2

    n, h, w = frames.shape[:3]
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (w, h))
    if not writer.isOpened():
        raise DatasetError(f"OpenCV cannot open a MJPG writer for {path}")
    try:
        for f in frames:
            writer.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    finally:
        writer.release()


def _write_lists(root: Path, params: dict) -> dict[str, int]:
    lists = root / "ucfTrainTestlist"
    lists.mkdir(parents=True, exist_ok=True)
    crlf = "\r\n"
    classes = params["classes"]
    (lists / "classInd.txt").write_text("".join(f"{i + 1} {a}{crlf}" for i, a in enumerate(classes)), newline="")
    counts = {}
    for k in range(1, N_SPLITS + 1):
        test = set(split_test_groups(k))
        train_lines, test_lines = [], []
        for ci, action, g, c in _all_videos(params):
            rel = f"{action}/{video_name(action, g, c)}"
            (test_lines.append(rel) if g in test else train_lines.append(f"{rel} {ci + 1}"))
        (lists / f"trainlist0{k}.txt").write_text("".join(x + crlf for x in train_lines), newline="")
        (lists / f"testlist0{k}.txt").write_text("".join(x + crlf for x in test_lines), newline="")
        counts[f"split{k}"] = {"train": len(train_lines), "test": len(test_lines)}
    return counts


def generate_motions(out_dir: str | Path, progress: bool = True, **kwargs) -> Path:
    """Generate (or reuse) the clips in ``out_dir/<key>`` and return that directory (the UCF101 root).

    ``kwargs`` are :func:`motion_params`'s. Raises ``DatasetError`` when the Fashion-MNIST IDX files are missing.
    """
    params = motion_params(**kwargs)
    root = Path(os.path.expanduser(str(out_dir))) / motion_key(params)
    return _cache(root).get_or_build(params, lambda tmp: _write_dataset(tmp, params, _all_videos(params), progress),
                                     kind="dir", name=root.name, validate=lambda r: _layout_problem(r, params))


def _write_dataset(root: Path, params: dict, videos: list, progress: bool) -> dict:
    """The UCF101 layout under ``root``; returns the manifest's extra fields (the cache writes the manifest last)."""
    log.info("moving_objects: generating %d videos", len(videos))
    items = load_items(params["source_files"]["data_dir"], json.dumps(params["source_files"], sort_keys=True))
    images = items["train"][0]
    photos = background_photos()
    for ci, action, g, c in progress_bar(videos, "generating moving_objects videos", enabled=progress, unit="video"):
        d = root / "UCF-101" / action
        d.mkdir(parents=True, exist_ok=True)
        write_avi(d / video_name(action, g, c), render_video(params, ci, g, c, images, photos))
    counts = _write_lists(root, params)
    return {"generator": "datamodules.motion_generator", "videos": len(videos), "splits": counts}
