"""Folder-of-class-folders images: Caltech-101, SUN-397, Office-31 domains, CUB, ImageNet-style trees.

Two layouts under ``data_dir``:

* split:  ``{train,[val],test}/<class>/<image>`` -- the splits as given (val optional; a tree with only
  ``train/`` and ``val/``, like ImageNet's, evaluates on ``val/`` and carves validation out of train);
* flat:   ``<class>/<image>`` -- split by ``seed``: ``train_per_class: N`` (the DeCAF protocol, N per
  class for training and the rest for test) or else ``test_fraction`` of each class held out.

A class is any folder that directly holds images (any format OpenCV reads: jpg/jpeg/jpe, png, bmp/dib,
pgm/ppm/pbm/pnm, tif/tiff, webp; any case), named by its path
below the split root, so nested trees such as SUN-397's ``a/abbey`` work too; a leading folder shared by
every class (``images/`` of Office-31's ``amazon/images/<class>``) is dropped from the names. Classes are
sorted by name unless ``classes`` lists (and so restricts and orders) them. Images stay file paths and
are decoded lazily; every file's structure is checked at the scan (``datamodules/file_checks.py``).

Before training (at the scan), other files are skipped and reported: a warning per split with their count
and the first few paths, and the reason (an extension OpenCV does not read; an empty, truncated or unknown
image file, found by a check of a few bytes at each end of every file). A class folder that yields
no readable image is an error naming it and its skipped files (``dataset.exclude_classes`` leaves it out).
The counts are in ``summary``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from datamodules.base import DatasetError, ImageClassificationDataModule, stratified_split
from datamodules.file_checks import image_fault, kind_fault
from transferrable.core.progress import progress as progress_bar

log = logging.getLogger(__name__)

# what OpenCV's imread decodes (datamodules/base.read_image): every one is accepted, none silently ignored
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".dib", ".pgm", ".ppm", ".pbm", ".pnm", ".tif",
                    ".tiff", ".webp")
COMMON = (".jpg", ".jpeg", ".png", ".bmp")  # named first in messages
SHOWN = 3  # skipped files named in a message (the rest counted)
LAYOUT = "<data_dir>/<class>/<image>.jpg (split by seed) or <data_dir>/{train,[val],test}/<class>/<image>.jpg"


def is_image_file(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


@dataclass
class FolderScan:
    """One split root's class folders: their images, and the files skipped with the reason for each."""

    images: dict[str, list[str]] = field(default_factory=dict)  # class folder (posix, below root): image paths
    skipped: dict[str, list[tuple[str, str]]] = field(default_factory=dict)  # class folder: [(path, why)]
    empty: list[str] = field(default_factory=list)  # folders with files but no readable image


def scan_class_folders(root: Path) -> FolderScan:
    """Every folder below ``root`` that directly holds files: its images (sorted), the files skipped and why.

    Each folder's image files are probed in order until one has a header OpenCV reads; those before it that
    do not are reported (they would fail when read). A folder none of whose files is a readable image is in
    ``empty`` when it has no sub-folders (a folder of class folders may hold a README)."""
    scan = FolderScan()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__")))  # .git, __MACOSX
        rel = Path(dirpath).relative_to(root)
        files = sorted(f for f in filenames if not f.startswith("."))  # .DS_Store and other hidden files
        if rel == Path(".") or not files:
            continue
        name = rel.as_posix()
        images = [os.path.join(dirpath, f) for f in files if is_image_file(f)]
        skipped = [(os.path.join(dirpath, f), f"extension {Path(f).suffix or '(none)'} is not an image format "
                    f"OpenCV reads") for f in files if not is_image_file(f)]
        faults = {path: image_fault(path) for path in images}  # a few bytes at each end of every file
        skipped += [(p, why) for p, why in faults.items() if why]
        readable = [p for p in images if not faults[p]]
        if skipped:
            scan.skipped[name] = skipped
        if not readable:  # nothing readable here (or no image files at all)
            if not dirnames:  # a leaf folder: a class that lost every file (a parent's README is no class)
                scan.empty.append(name)
        else:
            scan.images[name] = readable
    return scan


def describe_skipped(items: list[tuple[str, str]]) -> str:
    """``N files skipped (reason: path, path, ...; reason: ...)``, the first few paths per reason."""
    by_reason: dict[str, list[str]] = {}
    for path, why in items:
        by_reason.setdefault(why, []).append(path)
    parts = [f"{len(paths)} {why}: " + ", ".join(paths[:SHOWN]) + (", ..." if len(paths) > SHOWN else "")
             for why, paths in by_reason.items()]
    return f"{len(items)} file{'s' if len(items) != 1 else ''} skipped ({'; '.join(parts)})"


def strip_common_prefix(names: Sequence[str]) -> dict[str, str]:
    """Drop leading folders that every name shares (``images/back_pack`` -> ``back_pack``)."""
    parts = [n.split("/") for n in names]
    k = 0
    while len(parts) > 1 and all(len(p) > k + 1 for p in parts) and len({p[k] for p in parts}) == 1:
        k += 1
    return {n: "/".join(p[k:]) for n, p in zip(names, parts, strict=True)}


def decode_images(paths: Sequence[str], what: str = "images") -> np.ndarray:
    """Every file decoded (RGB uint8) into one N x H x W x 3 array; images of other sizes than the first are
    resized to it (bilinear, as the per-file path resizes)."""
    import cv2

    from datamodules.base import read_image, to_rgb

    first = to_rgb(read_image(paths[0])) if paths else np.zeros((1, 1, 3), np.uint8)
    out = np.empty((len(paths), *first.shape), dtype=np.uint8)
    for i, path in enumerate(progress_bar(paths, f"decoding {what}", unit="img", enabled=len(paths) >= 20000)):
        img = to_rgb(read_image(path))
        if img.shape != first.shape:
            img = cv2.resize(img, (first.shape[1], first.shape[0]), interpolation=cv2.INTER_LINEAR)
        out[i] = img
    return out


def per_class_split(labels: np.ndarray, n_train: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices (train, test): ``n_train`` random images of each class for training, the rest for test."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        train.append(idx[:n_train])
        test.append(idx[n_train:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


class ImageFolderDataModule(ImageClassificationDataModule):
    name = "imagefolder"

    def __init__(
        self,
        data_dir: str = "data/imagefolder",
        classes: Sequence[str] | None = None,
        exclude_classes: Sequence[str] | None = None,
        train_per_class: int | None = None,
        test_fraction: float = 0.2,
        in_memory: bool = False,
        **kwargs,
    ):
        super().__init__(data_dir=data_dir, **kwargs)
        # decode every image once into a uint8 array (small images: 32-64 px trees such as the generated worlds);
        # batches are then transformed as tensors (datamodules.base.BatchTensorTransform), not one file at a time
        self.in_memory = bool(in_memory)
        self.classes = None if classes is None else [str(c) for c in classes]
        self.exclude_classes = [str(c) for c in (exclude_classes or [])]
        self.train_per_class = None if train_per_class is None else int(train_per_class)
        self.test_fraction = float(test_fraction)
        if self.train_per_class is not None and self.train_per_class < 1:
            raise DatasetError(f"dataset.train_per_class={train_per_class}: expected a positive count (or null)")
        if self.train_per_class is None and not 0.0 < self.test_fraction < 1.0:
            raise DatasetError(f"dataset.test_fraction={test_fraction}: expected a fraction in (0, 1)")
        self.layout: str | None = None  # "split" or "flat" once scanned
        self.summary: dict = {}  # skipped files per reason and split, once scanned
        self._scanned: tuple[list[str], dict[str, dict[str, list[str]]]] | None = None

    # -- discovery ------------------------------------------------------------------------------
    def _split_dirs(self, root: Path) -> dict[str, Path] | None:
        present = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
        if "train" not in present:
            return None
        if "test" not in present and "val" not in present:
            raise DatasetError(f"dataset.data_dir={root}: found train/ but no test/ or val/ next to it; expected {LAYOUT}")
        return present

    def _scan(self) -> tuple[list[str], dict[str, dict[str, list[str]]]]:
        """(class names in label order, {split or "all": {class name: image paths}})."""
        if self._scanned is not None:
            return self._scanned
        if self.data_dir is None:
            # a generated layout (fractal_world, clutter_objects) fills data_dir when it is generated or found;
            # asked for class names before setup (e.g. to size a head), generate first (cheap once generated)
            self.prepare_data()
        root = Path(self.data_dir) if self.data_dir is not None else None
        why = kind_fault(root, "folder") if root is not None else "is not set"
        if why:
            raise DatasetError(f"dataset.data_dir={root} {why}; expected {LAYOUT}")
        split_dirs = self._split_dirs(root)
        self.layout = "flat" if split_dirs is None else "split"
        scans = {"all": scan_class_folders(root)} if split_dirs is None else {
            s: scan_class_folders(p) for s, p in split_dirs.items()
        }
        raw = {s: scan.images for s, scan in scans.items()}
        rename = strip_common_prefix(sorted({n for scan in scans.values() for n in [*scan.images, *scan.empty]}))
        per_split = {s: {rename[n]: paths for n, paths in found.items()} for s, found in raw.items()}
        source = per_split["all" if split_dirs is None else "train"]
        where = root if split_dirs is None else split_dirs["train"]
        self._report_skipped(root, scans, rename)
        if not source:
            scan = scans["all" if split_dirs is None else "train"]
            items = [item for folder in sorted(scan.skipped) for item in scan.skipped[folder]]
            others = "/".join(e[1:] for e in IMAGE_EXTENSIONS if e not in COMMON)
            raise DatasetError(
                f"dataset.data_dir={root}: no class folders with {'/'.join(e[1:] for e in COMMON)} images (or "
                f"{others}) under {where}; expected {LAYOUT}" + (f"; {describe_skipped(items)}" if items else "")
            )
        empty = {rename[n] for scan in scans.values() for n in scan.empty}
        for key, listed in (("classes", self.classes or []), ("exclude_classes", self.exclude_classes)):
            for name in listed:
                if name not in source and not (key == "exclude_classes" and name in empty):
                    known = ", ".join(sorted(source)[:8]) + (", ..." if len(source) > 8 else "")
                    raise DatasetError(f"dataset.{key}: no class folder '{name}' under {where} (found: {known})")
        names = list(self.classes) if self.classes is not None else sorted(source)
        names = [n for n in names if n not in self.exclude_classes]
        self._refuse_empty_classes(root, scans, rename, names)
        if len(set(names)) != len(names):
            raise DatasetError(f"dataset.classes lists a class twice: {names}")
        if self.classes is None and split_dirs is not None:
            for s, found in per_split.items():
                extra = sorted(set(found) - set(names) - set(self.exclude_classes))
                if extra:
                    raise DatasetError(
                        f"dataset.data_dir={root}: {s}/ has class folder '{extra[0]}' that train/ lacks "
                        f"(set dataset.classes to choose the classes)"
                    )
        self._scanned = (names, per_split)
        return self._scanned

    def _report_skipped(self, root: Path, scans: dict[str, FolderScan], rename: dict[str, str]) -> None:
        """Warn, per split, about the files that are not readable images (count, first paths, reason)."""
        for split, scan in scans.items():
            items = [item for folder in sorted(scan.skipped) for item in scan.skipped[folder]]
            if not items:
                continue
            where = root if split == "all" else root / split
            log.warning("imagefolder: %s: %s", where, describe_skipped(items))
            self.summary[f"skipped_files_{split}"] = len(items)
            for _, why in items:
                key = "skipped_unsupported" if why.startswith("extension") else "skipped_unreadable"
                self.summary[key] = self.summary.get(key, 0) + 1

    def _refuse_empty_classes(self, root: Path, scans: dict[str, FolderScan], rename: dict[str, str],
                              names: list[str]) -> None:
        """A class folder (one the run would use) with no readable image: one line naming it and its files."""
        wanted = set(names) if self.classes is not None else None
        for split, scan in scans.items():
            bad = [f for f in scan.empty if rename[f] not in self.exclude_classes
                   and (wanted is None or rename[f] in wanted)]
            if bad:
                where = root if split == "all" else root / split
                items = [item for f in bad for item in scan.skipped.get(f, [])]
                shown = ", ".join(f"'{rename[f]}'" for f in bad[:SHOWN]) + (", ..." if len(bad) > SHOWN else "")
                raise DatasetError(
                    f"dataset.data_dir={root}: class folder{'s' if len(bad) > 1 else ''} {shown} under {where} "
                    f"yield{'' if len(bad) > 1 else 's'} no readable image: {describe_skipped(items)}; add "
                    f"{'them' if len(bad) > 1 else 'it'} to dataset.exclude_classes or add images"
                )

    @property
    def class_names(self) -> list[str]:
        return self._scan()[0]

    def _gather(self, found: dict[str, list[str]], names: list[str]) -> tuple[list[str], np.ndarray]:
        paths, labels = [], []
        for label, name in enumerate(names):
            files = found.get(name, [])
            paths.extend(files)
            labels.extend([label] * len(files))
        return paths, np.asarray(labels, dtype=np.int64)

    # -- splits ---------------------------------------------------------------------------------
    def load_splits(self):
        splits = self._load_paths()
        if not self.in_memory:
            return splits
        return {s: (decode_images(paths, f"{self.name} {s}"), labels) for s, (paths, labels) in splits.items()}

    def _load_paths(self):
        names, per_split = self._scan()
        if self.layout == "split":
            out = {s: self._gather(found, names) for s, found in per_split.items()}
            if "test" not in out:
                out["test"] = out.pop("val")
                log.info("imagefolder: %s has no test/; evaluating on val/, validation carved from train/", self.data_dir)
            log.info("imagefolder: %d classes from %s/{%s}", len(names), self.data_dir, ",".join(per_split))
            return out
        paths, labels = self._gather(per_split["all"], names)
        if self.train_per_class is not None:
            n = self.train_per_class
            counts = np.bincount(labels, minlength=len(names))
            smallest = int(np.argmin(counts))
            if n >= counts[smallest]:
                raise DatasetError(
                    f"dataset.train_per_class={n}: class '{names[smallest]}' has only {counts[smallest]} images "
                    f"in {self.data_dir}; every class needs more than {n} (N for train, the rest for test)"
                )
            train, test = per_class_split(labels, n, self.seed)
            how = f"train_per_class={n}"
        else:
            train, test = stratified_split(labels, self.test_fraction, self.seed)
            how = f"test_fraction={self.test_fraction:g}"
        log.info(
            "imagefolder: %d classes from %s, %d train / %d test (%s, seed=%d)",
            len(names), self.data_dir, len(train), len(test), how, self.seed,
        )
        return {
            "train": ([paths[i] for i in train], labels[train]),
            "test": ([paths[i] for i in test], labels[test]),
        }
