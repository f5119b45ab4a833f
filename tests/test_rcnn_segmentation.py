"""R-CNN segmentation (task=rcnn_segmentation): masked segment proposals and their cache, fg masking, region
quality, pasting, the IoU metric against hand-computed values, bad segmentation input, and a tiny end-to-end
run on generated scenes that must beat the all-background baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from datamodules.base import DatasetError
from datamodules.scene_generator import encode_palette_png
from models.rcnn.seg_regions import paste_labels, region_quality, warp_full_and_fg, warp_masks
from models.rcnn.segments import SegmentCache, SegmentProposals, hierarchical_grouping, mask_boxes
from transferrable.metrics.seg_eval import ConfusionMatrix, mean_iou


def _blocks(w=64, h=48):
    """Three flat coloured rectangles on a grey background."""
    img = np.full((h, w, 3), 120, np.uint8)
    img[5:20, 5:25] = (220, 30, 30)
    img[25:45, 30:60] = (30, 30, 220)
    img[8:18, 40:55] = (30, 200, 30)
    return img


# -- segment proposals ---------------------------------------------------------------------------------
def test_segments_have_masks_consistent_boxes_and_are_deterministic():
    img = _blocks()
    sp = SegmentProposals(colour_spaces=["hsv", "rgb"], scales=[50], min_size=10, min_area=0.01, max_regions=40)
    masks, boxes = sp.compute(img)
    assert masks.dtype == bool and masks.shape[1:] == (48, 64) and 1 <= len(masks) <= 40
    assert np.array_equal(boxes, mask_boxes(masks))
    for m, b in zip(masks, boxes, strict=True):
        ys, xs = np.nonzero(m)
        assert b.tolist() == [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]
        assert m.sum() >= 0.01 * 48 * 64
    assert len({m.tobytes() for m in masks}) == len(masks)  # no duplicates
    # each coloured block is (almost) exactly one region
    red = np.zeros((48, 64), bool)
    red[5:20, 5:25] = True
    iou = (masks & red).sum((1, 2)) / (masks | red).sum((1, 2))
    assert iou.max() > 0.9
    assert masks.all(0).sum() == 0 or masks.any(0).all()  # (a sanity check on shapes)
    again_masks, again_boxes = SegmentProposals(colour_spaces=["hsv", "rgb"], scales=[50], min_size=10,
                                                min_area=0.01, max_regions=40).compute(img)
    assert np.array_equal(masks, again_masks) and np.array_equal(boxes, again_boxes)


def test_hierarchical_grouping_merges_down_to_one_region():
    labels = np.array([[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3]])
    feat = np.zeros((3, 4, 3), np.float32)
    feat[:2, :2] = 0.9  # segment 0 differs in colour; 1, 2, 3 alike
    members, levels = hierarchical_grouping(feat, labels)
    assert len(members) == 2 * 4 - 1 and sorted(members[-1].tolist()) == [0, 1, 2, 3]
    assert levels[-1] == 1 and levels[0] == len(members)
    merged_pairs = [sorted(m.tolist()) for m in members[4:]]
    assert [0] not in merged_pairs and merged_pairs[0] != [0, 1]  # the odd-coloured segment merges last


def test_segment_cache_hit_size_mismatch_and_whole_image_fallback(tmp_path, caplog):
    sp = SegmentProposals(colour_spaces=["hsv"], scales=[50], min_size=10, max_regions=20)
    cache = SegmentCache(tmp_path, sp)
    img = _blocks()
    m1, b1 = cache.get("a", img)
    assert cache.stats["misses"] == 1 and cache.path("a").is_file()
    m2, b2 = cache.get("a", img)
    assert cache.stats["hits"] == 1 and np.array_equal(m1, m2) and np.array_equal(b1, b2)
    big = np.ascontiguousarray(np.kron(img, np.ones((2, 2, 1), np.uint8)))
    m3, _ = cache.get("a", big)
    assert cache.stats["size_mismatch"] == 1 and m3.shape[1:] == (96, 128) and "128x96" in caplog.text
    other = SegmentCache(tmp_path, SegmentProposals(colour_spaces=["hsv"], scales=[100], min_size=10, max_regions=20))
    assert other.path("a") != cache.path("a")
    # every region under min_area: the whole image is the one region, counted
    huge = SegmentCache(None, SegmentProposals(colour_spaces=["hsv"], scales=[50], min_area=2.0))
    m, b = huge.get("flat", img)
    assert m.shape == (1, 48, 64) and m.all() and b.tolist() == [[0, 0, 64, 48]]
    assert huge.stats["whole_image_fallback"] == 1


# -- features: fg masking ------------------------------------------------------------------------------
def test_fg_input_is_the_mean_outside_the_region():
    img = np.full((40, 40, 3), 200, np.uint8)
    mask = np.zeros((1, 40, 40), bool)
    mask[0, 10:30, 10:20] = True  # the left half of the box below
    boxes = np.array([[10, 10, 30, 30]], np.float32)
    mean, std = (0.2, 0.3, 0.4), (0.5, 0.5, 0.5)
    full, fg = warp_full_and_fg(img, mask, boxes, 32, 4.0, mean, std)
    assert full.shape == fg.shape == (1, 3, 32, 32)
    expected = (200 / 255 - torch.tensor(mean)) / torch.tensor(std)
    inner = full[0, :, 6:26, 6:26]  # inside the box: the image
    assert torch.allclose(inner, expected[:, None, None].expand_as(inner), atol=1e-4)
    # fg: right half of the box (outside the mask) and the context are exactly 0 (= the mean), up to one
    # output pixel of bilinear blending at the mask's border ...
    assert fg[0, :, :, 18:].abs().max() == 0 and fg[0, :, :3, :].abs().max() == 0
    # ... and the region itself keeps the image
    assert torch.allclose(fg[0, :, 8:24, 6:14], full[0, :, 8:24, 6:14])
    wm = warp_masks(mask, boxes, 32, 4.0)
    assert wm.shape == (1, 1, 32, 32) and wm.min() >= 0 and wm.max() <= 1


# -- targets and pasting ---------------------------------------------------------------------------------
def test_region_quality_instance_and_class_with_void():
    gt = np.zeros((4, 6), np.uint8)
    gt[:, :2] = 1  # class 0, instance 1
    gt[:, 4:] = 1  # class 0, instance 2
    gt[0, 3] = 255  # void
    inst = np.zeros_like(gt)
    inst[:, :2], inst[:, 4:], inst[0, 3] = 1, 2, 255
    regions = np.zeros((2, 4, 6), bool)
    regions[0, :, :2] = True  # exactly instance 1
    regions[1, :, :4] = True  # instance 1 + 2 background columns (one void pixel)
    q = region_quality(regions, gt, inst, num_classes=2, mode="instance")
    assert q[0, 0] == pytest.approx(1.0) and q[1, 0] == pytest.approx(8 / 15)  # void pixel not counted
    assert (q[:, 1] == 0).all()
    qc = region_quality(regions, gt, inst, num_classes=2, mode="class")
    assert qc[0, 0] == pytest.approx(8 / 16) and qc[1, 0] == pytest.approx(8 / 23)


def test_paste_highest_score_wins_and_thresholds():
    masks = np.zeros((3, 2, 4), bool)
    masks[0, :, :3] = True
    masks[1, :, 2:] = True
    masks[2, 0, :] = True
    scores = np.array([[0.6, 0.1], [0.2, 0.9], [0.3, 0.35]], np.float32)
    out = paste_labels(masks, scores, np.array([0.5, 0.5]))
    # region 2 is below both thresholds; region 1 (0.9, class 1) wins the overlap column 2
    assert out.tolist() == [[1, 1, 2, 2], [1, 1, 2, 2]]
    out = paste_labels(masks, scores, np.array([0.5, 0.95]))
    assert out.tolist() == [[1, 1, 1, 0], [1, 1, 1, 0]]
    out = paste_labels(masks, scores, 0.25)  # region 2 (0.35) is painted first, so the others cover it
    assert out.tolist() == [[1, 1, 2, 2], [1, 1, 2, 2]]
    out = paste_labels(masks, scores, np.array([0.7, 0.25]))  # region 0 drops out: region 2 shows
    assert out.tolist() == [[2, 2, 2, 2], [0, 0, 2, 2]]


# -- metric ----------------------------------------------------------------------------------------------
def test_mean_iou_hand_computed_void_ignored():
    gt = np.array([[0, 0, 1, 1], [0, 2, 2, 255]])
    pred = np.array([[0, 1, 1, 1], [0, 2, 0, 1]])
    # bg: TP 2 (0,0),(1,0); FP 1 (1,2); FN 1 (0,1) -> 2/4. class1: TP 2, FP 1 (0,1) -> 2/3 (void pixel ignored)
    # class2: TP 1, FN 1 -> 1/2
    cm = ConfusionMatrix(3).update(pred, gt)
    np.testing.assert_allclose(cm.iou(), [0.5, 2 / 3, 0.5])
    assert cm.mean_iou() == pytest.approx((0.5 + 2 / 3 + 0.5) / 3)
    assert cm.pixel_accuracy() == pytest.approx(5 / 7)
    # accumulated over the data set, not averaged per image
    m, iou = mean_iou([pred, np.zeros((1, 2), int)], [gt, np.array([[0, 3]])], 4)
    assert iou[3] == 0.0 and iou[0] == pytest.approx(3 / 6)
    assert np.isnan(ConfusionMatrix(3).update(np.zeros(3), np.zeros(3)).iou()[1])
    with pytest.raises(ValueError, match="labels outside"):
        ConfusionMatrix(2).update(np.array([2]), np.array([0]))


# -- bad input -------------------------------------------------------------------------------------------
def _write_voc(root, masks, image_size=(12, 8)):
    from PIL import Image

    for sub in ("JPEGImages", "SegmentationClass", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i, m in enumerate(masks):
        Image.fromarray(np.zeros((image_size[1], image_size[0], 3), np.uint8)).save(root / "JPEGImages" / f"im{i}.jpg")
        (root / "SegmentationClass" / f"im{i}.png").write_bytes(encode_palette_png(m))
    ids = "".join(f"im{i}\n" for i in range(len(masks)))
    for split in ("train", "val"):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text(ids)
    return root


def test_bad_segmentation_input_is_one_line(tmp_path):
    from datamodules.voc_segmentation import VOCSegmentationDataModule

    good = np.zeros((8, 12), np.uint8)
    good[2:5, 2:6] = 3
    good[0, 0] = 255
    dm = VOCSegmentationDataModule(_write_voc(tmp_path / "ok", [good]), classes=["a", "b", "c"])
    dm.setup()
    item = dm.datasets["test"][0]
    assert item["mask"][2, 2] == 3 and item["boxes"].tolist() == [[2, 2, 6, 5]] and item["labels"].tolist() == [2]
    bad = good.copy()
    bad[1, 1] = 7  # not a class of 3, not void
    dm = VOCSegmentationDataModule(_write_voc(tmp_path / "bad", [bad]), classes=["a", "b", "c"])
    dm.setup()
    with pytest.raises(DatasetError, match=r"im0\.png: unexpected label values \[7\]"):
        dm.datasets["train"][0]
    dm = VOCSegmentationDataModule(_write_voc(tmp_path / "size", [good], image_size=(10, 8)), classes=["a", "b", "c"])
    dm.setup()
    with pytest.raises(DatasetError, match=r"im0\.png: mask is 12x8 but its image .*im0\.jpg is 10x8"):
        dm.datasets["train"][0]
    from PIL import Image

    Image.fromarray(good).convert("RGB").save(tmp_path / "ok" / "SegmentationClass" / "im0.png")
    with pytest.raises(DatasetError, match="expected an indexed-colour"):
        _setup_and_read(VOCSegmentationDataModule(tmp_path / "ok", classes=["a", "b", "c"]))
    with pytest.raises(DatasetError, match="no SegmentationClass"):
        VOCSegmentationDataModule(tmp_path, classes=["a"]).setup()


def _setup_and_read(dm):
    dm.setup()
    return dm.datasets["train"][0]


# -- end to end ------------------------------------------------------------------------------------------
def write_shapes_voc(root, n_images: int, seed: int = 0, size=(64, 48)):
    """A VOC segmentation directory of red discs (class 1) and blue boxes (class 2), one to three per image,
    on textured grey backgrounds, with VOC's 255 void outline; train / val / test split files."""
    import cv2
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    for sub in ("JPEGImages", "SegmentationClass", "SegmentationObject", "ImageSets/Segmentation"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    ids = []
    for i in range(n_images):
        img = np.clip(rng.normal(120, 25, (h, w, 1)) + rng.normal(0, 10, (1, 1, 3)), 0, 255)
        cls = np.zeros((h, w), np.uint8)
        inst = np.zeros((h, w), np.uint8)
        for k in range(int(rng.integers(1, 4))):
            c = int(rng.integers(1, 3))
            shape = np.zeros((h, w), np.uint8)
            cx, cy, r = int(rng.integers(8, w - 8)), int(rng.integers(8, h - 8)), int(rng.integers(5, 12))
            if c == 1:
                cv2.circle(shape, (cx, cy), r, 1, -1)
            else:
                cv2.rectangle(shape, (cx - r, cy - r // 2 - 2), (cx + r, cy + r // 2 + 2), 1, -1)
            m = shape > 0
            colour = np.array([200, 40, 40] if c == 1 else [40, 60, 200]) + rng.normal(0, 15, 3)
            img[m] = colour
            cls[m], inst[m] = c, k + 1
        edge = (cv2.dilate(inst, np.ones((3, 3), np.uint8)) != inst) & (inst > 0)
        cls[edge], inst[edge] = 255, 255
        image_id = f"{i:04d}"
        Image.fromarray(img.astype(np.uint8)).save(root / "JPEGImages" / f"{image_id}.jpg", quality=95)
        (root / "SegmentationClass" / f"{image_id}.png").write_bytes(encode_palette_png(cls))
        (root / "SegmentationObject" / f"{image_id}.png").write_bytes(encode_palette_png(inst))
        ids.append(image_id)
    n_tr, n_va = n_images // 2, n_images // 4
    for split, part in (("train", ids[:n_tr]), ("val", ids[n_tr:n_tr + n_va]), ("test", ids[n_tr + n_va:])):
        (root / "ImageSets" / "Segmentation" / f"{split}.txt").write_text("".join(f"{i}\n" for i in part))
    return root


@pytest.mark.slow
def test_rcnn_segmentation_end_to_end_beats_background(tmp_path):
    import json

    from conftest import compose_train, point_paths_at
    from omegaconf import open_dict

    from engine.rcnn.segmentation import run as segmentation_pipeline
    from transferrable.run.runner import build_datamodule, build_model, build_trainer

    data = write_shapes_voc(tmp_path / "VOCShapes", 32)
    cfg = compose_train([
        "task=rcnn_segmentation", "dataset=voc_segmentation", f"dataset.data_dir={data}", "dataset.classes=[disc,box]",
        "dataset.val_split=val", "dataset.test_split=test", "logger=none", "hardware=cpu", "trainer.precision=32-true",
        "backbone.weights=null", "rcnn_segmentation.segments.max_regions=50", "rcnn_segmentation.layers=[fc6]",
        "rcnn_segmentation.draw_images=2", "++trainer.enable_progress_bar=false", "~callbacks.progress_bar",
        "~callbacks.model_summary", "~callbacks.lr_monitor", "trainer.enable_model_summary=false", "seed=0",
    ])
    cfg = point_paths_at(cfg, tmp_path / "run", tmp_path / "cache")
    torch.manual_seed(0)
    dm = build_datamodule(cfg)
    model = build_model(cfg, dm.num_classes)
    metrics = segmentation_pipeline(cfg, build_trainer(cfg, []), dm, model)
    for k in ("full", "fg", "full+fg"):
        assert 0.0 <= metrics[f"test/{k}/fc6/mean_iou"] <= 1.0
    base = metrics["test/background_only/mean_iou"]
    print("seg e2e", {k: round(v, 4) for k, v in metrics.items() if isinstance(v, float)})
    # all background scores only the background class (~0.85 / 3); the pasted regions must label the shapes
    assert metrics["test/mean_iou"] > base + 0.25, metrics
    assert metrics["test/oracle_regions/mean_iou"] > 0.6
    tables = json.loads((tmp_path / "run" / "tables.json").read_text())
    assert tables[0]["columns"] == ["full fc6", "fg fc6", "full+fg fc6"]
    assert tables[1]["columns"] == ["bg", "disc", "box", "mean"] and len(tables[1]["rows"]) == 4
    assert (tmp_path / "run" / "segmentations.png").is_file()
    # a second run reuses segments and features from the cache and gives the same numbers
    torch.manual_seed(0)  # the same random weights: the feature cache key is their hash
    with open_dict(cfg):  # the same caches, another output directory
        cfg.paths.output_dir = str(tmp_path / "run2")
    model2 = build_model(cfg, dm.num_classes)
    m2 = segmentation_pipeline(cfg, build_trainer(cfg, []), dm, model2)
    assert model2.stats["feature_cache_test"] == "hit"
    assert m2["test/mean_iou"] == pytest.approx(metrics["test/mean_iou"])


@pytest.mark.parametrize("overrides", [["task=rcnn_segmentation"], ["experiment=rcnn_segmentation"],
                                       ["task=rcnn_segmentation", "dataset=voc_segmentation"]])
def test_rcnn_segmentation_configs_compose(overrides):
    from conftest import compose_train

    cfg = compose_train(overrides)
    assert cfg.model._target_ == "lightning_modules.rcnn_segmentation.RCNNSegmentationModule"
    assert cfg.backbone.weights == f"source:{cfg.source_dataset}" and cfg.optimized_metric == "test/mean_iou"
    assert cfg.rcnn_segmentation.segments.max_regions == 150
    assert list(cfg.rcnn_segmentation.features) == ["full", "fg", "full+fg"]
    assert list(cfg.rcnn_segmentation.layers) == ["fc6", "fc7"]


def test_sbd_extra_annotations_join_train_but_never_test(tmp_path):
    from PIL import Image
    from scipy.io import savemat

    from datamodules.voc_segmentation import VOCSegmentationDataModule

    m = np.zeros((8, 12), np.uint8)
    m[2:6, 3:9] = 2
    voc = _write_voc(tmp_path / "VOC", [m, m])  # im0, im1 in train and val (= test here)
    (voc / "ImageSets" / "Segmentation" / "train.txt").write_text("im0\n")
    (voc / "ImageSets" / "Segmentation" / "val.txt").write_text("im1\n")
    sbd = tmp_path / "sbd"
    for sub in ("img", "cls", "inst"):
        (sbd / sub).mkdir(parents=True)
    for image_id in ("im1", "s1", "s2"):  # im1 is a test image: must not join train
        Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(sbd / "img" / f"{image_id}.jpg")
        savemat(sbd / "cls" / f"{image_id}.mat", {"GTcls": {"Segmentation": m}})
        savemat(sbd / "inst" / f"{image_id}.mat", {"GTinst": {"Segmentation": (m > 0).astype(np.uint8)}})
    (sbd / "train.txt").write_text("im1\ns1\ns2\n")
    dm = VOCSegmentationDataModule(voc, classes=["a", "b"], sbd_dir=sbd)
    dm.setup()
    assert [r.image_id for r in dm.datasets["train"].records] == ["im0", "s1", "s2"]
    assert dm.summary["sbd_images"] == 2 and [r.image_id for r in dm.datasets["test"].records] == ["im1"]
    item = dm.datasets["train"][2]
    assert item["mask"][3, 4] == 2 and item["instances"][3, 4] == 1 and item["labels"].tolist() == [1]
