"""PASCAL VOC semantic segmentation (any VOCdevkit year), optionally extended with SBD, and the generated
scenes' masks -- as LightningDataModules for region-based segmentation (``task=rcnn_segmentation``).

Layout read (``data_dir`` is ``VOCdevkit/VOC<year>`` or a folder holding exactly one ``VOC*`` directory)::

    JPEGImages/<id>.jpg
    SegmentationClass/<id>.png          palette PNG (VOC colormap): 0 background, class index + 1, 255 void
    SegmentationObject/<id>.png         optional palette PNG: 0 background, instance i + 1, 255 void
    ImageSets/Segmentation/<split>.txt  one image id per line (train / val / trainval / test)

SBD (Hariharan et al., 2011; the thesis's extra training annotations), optional: ``sbd_dir`` is
``benchmark_RELEASE/dataset`` with ``img/<id>.jpg``, ``cls/<id>.mat`` (``GTcls.Segmentation``),
``inst/<id>.mat`` (``GTinst.Segmentation``) and ``<sbd_split>.txt``. Its images join the *training* split,
except those in the test split (as the thesis's VOC 2011 val protocol); an id that VOC annotates too keeps
VOC's masks. Counted in ``summary['sbd_images']``.

Items (dicts of numpy arrays, ``detection_collate`` from ``datamodules/voc.py`` batches them)::

    image       uint8 H x W x 3 RGB
    mask        uint8 H x W: 0 background, c + 1 for class c, 255 void (ignored by the metric)
    instances   uint8 H x W (0 background, k instance, 255 void) or None when the image has no instance map
    boxes, labels, difficult   the instances' tight boxes (0-based pixel-edge), majority class, all False --
                derived from the masks, so detection fine-tuning works on segmentation-only data
    image_id, path

Bad input (one-line ``DatasetError`` naming the file): a mask that is not an indexed-colour PNG, a mask
holding a value that is neither a class index (0..N) nor 255, a mask whose size differs from its image, a
missing image or mask of a listed id, a missing split file. Read lazily: an error appears when the item is
first read (segment proposals read every image of a run first, so before any training).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from torch.utils.data import Dataset

from datamodules.base import DatasetError, read_image
from datamodules.file_checks import image_fault
from datamodules.scenes import GeneratedScenes
from datamodules.voc import (
    IMAGE_EXTENSIONS,
    VOCDirectoryDataModule,
    check_disjoint,
    find_voc_root,
    read_palette_png,
    read_split_ids,
)

log = logging.getLogger(__name__)

LAYOUT = ("JPEGImages/, SegmentationClass/*.png, ImageSets/Segmentation/<split>.txt "
          "(a VOCdevkit/VOC<year> directory)")
VOID = 255


def find_segmentation_root(data_dir: str | Path) -> Path:
    return find_voc_root(data_dir, marker="SegmentationClass", layout=LAYOUT, how_to_get="")


def check_mask(mask: np.ndarray, num_classes: int, path: str | Path) -> np.ndarray:
    """``mask`` unchanged when every value is 0..num_classes or 255, else a one-line DatasetError."""
    values = np.unique(mask)
    bad = values[(values > num_classes) & (values != VOID)]
    if len(bad):
        raise DatasetError(f"{path}: unexpected label values {bad.tolist()[:8]} (expected 0..{num_classes} "
                           f"for background + {num_classes} classes, or {VOID} = void)")
    return mask


def _read_mat_segmentation(path: Path, struct: str) -> np.ndarray:
    from scipy.io import loadmat

    try:
        return np.asarray(loadmat(str(path))[struct]["Segmentation"][0, 0], dtype=np.uint8)
    except (OSError, KeyError, ValueError, IndexError) as err:
        raise DatasetError(f"unreadable SBD annotation {path} (expected a {struct}.Segmentation struct): {err}") from None


def instance_boxes(mask: np.ndarray, instances: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(boxes float32 K x 4, labels int64 K) of every instance (void excluded): tight 0-based pixel-edge box,
    class = the majority class of its pixels. Without an instance map, one instance per present class."""
    if instances is None:
        instances = np.where(mask == VOID, 0, mask)
    boxes, labels = [], []
    for k in np.unique(instances):
        if k == 0 or k == VOID:
            continue
        sel = (instances == k) & (mask != VOID) & (mask != 0)
        if not sel.any():
            continue
        ys, xs = np.nonzero(sel)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        labels.append(int(np.bincount(mask[sel]).argmax()) - 1)
    return np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64)


class SegmentationRecord:
    __slots__ = ("image_id", "image_path", "mask_path", "instance_path", "source")

    def __init__(self, image_id: str, image_path: Path, mask_path: Path, instance_path: Path | None, source: str):
        self.image_id, self.image_path, self.mask_path = image_id, image_path, mask_path
        self.instance_path, self.source = instance_path, source


class VOCSegmentationDataset(Dataset):
    def __init__(self, records: Sequence[SegmentationRecord], num_classes: int):
        self.records, self.num_classes = list(records), int(num_classes)

    def __len__(self) -> int:
        return len(self.records)

    def read_masks(self, r: SegmentationRecord) -> tuple[np.ndarray, np.ndarray | None]:
        if r.source == "sbd":
            mask = _read_mat_segmentation(r.mask_path, "GTcls")
            inst = _read_mat_segmentation(r.instance_path, "GTinst") if r.instance_path else None
        else:
            mask = read_palette_png(r.mask_path)
            inst = read_palette_png(r.instance_path) if r.instance_path else None
        check_mask(mask, self.num_classes, r.mask_path)
        if inst is not None and inst.shape != mask.shape:
            raise DatasetError(f"{r.instance_path}: instance mask is {inst.shape[1]}x{inst.shape[0]}, "
                               f"the class mask {r.mask_path} is {mask.shape[1]}x{mask.shape[0]}")
        return mask, inst

    def __getitem__(self, index: int) -> dict:
        r = self.records[index]
        image = read_image(str(r.image_path))
        mask, inst = self.read_masks(r)
        if mask.shape != image.shape[:2]:
            raise DatasetError(f"{r.mask_path}: mask is {mask.shape[1]}x{mask.shape[0]} but its image "
                               f"{r.image_path} is {image.shape[1]}x{image.shape[0]}")
        boxes, labels = instance_boxes(mask, inst)
        return {"image": image, "mask": mask, "instances": inst, "boxes": boxes, "labels": labels,
                "difficult": np.zeros(len(labels), bool), "image_id": r.image_id, "path": str(r.image_path)}


class VOCSegmentationDataModule(VOCDirectoryDataModule):
    """Segmentation images with class (and instance) masks; ``datasets[train|val|test]`` after ``setup``."""
    PROVIDES_DATA = ("images", "masks")  # what tasks may ask for (transferrable/run/compat.py)

    name = "voc_segmentation"
    layout = LAYOUT
    find_root = staticmethod(find_segmentation_root)

    def __init__(self, data_dir: str | Path | None = None, classes: Sequence[str] | None = None,
                 train_split: str = "train", val_split: str | None = None, test_split: str = "val",
                 sbd_dir: str | Path | None = None, sbd_split: str = "train", **kwargs):
        super().__init__(data_dir, classes, train_split=train_split, val_split=val_split, test_split=test_split,
                         **kwargs)
        self.sbd_dir = None if not sbd_dir else Path(os.path.expanduser(str(sbd_dir)))
        self.sbd_split = sbd_split

    @staticmethod
    def check_classes(classes: Sequence[str]) -> list[str]:
        names = VOCDirectoryDataModule.check_classes(classes)
        if len(names) >= VOID:  # class c is stored as c + 1 in a uint8 mask next to 255 = void
            raise DatasetError(f"dataset.classes: expected 1..{VOID - 1} names, got {len(names)}")
        return names

    def _voc_record(self, root: Path, image_id: str, listing: set[str]) -> SegmentationRecord:
        img = next((root / "JPEGImages" / f"{image_id}{e}" for e in IMAGE_EXTENSIONS if f"{image_id}{e}" in listing), None)
        if img is None:
            raise DatasetError(f"image {root / 'JPEGImages' / (image_id + '.jpg')} listed in ImageSets/Segmentation but missing")
        mask = root / "SegmentationClass" / f"{image_id}.png"
        for path, what in ((img, "JPEG/PNG image"), (mask, "palette PNG mask")):
            why = image_fault(path)  # a scan, not the first epoch, finds it
            if why:
                raise DatasetError(f"{path} {why} (image {image_id} is in ImageSets/Segmentation; expected a whole {what})")
        inst = root / "SegmentationObject" / f"{image_id}.png"
        return SegmentationRecord(image_id, img, mask, inst if inst.is_file() else None, "voc")

    def _sbd_records(self, exclude: set[str]) -> list[SegmentationRecord]:
        d = self.sbd_dir
        split = d / f"{self.sbd_split}.txt"
        if not split.is_file():
            raise DatasetError(f"sbd split file {split} not found (expected benchmark_RELEASE/dataset with "
                               "img/, cls/, inst/ and train.txt/val.txt)")
        out = []
        for image_id in (ln.split()[0] for ln in split.read_text().splitlines() if ln.strip()):
            if image_id in exclude:
                continue
            img, cls, inst = d / "img" / f"{image_id}.jpg", d / "cls" / f"{image_id}.mat", d / "inst" / f"{image_id}.mat"
            if not img.is_file() or not cls.is_file():
                raise DatasetError(f"SBD image {image_id}: {img if not img.is_file() else cls} not found")
            out.append(SegmentationRecord(image_id, img, cls, inst if inst.is_file() else None, "sbd"))
        return out

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        root, listing = self.open_root()
        split_ids = {k: self.subsample(read_split_ids(root, s, kind="Segmentation"))
                     for k, s in self.split_names.items() if s}
        check_disjoint(split_ids, self.split_names, root, "Segmentation")
        records = {key: [self._voc_record(root, i, listing) for i in ids] for key, ids in split_ids.items()}
        n_sbd = 0
        if self.sbd_dir is not None and "train" in records:
            exclude = set(split_ids.get("test", [])) | set(split_ids.get("val", [])) | {r.image_id for r in records["train"]}
            extra = self._sbd_records(exclude)
            n_sbd = len(extra)
            records["train"] = records["train"] + extra
        self.datasets = {k: VOCSegmentationDataset(v, self.num_classes) for k, v in records.items()}
        self.summary = {"root": str(root), "classes": self.num_classes,
                        "splits": {k: len(v) for k, v in records.items()}, "sbd_images": n_sbd,
                        "with_instances": int(sum(r.instance_path is not None for v in records.values() for r in v))}
        log.info("%s: %s", self.name, ", ".join(f"{k} {v}" for k, v in self.summary["splits"].items())
                 + (f" (+{n_sbd} SBD training images)" if n_sbd else ""))


class ScenesSegmentationDataModule(GeneratedScenes, VOCSegmentationDataModule):
    """The generated scenes (``datamodules/scene_generator.py``) as segmentation data: the same generation
    parameters as ``dataset=scenes`` give the same cached directory, read through the VOC segmentation loader."""

    name = "scenes_segmentation"
