"""R-CNN diagnosis (thesis Figures 3.4 / 3.5), single-run table cells, and the roi_pool feature path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from engine.rcnn.analysis import (
    breakdown_curve,
    false_positive_types,
    plot_false_positive_breakdown,
    top_regions_per_unit,
)


def test_false_positive_types_hand_made():
    # one image: class 0 object at A, class 1 (similar to 0) at S, class 2 (dissimilar) at OT, difficult class-0 at D
    A, S, OT, D = [0, 0, 10, 10], [30, 0, 40, 10], [60, 0, 70, 10], [0, 60, 10, 70]
    gt = [{"boxes": np.array([A, S, OT, D], np.float32), "labels": np.array([0, 1, 2, 0]),
           "difficult": np.array([False, False, False, True])}]
    dets = [{"boxes": np.array([A, A, [0, 0, 10, 4], S, OT, [80, 80, 90, 90], D], np.float32),
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
    from transferrable.run.report import render_table

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


def test_grayscale_fold_keeps_gray_responses_and_drops_colour_noise():
    from models.backbones import CaffeNetMini
    from models.weights import fold_conv1_colour

    torch.manual_seed(0)
    net = CaffeNetMini(input_size=32).eval()
    gray = torch.rand(4, 1, 32, 32).expand(4, 3, 32, 32).contiguous()
    colour = torch.rand(4, 3, 32, 32)
    with torch.no_grad():
        before = net.forward_taps(gray, "conv1")["conv1"]
        removed = fold_conv1_colour(net)
        after = net.forward_taps(gray, "conv1")["conv1"]
        lum = net.forward_taps(colour.mean(1, keepdim=True).expand(4, 3, 32, 32).contiguous(), "conv1")["conv1"]
        col = net.forward_taps(colour, "conv1")["conv1"]
    assert removed > 0.1 and fold_conv1_colour(net) == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-5)  # grayscale inputs: unchanged
    torch.testing.assert_close(col, lum, rtol=1e-4, atol=1e-5)  # colour inputs: seen as their channel mean


def test_vgg16_headline_is_cpu_sized():
    """``task=rcnn backbone=vgg16`` picks conf/task_backbone/rcnn-vgg16.yaml: 32 px, 512-D pool5/fc7, a short
    source recipe; other tasks and backbones are untouched."""
    from conftest import compose_train
    from hydra.utils import instantiate

    cfg = compose_train(["task=rcnn", "backbone=vgg16"])
    assert cfg.backbone.input_size == 32 and cfg.backbone.pool5_size == 1 and cfg.backbone.fc_dim == 512
    assert cfg.source_overrides.trainer.max_epochs == 1 and cfg.source_overrides.dataset.max_train_samples == 10000
    assert compose_train(["task=rcnn"]).backbone.input_size == 28 and not compose_train(["task=rcnn"]).source_overrides
    assert compose_train(["task=classify", "backbone=vgg16"]).backbone.input_size == 64
    arch = compose_train(["experiment=rcnn_archs", "backbone=vgg16"]).backbone
    assert arch.input_size == 64 and arch.pool5_size == 2  # the experiment still wins
    bb = instantiate({**cfg.backbone, "weights": None})
    assert bb.feature_dim("pool5") == 512 and bb.feature_dim("fc7") == 512
    with torch.no_grad():
        out = bb.eval().forward_taps(torch.zeros(2, 3, 32, 32), ["pool5", "fc7"])
    assert out["pool5"].flatten(1).shape == (2, 512) and out["fc7"].shape == (2, 512)


def _toy_image_set(n_images: int = 3):
    """Images with one bright square object each and a grid of proposals around it (labels 0..1)."""
    from models.rcnn.windows import ImageSet

    rng = np.random.default_rng(0)
    items, props = [], []
    for i in range(n_images):
        image = rng.integers(0, 60, (64, 80, 3), dtype=np.uint8)
        x0, y0 = 10 + 8 * i, 12
        image[y0:y0 + 28, x0:x0 + 28] = 230
        gt = np.array([[x0, y0, x0 + 28, y0 + 28]], np.float32)
        grid = np.array([[x, y, x + w, y + w] for x in range(0, 60, 6) for y in range(0, 40, 6) for w in (16, 28)],
                        np.float32)
        items.append({"image_id": f"im{i}", "image": image, "boxes": gt, "labels": np.array([i % 2]),
                      "difficult": np.zeros(1, bool)})
        props.append(np.clip(grid, 0, [80, 64, 80, 64]).astype(np.float32))
    return ImageSet("toy", items, props, with_gt=True)


def test_roi_batches_take_whole_images_positives_first():
    """finetune.windows=roi_pool: a minibatch is `roi_images` whole images, each with an even share of the
    regions, its positives (IoU >= 0.5, class + 1) first; the same item index gives the same minibatch."""
    from models.rcnn.regions import assign_labels
    from models.rcnn.windows import RoiBatches

    data = _toy_image_set()
    labels = [assign_labels(b, g["boxes"], g["labels"], 0.5)[0] for b, g in zip(data.boxes, data.gt, strict=True)]
    batches = RoiBatches(data, labels, 5, 8, 24, 32, 2.0, (0.5,) * 3, (0.25,) * 3, 0, images=2)
    images, boxes, y = batches[3]
    assert len(images) == 2 and all(im.shape == (1, 3, 64, 80) for im in images)
    assert [len(b) for b in boxes] == [16, 16] and y.shape == (32,)
    for lab in y.split(16):
        n_fg = int((lab > 0).sum())
        assert 1 <= n_fg <= 4 and (lab[:n_fg] > 0).all() and (lab[n_fg:] == 0).all()
    again = batches[3]
    assert all(torch.equal(a, b) for a, b in zip(boxes, again[1], strict=True))


def test_roi_fine_tuning_trains_conv_layers_through_roi_pooling():
    """The Fast R-CNN path is differentiable down to conv1, its logits in eval mode equal the head on the
    roi_pool test features of the same boxes, and a few SGD steps fit a fixed minibatch."""
    from engine.rcnn.finetune import window_accuracy
    from lightning_modules.rcnn import RCNNModule
    from models.backbones import CaffeNetMini
    from models.rcnn.regions import assign_labels
    from models.rcnn.windows import RoiBatches

    torch.manual_seed(0)
    data = _toy_image_set()
    m = RCNNModule(CaffeNetMini(input_size=32), 2, feature_mode="roi_pool", bf16=False, channels_last=False,
                   cache=False, finetune={"windows": "roi_pool"})
    m.pool5_dim = m.backbone.feature_dim("pool5")
    labels = [assign_labels(b, g["boxes"], g["labels"], 0.5)[0] for b, g in zip(data.boxes, data.gt, strict=True)]
    batch = RoiBatches(data, labels, 1, 8, 24, 32, 2.0, (0.5,) * 3, (0.25,) * 3, 0, images=2)[0]
    m.eval()
    with torch.no_grad():
        logits, y = m.window_logits(batch)
        pool5 = np.concatenate([m.image_pool5(data.images[i], b.numpy(), (0.5,) * 3, (0.25,) * 3)
                                for i, b in zip(_chosen(data, batch), batch[1], strict=True)])
        ref = m.head(m.backbone.stages["fc7"](m.backbone.stages["fc6"](torch.from_numpy(pool5))))
    torch.testing.assert_close(logits, ref, rtol=1e-4, atol=1e-5)
    m.train()
    opt = torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9)
    conv1 = next(m.backbone.stages["conv1"].parameters()).detach().clone()
    losses = []
    for _ in range(25):
        logits, y = m.window_logits(batch)
        loss = torch.nn.functional.cross_entropy(logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert not torch.equal(conv1, next(m.backbone.stages["conv1"].parameters()))
    assert losses[-1] < 0.5 * losses[0], losses
    acc = window_accuracy(m, data, (0.5,) * 3, (0.25,) * 3, batches=2)  # held-out style accuracy, same path
    assert acc["windows"] == 2 * (32 + 96) and 0.0 <= acc["fg_acc"] <= 1.0 and m.training


def _chosen(data, batch):
    """Which images of ``data`` a RoI minibatch holds (matched by pixels)."""
    from models.rcnn.regions import image_tensor

    out = []
    for im in batch[0]:
        out.append(next(i for i in range(len(data.images))
                        if torch.equal(image_tensor(data.images[i], (0.5,) * 3, (0.25,) * 3), im)))
    return out


def test_roi_fine_tuning_default_follows_feature_mode_and_bad_value_is_one_line():
    from conftest import compose_train

    assert compose_train(["task=rcnn", "rcnn.feature_mode=roi_pool"]).model.cfg.finetune.windows == "roi_pool"
    assert compose_train(["task=rcnn"]).model.cfg.finetune.windows == "warp"
    from lightning_modules.rcnn import RCNNModule
    from models.backbones import CaffeNetMini

    with pytest.raises(ValueError, match=r"rcnn.finetune.windows=crop: expected one of \['warp', 'roi_pool'\]"):
        RCNNModule(CaffeNetMini(input_size=32), 2, finetune={"windows": "crop"})
