"""The generated world (datamodules/fractal_generator.py, fractal_world.py): ImageNet-, Caltech-101- and
Office-31-role directories, tiny. Same parameters -> same bytes; the real layouts; the imagefolder loader reads
them; category sets are disjoint; the roles differ as documented; bad values are one line."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from datamodules import fractal_generator as fg
from datamodules.base import DatasetError, read_image
from datamodules.fractal_world import FractalWorldDataModule


def _tree_digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def _dm(root: Path, **kw) -> FractalWorldDataModule:
    dm = FractalWorldDataModule(root=root, input_size=28, batch_size=4, eval_batch_size=8, progress=False, **kw)
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return {
        "root": root,
        "imagenet": _dm(root, role="imagenet", n_classes=4, images_per_class=5, val_per_class=2),
        "caltech": _dm(root, role="caltech", n_classes=3, images_per_class=6, train_per_class=3),
        "office": {d: _dm(root, role="office", n_classes=3, images_per_class=6, domain=d) for d in fg.OFFICE_DOMAINS},
    }


def test_layouts_are_the_real_datasets(world):
    inet = Path(world["imagenet"].data_dir)
    assert inet.name == "FractalNet" and sorted(p.name for p in inet.iterdir() if p.is_dir()) == ["train", "val"]
    assert sorted(p.name for p in (inet / "train" / "n0000000").iterdir()) == [f"n0000000_{i:05d}.JPEG" for i in range(5)]
    assert len(list((inet / "val" / "n0000003").iterdir())) == 2
    cal = Path(world["caltech"].data_dir)
    assert cal.name == "101_ObjectCategories"
    assert sorted(p.name for p in (cal / "c2000001").iterdir()) == [f"image_{i:04d}.jpg" for i in range(1, 7)]
    for domain, dm in world["office"].items():
        d = Path(dm.data_dir)
        assert d.parts[-3:] == ("office31", domain, "images"), d
        assert sorted(p.name for p in (d / "o3000002").iterdir()) == [f"frame_{i:04d}.jpg" for i in range(1, 7)]
    # sizes as documented: 32 px ImageNet role, 48 px Caltech, 64 px dslr
    assert read_image(str(inet / "train" / "n0000000" / "n0000000_00000.JPEG")).shape == (32, 32, 3)
    assert read_image(str(cal / "c2000000" / "image_0001.jpg")).shape == (48, 48, 3)
    assert read_image(str(Path(world["office"]["dslr"].data_dir) / "o3000000" / "frame_0001.jpg")).shape == (64, 64, 3)


def test_loaders_read_the_splits(world):
    inet = world["imagenet"]
    assert inet.layout == "split" and inet.num_classes == 4
    # val/ is the test set (ImageNet style), validation carved from train/
    assert len(inet.splits["test"]) == 8 and len(inet.splits["train"]) + len(inet.splits["val"]) == 20
    cal = world["caltech"]
    assert cal.layout == "flat" and cal.class_names == ["c2000000", "c2000001", "c2000002"]
    assert len(cal.splits["test"]) == 9  # 6 per class, 3 for training (the 30-per-class protocol, tiny)
    x, y = next(iter(cal.train_dataloader()))
    assert x.shape[1:] == (3, 28, 28) and x.dtype.is_floating_point


def test_same_parameters_same_bytes_and_reuse(world, tmp_path):
    again = _dm(tmp_path, role="caltech", n_classes=3, images_per_class=6, train_per_class=3)
    first = Path(world["caltech"].data_dir).parent
    assert _tree_digest(Path(again.data_dir).parent) == _tree_digest(first)
    before = {p: p.stat().st_mtime_ns for p in Path(again.data_dir).rglob("*.jpg")}
    _dm(tmp_path, role="caltech", n_classes=3, images_per_class=6, train_per_class=3)  # reused, not rewritten
    assert {p: p.stat().st_mtime_ns for p in Path(again.data_dir).rglob("*.jpg")} == before
    other = _dm(tmp_path, role="caltech", n_classes=3, images_per_class=6, train_per_class=3, world_seed=1)
    assert _tree_digest(Path(other.data_dir).parent) != _tree_digest(first)


def test_category_sets_are_disjoint_and_images_vary():
    sets = {name: {fg.category_code(0, off + i)[1].tobytes() for i in range(20)} for name, off in fg.CATEGORY_SETS.items()}
    names = list(sets)
    for i, a in enumerate(names):
        assert len(sets[a]) == 20
        for b in names[i + 1:]:
            assert not sets[a] & sets[b], (a, b)
    # every code is contractive and fills its box within the filter's range
    for i in range(20):
        A, b, p = fg.category_code(0, i)
        assert np.linalg.svd(A, compute_uv=False).max() < 1 and abs(p.sum() - 1) < 1e-9
        pts, _ = fg.chaos_game(A, b, p, np.random.default_rng(0), walkers=512)
        assert fg.FILL_RANGE[0] <= fg.fill_fraction(pts) <= fg.FILL_RANGE[1]


def test_roles_differ_as_documented(world):
    """Product shots are bright plain backgrounds; webcam shots are blurrier than dslr shots of the same instances."""
    import cv2

    def stats(dm):
        paths = [p for p in Path(dm.data_dir).rglob("*.jpg")]
        imgs = [cv2.resize(read_image(str(p)), (48, 48), interpolation=cv2.INTER_AREA).astype(np.float32) for p in paths]
        border = np.mean([np.concatenate([im[:3].reshape(-1, 3), im[-3:].reshape(-1, 3)]).mean() for im in imgs])
        sharp = np.mean([cv2.Laplacian(cv2.cvtColor(im, cv2.COLOR_RGB2GRAY), cv2.CV_32F).var() for im in imgs])
        return border, sharp

    amazon, webcam, dslr = (stats(world["office"][d]) for d in ("amazon", "webcam", "dslr"))
    assert amazon[0] > 200 and amazon[0] > webcam[0] and amazon[0] > dslr[0]
    assert webcam[1] < 0.5 * dslr[1]


def test_bad_values_are_one_line(tmp_path):
    with pytest.raises(DatasetError, match=r"dataset.role='imagenett'"):
        FractalWorldDataModule(root=tmp_path, role="imagenett")
    with pytest.raises(DatasetError, match=r"dataset.domain='amazn'.*amazon"):
        FractalWorldDataModule(root=tmp_path, role="office", domain="amazn")
    with pytest.raises(DatasetError, match=r"dataset.category_set='train'"):
        FractalWorldDataModule(root=tmp_path, role="caltech", category_set="train")
    assert not any(tmp_path.iterdir())  # refused before anything was generated


def test_in_memory_decoding_matches_the_files(world):
    """dataset.in_memory=true decodes each file once into an array and transforms batches as tensors: the same
    images, the same labels and (up to resize rounding) the same normalised pixels as reading the files."""
    import torch

    root = world["root"]
    on_disk = world["caltech"]
    in_mem = _dm(root, role="caltech", n_classes=3, images_per_class=6, train_per_class=3, in_memory=True)
    for split in ("train", "val", "test"):
        a, b = on_disk.splits[split], in_mem.splits[split]
        assert isinstance(b.images, np.ndarray) and b.images.shape[1:] == (48, 48, 3)
        assert list(a.labels) == list(b.labels)
        assert np.array_equal(b.images[0], read_image(a.images[0]))
    xa = torch.stack([on_disk.splits["test"][i][0] for i in range(4)])
    xb = torch.stack([in_mem.splits["test"][i][0] for i in range(4)])
    assert xa.shape == xb.shape and (xa - xb).abs().mean() < 0.05
