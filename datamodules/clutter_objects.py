"""``dataset=fashion_clutter``: Fashion-MNIST items recoloured and patterned on crops of the bundled photos, one
labelled object per image, written in ImageNet's layout and read by the real ``imagefolder`` loader.

The role: ImageNet holds VOC's object classes photographed in clutter, so an ImageNet network already knows what a
VOC region looks like. Plain Fashion-MNIST (grey items on black) does not play that role for the generated scenes,
whose items are coloured, patterned and pasted on photos. Each image here is drawn like a scene
(``scene_generator.compose_scene``, 1-3 items at the scenes' scales, from the Fashion-MNIST *training* items; the test
scenes use the t10k items) and cropped around its largest item with a context margin of 16/227 of the box on each
side (clipped to the image), then warped to a square, much as R-CNN warps its regions:

    <root>/<key>/FashionClutter/{train,val}/<class>/<class>_<i>.JPEG

Deterministic from ``world_seed``; generated once (atomic directory, manifest with every parameter) and reused.
"""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np

from datamodules.imagefolder import ImageFolderDataModule
from transferrable.core.artifact_cache import ArtifactCache, digest
from transferrable.core.errors import DatasetError
from transferrable.core.progress import progress as progress_bar

GENERATOR_VERSION = 1
LAYOUT_ROOT = "FashionClutter"
CONTEXT_PAD = 16 / 227  # margin per side as a fraction of the box (R-CNN's 16 of 227 pixels, simplified)


def clutter_params(images_per_class: int, val_per_class: int, crop_size: int, world_seed: int,
                   jpeg_quality: int = 90, data_dir: str | Path | None = None) -> dict:
    """Every parameter that determines the directory (checked before anything is generated)."""
    from datamodules import scene_generator as sg

    for key, value, low in (("images_per_class", images_per_class, 1), ("val_per_class", val_per_class, 0),
                            ("crop_size", crop_size, 8)):
        if int(value) < low:
            raise DatasetError(f"dataset.{key}={value}: expected an integer >= {low}")
    if not 1 <= int(jpeg_quality) <= 100:
        raise DatasetError(f"dataset.jpeg_quality={jpeg_quality}: expected 1-100")
    scene = sg.scene_params(1, 0, 0, seed=int(world_seed), min_objects=1, max_objects=3,
                            data_dir=data_dir or sg.FASHION_MNIST_DIR)
    return {"version": GENERATOR_VERSION, "images_per_class": int(images_per_class),
            "val_per_class": int(val_per_class), "crop_size": int(crop_size), "world_seed": int(world_seed),
            "jpeg_quality": int(jpeg_quality), "scene": scene}


def expected_files(params: dict) -> list[str]:
    from datamodules.scene_generator import CLASSES

    out = []
    for split, n in (("train", params["images_per_class"]), ("val", params["val_per_class"])):
        out += [f"{LAYOUT_ROOT}/{split}/{c}/{c}_{i:05d}.JPEG" for c in CLASSES for i in range(n)]
    return out


def generate_clutter(out_dir: str | Path, params: dict, progress: bool = True) -> Path:
    """Generate (or reuse) ``out_dir/<key>`` and return it."""
    root = Path(os.path.expanduser(str(out_dir))) / digest(params, 12)
    cache = ArtifactCache(root.parent, version=GENERATOR_VERSION, what="generated clutter objects")

    def problem(r: Path) -> str | None:
        files = expected_files(params)
        return next((f"{f} is missing" for f in files[:: max(1, len(files) // 64)] if not (r / f).is_file()), None)

    return cache.get_or_build(params, lambda tmp: _write(tmp, params, progress), kind="dir", name=root.name,
                              validate=problem)


def crop_object(image: np.ndarray, box: list[int], size: int) -> np.ndarray:
    """The box grown by ``CONTEXT_PAD`` of its size on each side (clipped to the image), warped to ``size`` x ``size``."""
    import cv2

    x1, y1, x2, y2 = box
    px, py = CONTEXT_PAD * (x2 - x1), CONTEXT_PAD * (y2 - y1)
    h, w = image.shape[:2]
    xa, ya = max(0, int(round(x1 - px))), max(0, int(round(y1 - py)))
    xb, yb = min(w, int(round(x2 + px))), min(h, int(round(y2 + py)))
    return cv2.resize(image[ya:yb, xa:xb], (size, size), interpolation=cv2.INTER_AREA)


def _write(root: Path, params: dict, progress: bool) -> dict:
    from PIL import Image

    from datamodules import scene_generator as sg

    scene = params["scene"]
    items = sg.load_items(scene["source_files"]["data_dir"], json.dumps(scene["source_files"], sort_keys=True))["train"]
    photos = sg.background_photos()
    missing = [b for b in scene["backgrounds"] if b not in photos]
    if missing:
        raise DatasetError(f"background photos {missing} are not available on this machine")
    want = {split: {c: n for c in sg.CLASSES} for split, n in (("train", params["images_per_class"]),
                                                                 ("val", params["val_per_class"]))}
    total = sum(sum(v.values()) for v in want.values())
    index = 0
    with progress_bar(total=total, desc="generating clutter objects", unit="img", enabled=progress, leave=True) as bar:
        for split in ("train", "val"):
            left = dict(want[split])
            for c in sg.CLASSES:
                (root / LAYOUT_ROOT / split / c).mkdir(parents=True, exist_ok=True)
            while any(left.values()):
                # one independent stream per drawn scene: the files do not depend on the order they are written in
                rng = np.random.default_rng(np.random.SeedSequence([params["world_seed"], 31, index]))
                index += 1
                drawn = sg.compose_scene(rng, scene, items, "train", photos, scene["backgrounds"])
                obj = max(drawn["objects"], key=lambda o: (o["bbox"][2] - o["bbox"][0]) * (o["bbox"][3] - o["bbox"][1]))
                cls = obj["class"]
                if obj["difficult"] or left[cls] == 0:
                    continue
                i = want[split][cls] - left[cls]
                left[cls] -= 1
                buf = io.BytesIO()
                Image.fromarray(crop_object(drawn["image"], obj["bbox"], params["crop_size"])).save(
                    buf, format="JPEG", quality=params["jpeg_quality"])
                (root / LAYOUT_ROOT / split / cls / f"{cls}_{i:05d}.JPEG").write_bytes(buf.getvalue())
                bar.update(1)
    return {"generator": "datamodules.clutter_objects", "classes": list(sg.CLASSES), "scenes_drawn": index}


class ClutterObjectsDataModule(ImageFolderDataModule):
    """The generated directory's ``FashionClutter/`` (train/ and val/ class folders) through ``imagefolder``."""

    name = "fashion_clutter"

    def __init__(self, root: str | Path = ".cache/clutter_objects", images_per_class: int = 2000,
                 val_per_class: int = 100, crop_size: int = 32, world_seed: int = 0, jpeg_quality: int = 90,
                 source_dir: str | Path | None = None, progress: bool = True, **kwargs):
        kwargs.pop("data_dir", None)
        super().__init__(data_dir=None, **kwargs)
        self.gen_root = Path(os.path.expanduser(str(root)))
        self.params = clutter_params(images_per_class, val_per_class, crop_size, world_seed, jpeg_quality,
                                     source_dir)
        self.progress = progress

    def prepare_data(self) -> None:
        self.data_dir = str(generate_clutter(self.gen_root, self.params, progress=self.progress) / LAYOUT_ROOT)
