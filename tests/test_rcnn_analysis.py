"""R-CNN diagnosis (thesis Figures 3.4 / 3.5), single-run table cells, and the roi_pool feature path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from transferrable.detection_analysis import (
    breakdown_curve,
    false_positive_types,
    plot_false_positive_breakdown,
    top_regions_per_unit,
)


def test_false_positive_types_hand_made():
    # one image: class 0 object at A, class 1 (similar to 0) at S, class 2 (dissimilar) at O, difficult class-0 at D
    A, S, O, D = [0, 0, 10, 10], [30, 0, 40, 10], [60, 0, 70, 10], [0, 60, 10, 70]
    gt = [{"boxes": np.array([A, S, O, D], np.float32), "labels": np.array([0, 1, 2, 0]),
           "difficult": np.array([False, False, False, True])}]
    dets = [{"boxes": np.array([A, A, [0, 0, 10, 4], S, O, [80, 80, 90, 90], D], np.float32),
             "scores": np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3]), "labels": np.zeros(7, int)}]
    types = false_positive_types(dets, gt, 3, similar=[[0, 1]])
    # TP, duplicate (Loc), IoU 0.4 with A (Loc), similar class (Sim), other class (Oth), nothing (BG), difficult
    assert types[0] == ["Loc", "Loc", "Sim", "Oth", "BG"]
    assert types[1] == [] and types[2] == []
    curve = breakdown_curve([types[0]], [1, 5])
    np.testing.assert_allclose(curve[0], [100, 0, 0, 0])
    np.testing.assert_allclose(curve[1], [40, 20, 20, 20])


def test_fp_plot_and_top_regions(tmp_path):
    path = plot_false_positive_breakdown([["BG", "Loc"], ["Sim"]], ["a", "b"], {"ab": ["a", "b"]}, tmp_path / "fp.png")
    assert path.is_file() and path.stat().st_size > 1000
    act = np.array([[5.0, 0], [4.9, 1], [1.0, 2], [3.0, 3]])
    image = np.array([0, 0, 0, 1])
    boxes = np.array([[0, 0, 10, 10], [1, 1, 10, 10], [50, 50, 60, 60], [0, 0, 10, 10]], np.float32)
    # unit 0: row 1 overlaps row 0 in the same image (suppressed); row 3 is another image
    assert top_regions_per_unit(act, image, boxes, [0, 1], top=3) == [[0, 3, 2], [3, 2, 1]]


def test_single_run_cells_print_without_std():
    from transferrable.report import render_table

    t = {"title": "t", "corner": "v", "columns": ["a", "b", "c"], "rows": [{"label": "r", "cells": [[12.345], [1.0, 0.5], None]}]}
    assert "| r | 12.35 | 1.00 ± 0.50 | - |" in render_table(t)


def test_roi_pool_features_match_a_direct_pool_of_conv5():
    """feature_mode=roi_pool: pool5 of every box is the max over its cells of the image's conv5 map
    (torchvision roi_pool at 1/stride), one conv pass per image; whole-image boxes differ from warped ones."""
    from torchvision.ops import roi_pool

    from lightning_modules.rcnn import RCNNModule
    from models.backbones import CaffeNetMini
    from models.rcnn.regions import image_tensor

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    image = rng.integers(0, 255, (48, 64, 3), dtype=np.uint8)
    boxes = np.array([[0, 0, 64, 48], [8, 8, 40, 40], [30, 10, 60, 44]], np.float32)
    mean, std = (0.5,) * 3, (0.25,) * 3
    feats = {}
    for mode in ("roi_pool", "warp"):
        torch.manual_seed(0)
        m = RCNNModule(CaffeNetMini(input_size=32), 3, feature_mode=mode, bf16=False, channels_last=False,
                       cache=False).eval()
        m.pool5_dim = m.backbone.feature_dim("pool5")
        feats[mode] = m.image_pool5(image, boxes, mean, std)
        assert feats[mode].shape == (3, m.pool5_dim)
        if mode == "roi_pool":
            assert m.timing["cnn"] > 0 and m.timing.get("warp", 0.0) == 0.0
            with torch.inference_mode():
                x = image_tensor(image, mean, std)
                fmap = m.backbone.forward_taps(x, "conv5")["conv5"]
                stride = x.shape[-1] / fmap.shape[-1]
                rois = torch.cat([torch.zeros(3, 1), torch.from_numpy(boxes)], 1)
                ref = roi_pool(fmap, rois, (m.pool5_grid, m.pool5_grid), 1.0 / stride).flatten(1).numpy()
            np.testing.assert_allclose(feats[mode], ref, rtol=1e-5, atol=1e-6)
    assert not np.allclose(feats["roi_pool"], feats["warp"])


@pytest.mark.parametrize("scale", [0.5, 2.0])
def test_roi_pool_scale_resizes_image_and_boxes(scale):
    from lightning_modules.rcnn import RCNNModule
    from models.backbones import CaffeNetMini

    torch.manual_seed(0)
    image = np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8)
    boxes = np.array([[0, 0, 64, 64], [16, 16, 48, 48]], np.float32)
    m = RCNNModule(CaffeNetMini(input_size=32), 2, feature_mode="roi_pool", roi_scale=scale, bf16=False,
                   channels_last=False, cache=False).eval()
    m.pool5_dim = m.backbone.feature_dim("pool5")
    f = m.image_pool5(image, boxes, (0.5,) * 3, (0.25,) * 3)
    assert f.shape == (2, m.pool5_dim) and np.isfinite(f).all()
    assert not np.allclose(f[0], f[1])  # the sub-box pools a different part of the map
