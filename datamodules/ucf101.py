"""UCF101 (``dataset=ucf101``): videos in the standard layout, decoded once, cut into clips for LRCN.

Layout under ``data_dir`` (what the UCF101 archive and its split zip extract to)::

    UCF-101/<Class>/v_<Class>_gGG_cCC.avi
    ucfTrainTestlist/classInd.txt                "1 ApplyEyeMakeup" ...
    ucfTrainTestlist/trainlist0{1,2,3}.txt       "<Class>/<video>.avi <label>"
    ucfTrainTestlist/testlist0{1,2,3}.txt        "<Class>/<video>.avi"

A folder of pre-extracted frames (``<Class>/<video>/`` of images, named like the video without ``.avi``) is
read in place of a video file that is not there.

Decoding (OpenCV ``VideoCapture``) happens once per video: frames are resized to ``frame_size`` (width, height;
the thesis: 320x240, then 227x227 crops) and cached as uint8 ``.npy`` under ``cache_dir`` (atomic writes; the
key covers the file's path, size and mtime and the decoding settings). ``modality=flow`` computes dense optical
flow between consecutive frames with OpenCV (Farnebäck, or TV-L1 from contrib's ``cv2.optflow``), once per video,
as a 3-channel "flow image": x and y scaled so that ``flow.bound`` pixels reach +-128 (clipped), plus the
magnitude of the scaled flow (clipped to 128); the last frame repeats the last flow so there are as many
flow frames as video frames.

Training items are random ``clip_length``-frame clips with a random ``input_size`` crop and (``mirror``) a random
horizontal flip; a flipped flow clip has its x channel negated. Validation/test items are whole videos
(centre crop); the LRCN module cuts them into clips with ``test_stride`` and averages per video.

Bad input policy (counted in ``summary``): an unreadable or zero-frame video, or a split line naming a missing
video, is a one-line error naming the file (``bad_videos=error``, default), or is left out and counted
(``bad_videos=skip``). A video shorter than ``clip_length`` is looped (``short_videos=loop``: frames 0,1,..,n-1,0,1,..)
or padded with its last frame (``short_videos=pad``), counted as ``short_videos``. A training-list label that
disagrees with ``classInd.txt`` for the video's class folder, or a class folder missing from it, is an error
naming the list file and line.
"""

from __future__ import annotations

import io
import logging
import os
import re
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.base import DatasetError
from datamodules.file_checks import kind_fault
from transferrable.core.archives import resolve_data_dir
from transferrable.core.artifact_cache import ABSENT, NO_MANIFEST, ArtifactCache, Unusable, digest
from transferrable.core.progress import progress as progress_bar

log = logging.getLogger(__name__)

VIDEO_DIR = "UCF-101"
LISTS_DIR = "ucfTrainTestlist"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
GROUP_RE = re.compile(r"_g(\d+)_c\d+")
FLOW_METHODS = ("farneback", "tvl1")


# ---------------------------------------------------------------------------------------------------
# split lists
# ---------------------------------------------------------------------------------------------------
def read_class_index(path: Path) -> list[str]:
    """``classInd.txt`` -> class names in label order (labels 1..K, consecutive)."""
    why = kind_fault(path, "file")
    if why:
        raise DatasetError(f"class index {path} {why} (expected a file of lines '<1-based label> <ClassName>')")
    pairs = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        if len(parts) != 2 or not parts[0].isdigit():
            raise DatasetError(f"{path}:{n}: expected '<label> <ClassName>', got {line.strip()!r}")
        pairs.append((int(parts[0]), parts[1]))
    labels = [p[0] for p in pairs]
    if labels != list(range(1, len(pairs) + 1)):
        raise DatasetError(f"{path}: labels must be 1..{len(pairs)} in order, got {labels[:10]}...")
    return [p[1] for p in pairs]


def read_split_list(path: Path, classes: list[str]) -> list[tuple[str, int]]:
    """A train/test list -> [(relative video path, 0-based label)]; the label comes from the class folder and
    must agree with a training list's own label column."""
    why = kind_fault(path, "file")
    if why:
        raise DatasetError(f"split list {path} {why} (expected a file of '<Class>/<video>.avi [<label>]' lines)")
    index = {c: i for i, c in enumerate(classes)}
    out = []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        parts = line.split()
        if not parts:
            continue
        rel = parts[0]
        folder = rel.split("/")[0]
        if folder not in index:
            raise DatasetError(f"{path}:{n}: class folder {folder!r} of {rel} is not in classInd.txt")
        label = index[folder]
        if len(parts) > 1 and (not parts[1].isdigit() or int(parts[1]) - 1 != label):
            raise DatasetError(
                f"{path}:{n}: label {parts[1]} for {rel} disagrees with classInd.txt ({folder} is {label + 1})"
            )
        out.append((rel, label))
    return out


def video_group(rel: str) -> int | None:
    m = GROUP_RE.search(Path(rel).stem)
    return int(m.group(1)) if m else None


# ---------------------------------------------------------------------------------------------------
# decoding, flow, the on-disk cache
# ---------------------------------------------------------------------------------------------------
def decode_video(path: str | Path, frame_size: Sequence[int] | None = None, max_frames: int | None = None) -> np.ndarray:
    """All frames of a video file (or a folder of frame images) as uint8 T x H x W x 3 RGB, resized to
    ``frame_size`` (width, height). Unreadable or empty input is a ``DatasetError`` naming the file."""
    import cv2

    path = Path(path)
    frames = []
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        for f in files[:max_frames]:
            img = cv2.imread(str(f), cv2.IMREAD_COLOR)
            if img is None:
                raise DatasetError(f"unreadable frame image {f}")
            frames.append(img)
    else:
        why = kind_fault(path, "file") or ("empty file (0 bytes)" if path.stat().st_size == 0 else None)
        if why:
            raise DatasetError(f"unreadable video {path}: {why} (expected a video file OpenCV decodes)")
        cap = cv2.VideoCapture(str(path))
        try:
            if not cap.isOpened():
                raise DatasetError(f"unreadable video {path}: OpenCV cannot open it")
            while max_frames is None or len(frames) < max_frames:
                ok, frame = cap.read()
                if not ok:
                    break
                frames.append(frame)
        finally:
            cap.release()
    if not frames:
        raise DatasetError(f"unreadable video {path}: no frames decoded")
    if frame_size is not None:
        w, h = (int(v) for v in frame_size)
        frames = [f if f.shape[1::-1] == (w, h) else cv2.resize(f, (w, h), interpolation=cv2.INTER_AREA) for f in frames]
    return np.stack([cv2.cvtColor(f, cv2.COLOR_BGR2RGB) for f in frames])


def compute_flow(frames: np.ndarray, method: str = "farneback", bound: float = 20.0) -> np.ndarray:
    """Dense optical flow between consecutive frames as float16 T x H x W x 3: x, y in [-128, 128] (``bound``
    pixels -> 128) and the magnitude of that scaled flow clipped to [0, 128]. The last flow is repeated."""
    import cv2

    if method not in FLOW_METHODS:
        raise DatasetError(f"dataset.flow.method={method!r}: expected one of {list(FLOW_METHODS)}")
    gray = [cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames]
    tvl1 = cv2.optflow.DualTVL1OpticalFlow_create() if method == "tvl1" else None
    flows = []
    for a, b in zip(gray[:-1], gray[1:], strict=True):
        if tvl1 is not None:
            flow = tvl1.calc(a, b, None)
        else:
            # small windows and few levels: frames here are tens of pixels wide (levels grow with the size)
            levels = max(1, int(np.log2(min(a.shape) / 8)))
            flow = cv2.calcOpticalFlowFarneback(a, b, None, 0.5, levels, 9, 3, 5, 1.1, 0)
        flows.append(flow)
    if not flows:  # a single frame: no motion
        flows = [np.zeros((*gray[0].shape, 2), np.float32)]
    flows.append(flows[-1])
    xy = np.clip(np.stack(flows) * (128.0 / float(bound)), -128, 128)
    mag = np.minimum(np.sqrt((xy ** 2).sum(-1, keepdims=True)), 128)
    return np.concatenate([xy, mag], -1).astype(np.float16)


def mirror_flow(flow: np.ndarray) -> np.ndarray:
    """Horizontally mirrored flow frames (... x H x W x 3): flip the columns and negate the x channel."""
    out = flow[..., ::-1, :].copy()
    out[..., 0] = -out[..., 0]
    return out


def _load_array(path: Path, manifest: dict) -> np.ndarray:
    a = np.load(path, mmap_mode="r")
    if list(a.shape) != manifest.get("shape") or str(a.dtype) != manifest.get("dtype"):
        raise Unusable("it does not match its manifest")
    return a


def _adopt_array(path: Path) -> dict:
    a = np.load(path, mmap_mode="r")  # a truncated file does not load (the header promises more bytes)
    return {"shape": list(a.shape), "dtype": str(a.dtype)}


class ArrayCache:
    """One ``.npy`` per (video, settings) under ``root/<kind>``, an ``ArtifactCache`` entry per array: written
    atomically and memory-mapped on read.

    Each ``<key>.npy`` has a manifest ``<key>.npy.manifest.json`` (version, key, kind, shape, dtype, bytes; no
    checksum: the arrays are memory-mapped, and large) written after it. An entry whose manifest does not parse or
    match, or whose ``.npy`` is truncated, is reported with a ``CacheWarning`` and rebuilt; an entry from before
    manifests is adopted when it loads whole."""

    VERSION = 1

    def __init__(self, root: str | Path):
        self.root = Path(os.path.expanduser(str(root)))
        self.rebuilt = 0

    def cache(self, kind: str) -> ArtifactCache:
        return ArtifactCache(self.root, kind, self.VERSION, what=f"{kind} cache entry", checksum=False,
                             record_key=True)

    @staticmethod
    def key(video: Path, settings: dict) -> str:
        st = video.stat()
        return digest(f"{video.resolve()}|{st.st_size}|{st.st_mtime_ns}|{sorted(settings.items())}", 20, algo="sha1")

    def path(self, kind: str, key: str) -> Path:
        return self.cache(kind).path_for(key, name=f"{key}.npy")

    def get(self, kind: str, key: str) -> np.ndarray | None:
        def adopt(path: Path) -> dict:
            return {"kind": kind, **_adopt_array(path)}

        a, why = self.cache(kind).read(self.path(kind, key), key, _load_array, adopt=adopt, expect={"kind": kind})
        if why not in (None, ABSENT, NO_MANIFEST):  # damaged: warned by the cache
            self.rebuilt += 1
        return a

    def put(self, kind: str, key: str, array: np.ndarray) -> Path:
        array = np.ascontiguousarray(array)
        buf = io.BytesIO()
        np.save(buf, array)
        return self.cache(kind).write_bytes(self.path(kind, key), key, buf.getvalue(), kind=kind,
                                            shape=list(array.shape), dtype=str(array.dtype))


# ---------------------------------------------------------------------------------------------------
# datasets
# ---------------------------------------------------------------------------------------------------
def extend_short(frames: np.ndarray, length: int, policy: str) -> np.ndarray:
    """A video of fewer than ``length`` frames, looped (0..n-1, 0..) or padded with its last frame."""
    n = len(frames)
    if n >= length:
        return frames
    idx = np.arange(length) % n if policy == "loop" else np.minimum(np.arange(length), n - 1)
    return frames[idx]


class VideoClips(Dataset):
    """Cached video arrays (``uint8`` RGB or ``float16`` flow) as tensors T x 3 x crop x crop.

    ``clip_length`` set: a random clip, random crop and random mirror (training); ``None``: the whole video,
    centre-cropped (evaluation)."""

    def __init__(self, arrays: list[Path], labels: list[int], names: list[str], modality: str, input_size: int,
                 clip_length: int | None, min_length: int, short_policy: str, mirror: bool,
                 mean: Sequence[float], std: Sequence[float]):
        self.arrays, self.labels, self.names = arrays, np.asarray(labels, np.int64), names
        self.modality, self.crop, self.clip_length = modality, int(input_size), clip_length
        self.min_length, self.short_policy, self.mirror = int(min_length), short_policy, mirror
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        frames = np.load(self.arrays[i], mmap_mode="r")
        frames = extend_short(frames, self.min_length, self.short_policy)
        t, h, w = frames.shape[:3]
        c = self.crop
        if h < c or w < c:
            raise DatasetError(f"{self.names[i]}: frames {w}x{h} are smaller than input_size {c}; raise dataset.frame_size")
        if self.clip_length is not None:
            start = int(torch.randint(0, t - self.clip_length + 1, ()).item())
            y0, x0 = int(torch.randint(0, h - c + 1, ()).item()), int(torch.randint(0, w - c + 1, ()).item())
            clip = np.asarray(frames[start:start + self.clip_length, y0:y0 + c, x0:x0 + c])
            if self.mirror and torch.rand(()).item() < 0.5:
                clip = mirror_flow(clip) if self.modality == "flow" else clip[:, :, ::-1]
        else:
            y0, x0 = (h - c) // 2, (w - c) // 2
            clip = np.asarray(frames[:, y0:y0 + c, x0:x0 + c])
        x = torch.from_numpy(np.ascontiguousarray(clip)).permute(0, 3, 1, 2).float()
        if self.modality == "flow":
            x = x / 128.0
        else:
            x = (x / 255.0 - self.mean) / self.std
        return x, int(self.labels[i]), i


def collate_videos(batch):
    """Whole videos of different lengths: a list of T x 3 x H x W tensors, labels, dataset indices."""
    return [b[0] for b in batch], torch.tensor([b[1] for b in batch]), torch.tensor([b[2] for b in batch])


# ---------------------------------------------------------------------------------------------------
# the DataModule
# ---------------------------------------------------------------------------------------------------
class UCF101DataModule(L.LightningDataModule):
    PROVIDES_DATA = ("videos", "labels")  # what tasks may ask for (transferrable/run/compat.py)

    name = "ucf101"

    def __init__(
        self,
        data_dir: str | Path = "data/UCF101",
        split: int = 1,
        modality: str = "rgb",
        classes: Sequence[str] | None = None,
        frame_size: Sequence[int] = (48, 36),
        max_frames: int | None = None,
        input_size: int = 32,
        clip_length: int = 16,
        test_stride: int = 8,
        mirror: bool = True,
        val_groups: int = 3,
        flow: dict | None = None,
        bad_videos: str = "error",
        short_videos: str = "loop",
        cache_dir: str | Path = ".cache/ucf101",
        batch_size: int = 8,
        eval_batch_size: int = 4,
        num_workers: int = 0,
        pin_memory: bool = False,
        mean: Sequence[float] = (0.4, 0.4, 0.4),
        std: Sequence[float] = (0.25, 0.25, 0.25),
        progress: bool = True,
        seed: int = 0,
    ):
        super().__init__()
        if modality not in ("rgb", "flow"):
            raise DatasetError(f"dataset.modality={modality!r}: expected rgb or flow")
        if int(split) not in (1, 2, 3):
            raise DatasetError(f"dataset.split={split}: UCF101 has splits 1, 2 and 3")
        if bad_videos not in ("error", "skip") or short_videos not in ("loop", "pad"):
            raise DatasetError(
                f"dataset.bad_videos={bad_videos!r} / dataset.short_videos={short_videos!r}: expected error|skip and loop|pad"
            )
        self.data_dir = resolve_data_dir(data_dir)  # a directory, or an archive extracted once (safely)
        self.split, self.modality = int(split), modality
        self.class_subset = None if classes is None else list(classes)
        self.frame_size = [int(v) for v in frame_size]
        self.max_frames, self.input_size = max_frames, int(input_size)
        self.clip_length, self.test_stride = int(clip_length), int(test_stride)
        self.mirror, self.val_groups = bool(mirror), int(val_groups)
        self.flow = {"method": "farneback", "bound": 20.0, **(dict(flow) if flow else {})}
        self.bad_videos, self.short_videos = bad_videos, short_videos
        self.cache = ArrayCache(cache_dir)
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.num_workers, self.pin_memory = int(num_workers), pin_memory
        self.mean, self.std = tuple(mean), tuple(std)
        self.progress, self.seed = progress, seed
        self.classes: list[str] = []
        self.splits: dict[str, VideoClips] = {}
        self.summary: dict = {}

    # -- classes ---------------------------------------------------------------------------------
    @property
    def lists_dir(self) -> Path:
        return self.data_dir / LISTS_DIR

    @property
    def class_names(self) -> list[str]:
        if not self.classes:
            self._read_classes()
        return self.classes

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def _read_classes(self) -> list[str]:
        why = kind_fault(self.data_dir, "folder") if self.data_dir is not None else "is not set"
        if why:
            raise DatasetError(
                f"dataset.data_dir={str(self.data_dir)!r} {why}: no UCF101 directory (expected {VIDEO_DIR}/ and {LISTS_DIR}/)"
            )
        every = read_class_index(self.lists_dir / "classInd.txt")
        if self.class_subset is not None:
            missing = [c for c in self.class_subset if c not in every]
            if missing:
                raise DatasetError(f"dataset.classes: {missing} not in {self.lists_dir / 'classInd.txt'}")
        self.all_classes = every
        self.classes = list(self.class_subset or every)
        return self.classes

    # -- Lightning hooks -------------------------------------------------------------------------
    def _split_entries(self) -> dict[str, list[tuple[str, int]]]:
        """(video path, label) of train / val / test: the split lists, ``val_groups`` held out of train."""
        self._read_classes()
        keep = {self.all_classes.index(c): i for i, c in enumerate(self.classes)}
        lists = {}
        for kind in ("train", "test"):
            path = self.lists_dir / f"{kind}list0{self.split}.txt"
            lists[kind] = [(rel, keep[y]) for rel, y in read_split_list(path, self.all_classes) if y in keep]
        train = lists["train"]
        val: list[tuple[str, int]] = []
        if self.val_groups > 0:
            groups = sorted({g for rel, _ in train if (g := video_group(rel)) is not None})
            held = set(groups[-self.val_groups:]) if len(groups) > self.val_groups else set()
            val = [e for e in train if video_group(e[0]) in held]
            train = [e for e in train if video_group(e[0]) not in held]
        return {"train": train, "val": val, "test": lists["test"]}

    def prepare_data(self) -> None:
        """Decode (and for flow, compute) every listed video into the frames cache. Lightning calls this on one
        process per node before ``setup`` (then a barrier), so under DDP the cache is built once, never raced;
        ``setup`` then only reads it."""
        counts = {"bad_videos": 0, "short_videos": 0, "skipped": []}
        for name, entries in self._split_entries().items():
            self._materialise(name, entries, counts)

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        counts = {"bad_videos": 0, "short_videos": 0, "skipped": []}
        built = {name: self._materialise(name, entries, counts) for name, entries in self._split_entries().items()}
        for name, (arrays, labels, names) in built.items():
            if name != "val" and not arrays:
                raise DatasetError(f"{self.lists_dir}: the {name} list of split {self.split} has no readable videos")
            self.splits[name] = VideoClips(
                arrays, labels, names, self.modality, self.input_size,
                self.clip_length if name == "train" else None, self.clip_length, self.short_videos,
                self.mirror and name == "train", self.mean, self.std,
            )
        self.summary = {
            "split": self.split, "classes": len(self.classes), "modality": self.modality,
            **{name: len(ds) for name, ds in self.splits.items()},
            "bad_videos_skipped": counts["bad_videos"], "short_videos": counts["short_videos"],
            "short_policy": self.short_videos,
        }
        if counts["skipped"]:
            self.summary["skipped_examples"] = counts["skipped"][:5]
        log.info("%s: %s", self.name, self.summary)

    def _materialise(self, split: str, entries: list[tuple[str, int]], counts: dict):
        """Decode (and for flow, compute flow of) every listed video into the cache; returns array paths."""
        decode = {"frame_size": tuple(self.frame_size), "max_frames": self.max_frames}
        arrays, labels, names = [], [], []
        for rel, label in progress_bar(entries, f"{self.name} {split} ({self.modality})", unit="video",
                                       enabled=self.progress and bool(entries)):
            video = self._locate(rel)
            try:
                if video is None:
                    raise DatasetError(
                        f"{self.lists_dir / f'*list0{self.split}.txt'} names {rel}, which is not under {self.data_dir / VIDEO_DIR}"
                    )
                array_path, length = self._cached(video, decode)
            except DatasetError as err:
                if self.bad_videos == "error":
                    raise DatasetError(f"{err} (or set dataset.bad_videos=skip)") from None
                counts["bad_videos"] += 1
                counts["skipped"].append(rel)
                continue
            counts["short_videos"] += int(length < self.clip_length)
            arrays.append(array_path)
            labels.append(label)
            names.append(rel)
        return arrays, labels, names

    def _locate(self, rel: str) -> Path | None:
        video = self.data_dir / VIDEO_DIR / rel
        if video.is_file():
            return video
        frames_dir = video.with_suffix("")
        return frames_dir if frames_dir.is_dir() else None

    def _cached(self, video: Path, decode: dict) -> tuple[Path, int]:
        key = self.cache.key(video, decode)
        frames = self.cache.get("frames", key)
        if frames is None:
            frames = decode_video(video, decode["frame_size"], decode["max_frames"])
            self.cache.put("frames", key, frames)
        if self.modality == "rgb":
            return self.cache.path("frames", key), len(frames)
        fkey = f"{key}-{self.flow['method']}-{float(self.flow['bound']):g}"
        flow = self.cache.get("flow", fkey)
        if flow is None:
            flow = compute_flow(np.asarray(frames), self.flow["method"], float(self.flow["bound"]))
            self.cache.put("flow", fkey, flow)
        return self.cache.path("flow", fkey), len(flow)

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        self.setup()
        train = split == "train"
        ds = self.splits[split]
        return DataLoader(
            ds, batch_size=self.batch_size if train else self.eval_batch_size, shuffle=shuffle,
            num_workers=self.num_workers, pin_memory=self.pin_memory, persistent_workers=self.num_workers > 0,
            collate_fn=None if train else collate_videos, drop_last=train and len(ds) > self.batch_size,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader | list:
        self.setup()
        return self._loader("val", shuffle=False) if len(self.splits["val"]) else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)
