"""dataset=fashion_clutter (datamodules/clutter_objects.py), tiny: ImageNet's layout, read by the imagefolder
loader; the same parameters give the same bytes; each image is a warped crop around one coloured item on a photo;
bad values are one line before anything is generated."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from datamodules import clutter_objects as co
from datamodules.base import DatasetError, read_image
from datamodules.scene_generator import CLASSES


def _dm(root: Path, fmnist_dir: Path, **kw) -> co.ClutterObjectsDataModule:
    dm = co.ClutterObjectsDataModule(root=root, source_dir=fmnist_dir, images_per_class=3, val_per_class=1,
                                     input_size=28, batch_size=4, eval_batch_size=8, progress=False, **kw)
    dm.setup()
    return dm


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*.JPEG"))}


@pytest.fixture(scope="module")
def clutter(tmp_path_factory, fmnist_dir):
    return _dm(tmp_path_factory.mktemp("clutter"), fmnist_dir)


def test_layout_is_imagenets_and_the_loader_reads_it(clutter):
    root = Path(clutter.data_dir)
    assert root.name == "FashionClutter" and sorted(p.name for p in root.iterdir()) == ["train", "val"]
    assert sorted(p.name for p in (root / "train").iterdir()) == sorted(CLASSES)
    assert sorted(p.name for p in (root / "train" / "bag").iterdir()) == [f"bag_{i:05d}.JPEG" for i in range(3)]
    assert len(list((root / "val" / "coat").iterdir())) == 1
    assert read_image(str(root / "train" / "dress" / "dress_00000.JPEG")).shape == (32, 32, 3)
    assert clutter.layout == "split" and clutter.num_classes == 10
    x, y = next(iter(clutter.train_dataloader()))
    assert x.shape[1:] == (3, 28, 28) and int(y.max()) < 10
    assert len(clutter.test_dataloader().dataset) == 10


def test_items_are_coloured_on_photo_backgrounds(clutter):
    """Unlike Fashion-MNIST (grey on black), a crop has colour and a background that is not black."""
    imgs = np.stack([read_image(str(p)) for p in sorted(Path(clutter.data_dir).rglob("*.JPEG"))]).astype(np.float32)
    chroma = (imgs.max(-1) - imgs.min(-1)).mean(axis=(1, 2))
    assert (chroma > 15).mean() > 0.8, chroma
    border = np.concatenate([imgs[:, 0], imgs[:, -1], imgs[:, :, 0], imgs[:, :, -1]], axis=1).mean(axis=(1, 2))
    assert (border > 20).mean() > 0.8, border


def test_same_parameters_same_bytes_and_reuse(tmp_path, fmnist_dir, clutter):
    again = _dm(tmp_path / "a", fmnist_dir)
    assert _digest(Path(again.data_dir)) == _digest(Path(clutter.data_dir))
    stamp = {p: p.stat().st_mtime_ns for p in Path(again.data_dir).rglob("*.JPEG")}
    _dm(tmp_path / "a", fmnist_dir)  # reused, not rewritten
    assert {p: p.stat().st_mtime_ns for p in Path(again.data_dir).rglob("*.JPEG")} == stamp
    other = _dm(tmp_path / "b", fmnist_dir, world_seed=1)
    assert _digest(Path(other.data_dir)) != _digest(Path(clutter.data_dir))


@pytest.mark.parametrize(("key", "value", "needle"), [("images_per_class", 0, "dataset.images_per_class=0"),
                                                      ("crop_size", 4, "dataset.crop_size=4"),
                                                      ("jpeg_quality", 0, "dataset.jpeg_quality=0")])
def test_bad_values_are_one_line_before_generation(tmp_path, fmnist_dir, key, value, needle):
    with pytest.raises(DatasetError) as err:
        co.ClutterObjectsDataModule(root=tmp_path, source_dir=fmnist_dir, **{key: value})
    assert needle in str(err.value) and "\n" not in str(err.value)
    assert not any(tmp_path.iterdir())
