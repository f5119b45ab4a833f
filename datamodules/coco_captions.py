"""Image captioning data in the COCO captions layout (``dataset=coco_captions``), Flickr30k through the same
Karpathy split JSON, and the generated captioned scenes (``dataset=scene_captions``), which are written in
this layout and read by this same loader.

Sources, in order of preference:

* ``karpathy_json`` (``dataset_coco.json`` / ``dataset_flickr30k.json`` shape: ``images`` with ``filepath``
  (optional), ``filename``, ``split`` in train/restval/val/test and ``sentences`` with ``raw``): the splits
  come from the file (``restval`` joins train); images are ``<image_dir>/<filepath>/<filename>``.
* otherwise ``annotations/captions_{train,val}2014.json`` (``images`` + ``annotations``) under
  ``data_dir``: train = train2014; val2014 is split in order into the first ``val_images`` images (val) and
  the rest (test), images are ``<data_dir>/{train,val}2014/<file_name>``.

Bad input, one documented policy (counted in ``summary``): empty captions are dropped; captions whose
words are all unknown to the vocabulary are dropped from training (nothing to learn) but stay references
for the metrics; images without any caption are dropped from every split; a missing annotation file or
image directory is a one-line ``DatasetError``, and so is a training split left with no trainable caption
(every word rarer than ``vocab_min_count``). ``data_dir`` may also be an archive (transferrable/core/archives.py). The vocabulary is built from the training captions only
(``vocab_min_count``, ``max_caption_len``).

Images are resized as a whole (aspect ratio not kept) to ``input_size`` squared and normalised: the
generated scenes are 160x120, and a CPU-sized backbone sees them at 32 px.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from datamodules.base import DatasetError, build_transform, read_image, to_rgb
from datamodules.file_checks import image_fault, kind_fault
from transferrable.core.archives import resolve_data_dir
from transferrable.core.vocabulary import Vocabulary, tokenize

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")


@dataclass
class CaptionedImage:
    image_id: int | str
    path: str
    captions: list[str] = field(default_factory=list)


def _read_json(path: Path, what: str) -> dict:
    why = kind_fault(path, "file")
    if why:
        raise DatasetError(f"{what}: {path} {why} (expected a COCO captions JSON file)")
    try:
        return json.loads(path.read_text())
    except ValueError as err:
        raise DatasetError(f"{what}: {path} is not valid JSON ({err})") from None


def load_coco_captions(ann_file: Path, image_dir: Path) -> tuple[list[CaptionedImage], int]:
    """(images with their captions in file order, number of empty captions dropped)."""
    blob = _read_json(ann_file, "dataset.data_dir")
    if not isinstance(blob, dict) or "images" not in blob or "annotations" not in blob:
        raise DatasetError(f"{ann_file}: expected a COCO captions JSON with 'images' and 'annotations' lists")
    images: dict = {}
    for n, im in enumerate(blob["images"]):
        if not isinstance(im, dict) or "id" not in im or not isinstance(im.get("file_name"), str):
            raise DatasetError(f"{ann_file}: images[{n}] has no 'id' or 'file_name' (expected both in every entry)")
        if im["id"] in images:
            raise DatasetError(f"{ann_file}: image id {im['id']!r} appears twice in 'images' (expected unique ids)")
        images[im["id"]] = CaptionedImage(im["id"], str(image_dir / im["file_name"]))
    empty = orphans = 0
    for ann in blob["annotations"]:
        text = str(ann.get("caption") or "").strip() if isinstance(ann, dict) else ""
        if not isinstance(ann, dict) or ann.get("image_id") not in images:
            orphans += 1
            continue
        if not tokenize(text):
            empty += 1
            continue
        images[ann["image_id"]].captions.append(text)
    if orphans:
        log.warning("%s: %d caption(s) skipped: their image_id is not in 'images'", ann_file, orphans)
    return list(images.values()), empty


def load_karpathy(split_file: Path, image_dir: Path) -> tuple[dict[str, list[CaptionedImage]], int]:
    blob = _read_json(split_file, "dataset.karpathy_json")
    if not isinstance(blob, dict) or "images" not in blob:
        raise DatasetError(f"{split_file}: expected a Karpathy split JSON with an 'images' list (dataset_coco.json)")
    out: dict[str, list[CaptionedImage]] = {s: [] for s in SPLITS}
    empty = 0
    for im in blob["images"]:
        split = {"restval": "train"}.get(im.get("split"), im.get("split"))
        if split not in out:
            continue
        caps = []
        for s in im.get("sentences", []):
            text = str(s.get("raw") or " ".join(s.get("tokens", []))).strip()
            if tokenize(text):
                caps.append(text)
            else:
                empty += 1
        path = image_dir / im.get("filepath", "") / im["filename"]
        out[split].append(CaptionedImage(im.get("cocoid", im.get("imgid", im["filename"])), str(path), caps))
    return out, empty


class CaptionImages(Dataset):
    """One item per image: (image tensor, index)."""

    def __init__(self, images: Sequence[CaptionedImage], transform):
        self.images, self.transform = list(images), transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        img = to_rgb(read_image(self.images[i].path))
        return self.transform(image=img)["image"], i


class CaptionPairs(Dataset):
    """One item per (image, caption) pair: (image tensor or cached feature row, token ids, index)."""

    def __init__(self, pairs: Sequence[tuple[int, list[int]]], images: Dataset | torch.Tensor, vocab: Vocabulary):
        self.pairs, self.images, self.vocab = list(pairs), images, vocab

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int):
        img_idx, ids = self.pairs[i]
        x = self.images[img_idx] if isinstance(self.images, torch.Tensor) else self.images[img_idx][0]
        return x, torch.tensor(ids, dtype=torch.long), img_idx


def pad_captions(batch, vocab: Vocabulary):
    """Collate: images stacked; captions as ``<BOS> w1..wn <EOS> <PAD>..`` (B x (max_n + 2))."""
    xs, caps, idx = zip(*batch, strict=True)
    width = max(len(c) for c in caps) + 2
    tokens = torch.full((len(caps), width), vocab.pad, dtype=torch.long)
    for row, c in enumerate(caps):
        tokens[row, 0] = vocab.bos
        tokens[row, 1 : 1 + len(c)] = c
        tokens[row, 1 + len(c)] = vocab.eos
    return torch.stack(xs), tokens, torch.tensor(idx)


class COCOCaptionsDataModule(L.LightningDataModule):
    PROVIDES_DATA = ("images", "captions")  # what tasks may ask for (transferrable/run/compat.py)

    name = "coco_captions"
    num_classes = 0

    def __init__(
        self,
        data_dir: str | Path = "data/coco",
        karpathy_json: str | Path | None = None,
        image_dir: str | Path | None = None,
        val_images: int = 5000,
        max_images: dict | None = None,
        vocab_min_count: int = 5,
        max_caption_len: int = 20,
        batch_size: int = 64,
        eval_batch_size: int = 128,
        num_workers: int = 0,
        pin_memory: bool = False,
        input_size: int = 32,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        seed: int = 0,
        **_ignored,
    ):
        super().__init__()
        self.data_dir = resolve_data_dir(data_dir) if data_dir else None  # a directory or an archive
        self.karpathy_json = Path(os.path.expanduser(str(karpathy_json))) if karpathy_json else None
        self.image_dir = Path(os.path.expanduser(str(image_dir))) if image_dir else None
        self.val_images = int(val_images)
        self.max_images = dict(max_images or {})
        self.vocab_min_count, self.max_caption_len = int(vocab_min_count), int(max_caption_len)
        self.batch_size, self.eval_batch_size = int(batch_size), int(eval_batch_size)
        self.num_workers, self.pin_memory, self.seed = int(num_workers), bool(pin_memory), int(seed)
        self.input_size = int(input_size)
        self.transform = build_transform(self.input_size, mean, std, "none")
        self.splits: dict[str, list[CaptionedImage]] = {}
        self.vocab: Vocabulary | None = None
        self.summary: dict = {}

    # -- loading --------------------------------------------------------------------------------
    def dataset_key(self) -> dict:
        """What the image lists depend on (for feature caches): the files' identities and the limits."""
        files = [self.karpathy_json] if self.karpathy_json else [
            self.data_dir / "annotations" / f"captions_{s}2014.json" for s in ("train", "val")]
        ident = [(str(f), f.stat().st_size, int(f.stat().st_mtime)) for f in files if f and f.is_file()]
        return {"dataset": self.name, "files": ident, "val_images": self.val_images, "max_images": self.max_images,
                "input_size": self.input_size}

    def load_splits(self) -> tuple[dict[str, list[CaptionedImage]], int]:
        if self.karpathy_json is not None:
            image_dir = self.image_dir or self.karpathy_json.parent
            return load_karpathy(self.karpathy_json, image_dir)
        why = kind_fault(self.data_dir, "folder") if self.data_dir is not None else "is not set"
        if why:
            raise DatasetError(f"dataset.data_dir={str(self.data_dir)!r} {why} (expected COCO with "
                               "annotations/captions_{train,val}2014.json and train2014/, val2014/)")
        image_root = self.image_dir or self.data_dir
        train, e1 = load_coco_captions(self.data_dir / "annotations" / "captions_train2014.json", image_root / "train2014")
        val, e2 = load_coco_captions(self.data_dir / "annotations" / "captions_val2014.json", image_root / "val2014")
        return {"train": train, "val": val[: self.val_images], "test": val[self.val_images:]}, e1 + e2

    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        splits, empty = self.load_splits()
        no_caption = {}
        for s in SPLITS:
            kept = [im for im in splits.get(s, []) if im.captions]
            no_caption[s] = len(splits.get(s, [])) - len(kept)
            limit = self.max_images.get(s)
            self.splits[s] = kept[: int(limit)] if limit else kept
        if not self.splits["train"]:
            raise DatasetError(f"{self._where()}: no training image with a caption")
        if not self.splits["test"]:
            raise DatasetError(f"{self._where()}: no test image with a caption (val_images={self.val_images}?)")
        for s in SPLITS:  # every image's structure, at setup (a few bytes each), not when an epoch reaches it
            for im in self.splits[s]:
                why = image_fault(im.path)
                if why:
                    raise DatasetError(f"{self._where()}: image file {im.path} {why} (expected a whole JPEG/PNG image "
                                       "in the image folder next to the annotations, or dataset.image_dir)")
        self.vocab = Vocabulary.build((c for im in self.splits["train"] for c in im.captions),
                                      self.vocab_min_count, self.max_caption_len)
        self.train_pairs, unk_only = self.encode_pairs("train")
        if not self.train_pairs:  # empty after filtering: every caption was only words outside the vocabulary
            raise DatasetError(f"{self._where()}: none of the {unk_only} training captions has a word in the "
                               f"vocabulary (dataset.vocab_min_count={self.vocab_min_count}: lower it)")
        self.val_pairs, _ = self.encode_pairs("val")
        self.summary = {
            "images": {s: len(v) for s, v in self.splits.items()},
            "captions": {s: sum(len(im.captions) for im in v) for s, v in self.splits.items()},
            "vocabulary": len(self.vocab),
            "dropped_empty_captions": empty,
            "dropped_images_without_captions": sum(no_caption.values()),
            "unknown_only_captions_not_trained": unk_only,
        }
        log.info("%s: %s", self.name, self.summary)

    def _where(self) -> str:
        return f"dataset.karpathy_json={self.karpathy_json}" if self.karpathy_json else f"dataset.data_dir={self.data_dir}"

    def encode_pairs(self, split: str) -> tuple[list[tuple[int, list[int]]], int]:
        """(image index, word ids) for every caption of the split with a known word; count of those without."""
        pairs, unk_only = [], 0
        for i, im in enumerate(self.splits[split]):
            for c in im.captions:
                ids = self.vocab.encode(c)
                if all(t == self.vocab.unk for t in ids):
                    unk_only += 1
                    continue
                pairs.append((i, ids))
        return pairs, unk_only

    # -- loaders --------------------------------------------------------------------------------
    def image_dataset(self, split: str) -> CaptionImages:
        return CaptionImages(self.splits[split], self.transform)

    def pair_loader(self, split: str, features: torch.Tensor | None = None, shuffle: bool = False) -> DataLoader:
        pairs = self.train_pairs if split == "train" else self.val_pairs if split == "val" else self.encode_pairs(split)[0]
        images = features if features is not None else self.image_dataset(split)
        gen = torch.Generator().manual_seed(self.seed)
        return DataLoader(CaptionPairs(pairs, images, self.vocab), batch_size=self.batch_size, shuffle=shuffle,
                          generator=gen if shuffle else None, num_workers=0 if features is not None else self.num_workers,
                          collate_fn=lambda b: pad_captions(b, self.vocab), pin_memory=self.pin_memory)

    def image_loader(self, split: str) -> DataLoader:
        return DataLoader(self.image_dataset(split), batch_size=self.eval_batch_size, shuffle=False,
                          num_workers=self.num_workers, pin_memory=self.pin_memory)

    def train_dataloader(self) -> DataLoader:
        return self.pair_loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self.pair_loader("val")

    def references(self, split: str) -> dict[int, list[str]]:
        return {i: list(im.captions) for i, im in enumerate(self.splits[split])}


def caption_lengths(images: Sequence[CaptionedImage]) -> np.ndarray:
    return np.array([len(tokenize(c)) for im in images for c in im.captions])
