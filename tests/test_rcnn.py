"""R-CNN (task=rcnn): VOC AP, label assignment, warping, proposal cache, SVM mining, box regression, NMS,
and one tiny end-to-end run on generated scenes."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.rcnn import proposals as P
from models.rcnn.bbox_regression import BoxRegressor, decode, encode
from models.rcnn.regions import assign_labels, class_max_iou, context_boxes, scaled_pad, warp_regions
from models.rcnn.svm import HardNegativeMiner, fit_linear_svm, norm_scale
from transferrable.metrics.voc_eval import average_precision, box_iou, evaluate_class, evaluate_detections

A, B, C = [0, 0, 10, 10], [0, 0, 10, 10], [20, 20, 30, 30]
FAR = [50, 50, 60, 60]


# -- VOC AP ---------------------------------------------------------------------------------------
def _case():
    """img0: A; img1: B and C (difficult). Detections by score: A (TP), FAR (FP), C (difficult: ignored),
    B (TP), A again (duplicate: FP). npos = 2."""
    gt_boxes = [np.array([A], np.float32), np.array([B, C], np.float32)]
    gt_diff = [np.array([False]), np.array([False, True])]
    img = [0, 1, 1, 1, 0]
    scores = [0.9, 0.8, 0.7, 0.6, 0.5]
    boxes = np.array([A, FAR, C, B, A], np.float32)
    return img, scores, boxes, gt_boxes, gt_diff


def test_voc_ap_hand_computed_both_conventions_and_difficult():
    r = evaluate_class(*_case())
    assert r.npos == 2
    assert r.tp.tolist() == [1, 0, 0, 1, 0] and r.fp.tolist() == [0, 1, 0, 0, 1]  # difficult: neither
    np.testing.assert_allclose(r.recall, [0.5, 0.5, 0.5, 1.0, 1.0])
    np.testing.assert_allclose(r.precision, [1, 0.5, 0.5, 2 / 3, 0.5])
    # area: 0.5 * 1 + 0.5 * max(2/3, 1/2) = 0.8333; 11-point: (6 * 1 + 5 * 2/3) / 11
    assert r.ap == pytest.approx(0.5 + 0.5 * 2 / 3)
    assert r.ap07 == pytest.approx((6 + 5 * 2 / 3) / 11)
    # the same detections with C not difficult: C becomes a TP and recall is over 3 boxes
    img, scores, boxes, gtb, _ = _case()
    r2 = evaluate_class(img, scores, boxes, gtb, [np.array([False]), np.array([False, False])])
    assert r2.npos == 3 and r2.tp.tolist() == [1, 0, 1, 1, 0]


def test_voc_ap_edge_cases():
    assert average_precision(np.array([1.0]), np.array([1.0]), "area") == pytest.approx(1.0)
    assert average_precision(np.array([1.0]), np.array([1.0]), "voc07") == pytest.approx(1.0)
    # half the objects found at precision 1: area 0.5, 11-point 6/11
    assert average_precision(np.array([0.5]), np.array([1.0]), "area") == pytest.approx(0.5)
    assert average_precision(np.array([0.5]), np.array([1.0]), "voc07") == pytest.approx(6 / 11)
    with pytest.raises(ValueError, match="convention"):
        average_precision(np.array([1.0]), np.array([1.0]), "coco")
    # IoU exactly 0.5 counts (>=); a class without ground truth is NaN and left out of the mean
    gt = [{"boxes": np.array([[0, 0, 10, 20]], np.float32), "labels": np.array([0]), "difficult": np.array([False])}]
    det = [{"boxes": np.array([[0, 0, 10, 10], [0, 0, 5, 5]], np.float32), "scores": np.array([0.9, 0.1]),
            "labels": np.array([0, 1])}]
    ev = evaluate_detections(det, gt, num_classes=2)
    assert ev["ap"][0] == pytest.approx(1.0) and math.isnan(ev["ap"][1])
    assert ev["mAP"] == pytest.approx(1.0) and ev["mAP_07"] == pytest.approx(1.0)


# -- labels ---------------------------------------------------------------------------------------
def test_label_assignment_and_class_overlaps():
    gt = np.array([[0, 0, 10, 20], [50, 50, 70, 70]], np.float32)
    gl = np.array([3, 1])
    boxes = np.array([[0, 0, 10, 10],      # IoU 0.5 with gt0 -> class 3 (+1)
                      [0, 0, 10, 9],       # IoU 0.45 -> background
                      [52, 52, 70, 70],    # IoU 0.81 with gt1 -> class 1 (+1)
                      [100, 100, 110, 110]], np.float32)
    labels, iou, arg = assign_labels(boxes, gt, gl, 0.5)
    assert labels.tolist() == [4, 0, 2, 0]
    assert iou[0] == pytest.approx(0.5) and arg[2] == 1
    m = class_max_iou(boxes, gt, gl, num_classes=5)
    assert m.shape == (4, 5) and m[0, 3] == pytest.approx(0.5) and m[2, 1] > 0.8 and m[:, [0, 2, 4]].max() == 0
    labels, _, arg = assign_labels(boxes, np.zeros((0, 4)), np.zeros(0), 0.5)
    assert labels.tolist() == [0, 0, 0, 0] and (arg == -1).all()


# -- warping --------------------------------------------------------------------------------------
def test_warp_context_padding_geometry():
    assert scaled_pad(227) == pytest.approx(16.0) and scaled_pad(32) == pytest.approx(16 * 32 / 227)
    d = context_boxes(np.array([[40, 40, 60, 60]], np.float32), size=32, pad=4).numpy()[0]
    # the 20 px box must cover 32 - 2*4 = 24 output px: each side grows by 4 * 20 / 24
    np.testing.assert_allclose(d, [40 - 10 / 3, 40 - 10 / 3, 60 + 10 / 3, 60 + 10 / 3], rtol=1e-5)
    img = np.zeros((100, 100, 3), np.uint8)
    img[40:60, 40:60] = 255
    out = warp_regions(img, np.array([[40, 40, 60, 60]], np.float32), 32, 4, mean=(0, 0, 0), std=(1, 1, 1))
    assert out.shape == (1, 3, 32, 32)
    assert out[0, :, 5:27, 5:27].min() > 0.99  # the box itself fills the inner 24 px
    assert out[0, :, :3, :].max() < 0.01 and out[0, :, :, :3].max() < 0.01  # black context around it


def test_warp_out_of_image_is_mean():
    img = np.full((50, 50, 3), 255, np.uint8)
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    out = warp_regions(img, np.array([[0, 0, 20, 20]], np.float32), 32, 4, mean=mean, std=std)
    # dilated box starts at -3.3 px: the first output rows/columns lie outside the image -> mean (0)
    assert out[0, :, :2, :].abs().max() < 1e-6 and out[0, :, :, :2].abs().max() < 1e-6
    assert out[0, :, 10:20, 10:20].sub(2.0).abs().max() < 1e-4  # inside: (1 - 0.5) / 0.25


# -- proposals --------------------------------------------------------------------------------------
def _photo(w=96, h=72):
    rng = np.random.default_rng(0)
    img = np.full((h, w, 3), 40, np.uint8)
    for _ in range(4):
        x, y = rng.integers(0, w - 20), rng.integers(0, h - 20)
        img[y:y + 18, x:x + 16] = rng.integers(0, 255, 3)
    return img


def test_proposal_cache_hit_miss_size_mismatch(tmp_path, caplog):
    cache = P.ProposalCache(tmp_path, method="selective_search", mode="single", width=120, max_proposals=200)
    img = _photo()
    boxes = cache.get("im1", img)
    assert len(boxes) > 0 and cache.stats["misses"] == 1
    assert (boxes[:, 2] <= 96).all() and (boxes[:, 3] <= 72).all() and (boxes[:, :2] >= 0).all()
    again = cache.get("im1", img)
    assert cache.stats["hits"] == 1 and np.array_equal(boxes, again)
    bigger = np.ascontiguousarray(np.kron(img, np.ones((2, 2, 1), np.uint8)))  # same id, another size
    b2 = cache.get("im1", bigger)
    assert cache.stats["size_mismatch"] == 1 and cache.stats["misses"] == 2 and "192x144" in caplog.text
    assert b2[:, 2].max() > 96  # recomputed for the new size (and stored)
    assert np.array_equal(cache.get("im1", bigger), b2) and cache.stats["hits"] == 2
    cache.path("im1").write_bytes(b"garbage")
    cache.get("im1", bigger)
    assert cache.stats["corrupt"] == 1
    other = P.ProposalCache(tmp_path, method="selective_search", mode="fast", width=120, max_proposals=200)
    assert other.path("im1") != cache.path("im1")  # mode is part of the key


def test_proposals_empty_fallback_and_sliding_windows(tmp_path, monkeypatch):
    sw = P.sliding_windows(80, 60)
    assert len(sw) > 10 and [0, 0, 80, 60] in sw.tolist()
    assert (sw[:, 2] <= 80).all() and (sw[:, 3] <= 60).all()
    monkeypatch.setattr(P, "selective_search", lambda *a, **k: np.zeros((0, 4), np.float32))
    cache = P.ProposalCache(tmp_path, mode="fast", width=100)
    boxes = cache.get("flat", np.zeros((60, 80, 3), np.uint8))
    assert cache.stats["empty_fallback"] == 1 and len(boxes) > 0
    cleaned = P.clean_boxes(np.array([[-5, -5, 200, 10], [3, 3, 4, 40], [0, 0, 10, 10], [0, 0, 10, 10]]), 80, 60)
    assert cleaned.tolist() == [[0, 0, 80, 10], [0, 0, 10, 10]]


# -- SVMs -------------------------------------------------------------------------------------------
def test_hard_negative_mining_thresholds_and_bounded_cache():
    fits = []

    def fake_fit(pos, neg, **kw):  # score = x (1-d features)
        fits.append(len(neg))
        return np.array([1.0], np.float32), 0.0

    m = HardNegativeMiner(2, 1, retrain_limit=3, max_cache=3, fit=fake_fit)
    m.set_positives(0, np.array([[5.0]]))  # class 1 has no positives: never trained, nothing cached
    X = np.array([[-2.0], [-1.1], [-1.3], [0.5]], np.float32)
    mask = np.array([[True, True], [True, True], [True, True], [False, True]])
    m.add_image(X, mask)  # no model yet: every candidate is hard (3 of them: 0.5 is not a negative)
    assert fits == [3]  # retrained after 3 new hard negatives
    assert sorted(m.cache[0].ravel().tolist()) == pytest.approx([-1.1])  # -2 and -1.3 < -1.2 evicted
    assert len(m.cache[1]) == 0
    m.add_image(np.array([[-1.0], [-1.0002], [5.0], [0.0]], np.float32), np.ones((4, 2), bool))
    # hard: score > -1.0001 -> -1.0, 5.0, 0.0 join (3 new -> retrain); -1.0002 does not
    assert fits == [3, 4]
    assert sorted(m.cache[0].ravel().tolist()) == pytest.approx([-1.0, 0.0, 5.0])  # max_cache 3: hardest kept
    m.add_image(np.array([[2.0], [3.0]], np.float32), np.ones((2, 2), bool))  # cache 5 > max_cache: retrain
    assert len(fits) == 3 and len(m.cache[0]) == 3 and m.peak_cache[0] == 5
    assert sorted(m.cache[0].ravel().tolist()) == pytest.approx([2.0, 3.0, 5.0])
    m.finish()
    assert len(fits) == 3  # nothing new since the last training
    assert m.has_model.tolist() == [True, False]


def test_linear_svm_separates_and_norm_scale():
    rng = np.random.default_rng(0)
    pos = rng.normal(1.0, 0.3, (40, 8)) * 4
    neg = rng.normal(-1.0, 0.3, (200, 8)) * 4
    s = norm_scale(np.concatenate([pos, neg]), 20.0)
    assert np.linalg.norm(np.concatenate([pos, neg]) * s, axis=1).mean() == pytest.approx(20.0)
    w, b = fit_linear_svm(pos * s, neg * s, C=1e-3)
    assert ((pos * s) @ w + b > 0).mean() > 0.95 and ((neg * s) @ w + b < 0).mean() > 0.95


# -- box regression ---------------------------------------------------------------------------------
def test_bbox_targets_round_trip_and_ridge_reduces_error():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 100, (200, 2))
    wh = rng.uniform(5, 50, (200, 2))
    props = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    gt = props + rng.normal(0, 3, props.shape).astype(np.float32)
    gt[:, 2:] = np.maximum(gt[:, 2:], gt[:, :2] + 1)
    t = encode(props, gt)
    np.testing.assert_allclose(decode(props, t), gt, atol=1e-3)
    np.testing.assert_allclose(encode(props, props), 0, atol=1e-7)
    # deltas that are a linear function of the features: ridge must recover most of them
    X = rng.normal(size=(400, 12))
    A_ = rng.normal(0, 0.05, (12, 4))
    xy = rng.uniform(0, 100, (400, 2))
    wh = rng.uniform(10, 50, (400, 2))
    p = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    g = decode(p, X @ A_)
    reg = BoxRegressor(num_classes=2, lam=1.0).fit(X, p, g, np.zeros(400, int), np.ones(400))
    pred = reg.predict(X, p, 0)
    before = np.diag(box_iou(p, g)).mean()
    after = np.diag(box_iou(pred, g)).mean()
    assert after > before + 0.05 and after > 0.97
    assert np.array_equal(reg.predict(X, p, 1), decode(p, np.zeros((400, 4))))  # untrained class: identity
    low = BoxRegressor(num_classes=1, min_iou=0.6).fit(X, p, g, np.zeros(400, int), np.full(400, 0.5))
    assert low.pairs == {}  # pairs at IoU <= 0.6 are not used


# -- NMS ----------------------------------------------------------------------------------------------
def test_nms_per_class_and_cap():
    from models.rcnn.detection import detect_boxes

    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float32)  # IoU(0, 1) = 0.68
    scores = np.array([[0.9, 0.2], [0.8, 0.7], [0.1, 0.3]])
    d = detect_boxes(boxes, scores, None, (100, 100), 0.3, 100)
    pairs = sorted(zip(d["labels"].tolist(), [round(float(s), 2) for s in d["scores"]], strict=True))
    # class 0: box 1 suppressed by box 0; class 1: box 0 suppressed by box 1; box 2 kept in both
    assert pairs == [(0, 0.1), (0, 0.9), (1, 0.3), (1, 0.7)]
    grid = np.array([[x, y, x + 5, y + 5] for x in range(0, 200, 10) for y in range(0, 200, 10)], np.float32)
    d = detect_boxes(grid, np.random.default_rng(0).random((len(grid), 3)), None, (200, 200), 0.3, 100)
    assert len(d["scores"]) == 100 and np.all(np.diff(d["scores"]) <= 0)


# -- end to end -----------------------------------------------------------------------------------------
def test_rcnn_end_to_end_beats_random_scoring(fmnist_dir, tmp_path):
    from conftest import compose_train, point_paths_at
    from omegaconf import open_dict

    from engine.rcnn.pipeline import run as rcnn_pipeline
    from models.rcnn.detection import detect_boxes
    from transferrable.run.runner import build_datamodule, build_model, build_trainer

    cfg = compose_train([
        "task=rcnn", "logger=none", "hardware=cpu", "trainer.precision=32-true", "backbone.weights=null",
        f"dataset.source_dir={fmnist_dir}", "dataset.n_train=16", "dataset.n_val=2", "dataset.n_test=8",
        "dataset.progress=false", "rcnn.proposals.mode=single", "rcnn.proposals.width=200",
        "rcnn.proposals.max_proposals=120", "rcnn.finetune.iterations=15", "trainer.max_epochs=1",
        "rcnn.layers=[pool5,fc7]", "rcnn.scoring=[svm,softmax]", "rcnn.draw_images=4",
        "++trainer.enable_progress_bar=false", "~callbacks.progress_bar", "~callbacks.model_summary",
        "~callbacks.lr_monitor", "trainer.enable_model_summary=false", "seed=0",
    ])
    cfg = point_paths_at(cfg, tmp_path / "run", tmp_path / "cache")
    torch.manual_seed(0)
    dm = build_datamodule(cfg)
    model = build_model(cfg, dm.num_classes)
    metrics = rcnn_pipeline(cfg, build_trainer(cfg, []), dm, model)
    for key in ("test/mAP", "test/mAP_07", "test/svm/pool5/mAP", "test/svm/fc7+bb/mAP", "test/softmax/fc7/mAP"):
        assert key in metrics and 0.0 <= metrics[key] <= 1.0
    assert metrics["rcnn/main"] == "svm/fc7+bb" and metrics["rcnn/finetuned"] is True
    for f in ("rcnn_results.json", "tables.json", "detections.png", "pool5_units.png", "fp_breakdown.png"):
        assert (tmp_path / "run" / f).is_file()
    for split in ("train", "val"):  # the fine-tuned head's window accuracy, held-out val images included
        assert 0.0 <= metrics[f"rcnn/finetune/{split}_fg_acc"] <= 1.0 and 0.0 <= metrics[f"rcnn/finetune/{split}_acc"] <= 1.0
    import json

    (table,) = json.loads((tmp_path / "run" / "tables.json").read_text())
    assert all(c is None or len(c) == 1 for r in table["rows"] for c in r["cells"])  # one run: no fake std
    info = json.loads((tmp_path / "run" / "rcnn_results.json").read_text())["info"]
    assert sum(info["false_positives_top_npos"].values()) >= 0 and len(info["pool5_units"]["units"]) == 6
    # the random-scoring baseline: the same proposals, NMS and evaluation, scores drawn at random
    cache = P.ProposalCache(tmp_path / "cache" / "proposals" / next(p.name for p in (tmp_path / "cache" / "proposals").iterdir()),
                            **dict(cfg.rcnn.proposals))
    ds = dm.datasets["test"]
    rng = np.random.default_rng(0)
    rand_maps = []
    for _ in range(10):
        dets, gts = [], []
        for i in range(len(ds)):
            it = ds[i]
            boxes = cache.get(it["image_id"], it["image"])
            dets.append(detect_boxes(boxes, rng.random((len(boxes), dm.num_classes)), None,
                                     it["image"].shape[1::-1], 0.3, 100))
            gts.append(it)
        rand_maps.append(evaluate_detections(dets, gts, dm.num_classes)["mAP"])
    assert cache.stats["misses"] == 0  # the run cached every test image's proposals
    best = max(metrics["test/svm/pool5/mAP"], metrics["test/mAP"])
    print("e2e mAP", {k: round(v, 4) for k, v in metrics.items() if k.endswith("mAP")}, "random", rand_maps)
    assert best > np.mean(rand_maps), (metrics, rand_maps)
    # a second run with the same config (e.g. the roi_pool or softmax run of a sweep, or a rerun after a kill)
    # reuses the cached fine-tuned network and every cached stage, and gets the same numbers
    assert info["finetune"]["cache_path"].startswith(str(tmp_path / "cache" / "rcnn_finetune"))
    torch.manual_seed(0)
    with open_dict(cfg):  # the same caches, another output directory
        cfg.paths.output_dir = str(tmp_path / "run2")
    model2 = build_model(cfg, dm.num_classes)
    again = rcnn_pipeline(cfg, build_trainer(cfg, []), dm, model2)
    info2 = json.loads((tmp_path / "run2" / "rcnn_results.json").read_text())["info"]
    assert info2["finetune"]["cache"] == "hit"
    assert {k: v for k, v in again.items() if k.startswith("test/")} == {
        k: v for k, v in metrics.items() if k.startswith("test/")}


@pytest.mark.parametrize("overrides", [["task=rcnn", "backbone=vgg16"], ["experiment=rcnn_layers"],
                                       ["experiment=rcnn_scoring"], ["experiment=rcnn_archs", "backbone=vgg16"],
                                       ["experiment=rcnn_svm_weight"]])
def test_rcnn_configs_compose(overrides):
    from conftest import compose_train

    cfg = compose_train(overrides)
    assert cfg.model._target_ == "lightning_modules.rcnn.RCNNModule"
    assert cfg.dataset._target_ == "datamodules.scenes.ScenesDataModule"
    # task=rcnn backbone=vgg16 alone is the design card's ImageNet VGG16 (hub weights; offline it stops in one line)
    design_card = overrides == ["task=rcnn", "backbone=vgg16"]
    assert cfg.backbone.weights == ("hub" if design_card else f"source:{cfg.source_dataset}")
    assert cfg.optimized_metric == "test/mAP"
    # the default source, but VGG16 keeps the one it can learn in its budget (conf/task_backbone/rcnn-vgg16.yaml)
    assert cfg.source_dataset == ("fashion_mnist" if "backbone=vgg16" in overrides else "fractalnet100")
    assert cfg.rcnn.svm.C == 1e-3 and cfg.rcnn.finetune.positives == 32 and cfg.rcnn.finetune.background == 96


def test_svm_weight_sweep_scores_val_with_the_rcnn_layers_setup():
    """experiment=rcnn_svm_weight chooses the SVM positive weight on val scenes (never test), with the same
    fine-tuning and SVM images as rcnn_layers, so its network and pool5 features come from rcnn_layers' caches."""
    from conftest import compose_train

    sweep = compose_train(["experiment=rcnn_svm_weight"])
    layers = compose_train(["experiment=rcnn_layers"])
    assert sweep.dataset.test_split == "val" and layers.dataset.test_split == "test"
    assert sweep.hydra.sweeper.params["rcnn.svm.pos_weight"] == "2,10,50,200"
    assert set(sweep.hydra.sweeper.params["backbone.freeze"].split(",")) == {"none", "all"}
    for key in ("finetune", "max_train_images", "proposals", "svm"):
        assert sweep.rcnn[key] == layers.rcnn[key], key
    assert list(sweep.rcnn.layers) == ["pool5", "fc6", "fc7"]


def test_module_defaults_are_the_yaml_and_hparams_load_weights_only(tmp_path):
    """conf/task/rcnn.yaml is the only place R-CNN's defaults are written: a module built without a config node
    (tests, benchmarks) has exactly the node Hydra composes, its optimiser and scheduler are the YAML's partials,
    its hparams are plain containers (a checkpoint loads weights-only), and the fine-tuning cache key names the
    optimiser only when it is not the one ``rcnn.finetune`` describes (so the default keys never changed)."""
    from conftest import compose_train
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from engine.rcnn.cache_keys import optimizer_key
    from lightning_modules.rcnn import RCNNModule
    from lightning_modules.rcnn_segmentation import RCNNSegmentationModule
    from models.backbones import CaffeNetMini

    cfg = compose_train(["task=rcnn"])
    m = RCNNModule(CaffeNetMini(input_size=32), 3)
    assert m.cfg == OmegaConf.to_container(cfg.rcnn, resolve=True)
    assert m.cfg["finetune"]["iterations"] == 60 and m.cfg["finetune"]["step_epochs"] == 2
    hydra_built = instantiate(cfg.model, backbone=CaffeNetMini(input_size=32), num_classes=3)
    assert hydra_built.cfg == m.cfg and optimizer_key(m) == {} and optimizer_key(hydra_built) == {}
    opt = m.configure_optimizers()["optimizer"]
    assert [g["lr"] for g in opt.param_groups] == [pytest.approx(0.1), pytest.approx(0.01)]
    assert opt.defaults["momentum"] == 0.9 and opt.defaults["weight_decay"] == 5e-4
    other = RCNNModule(CaffeNetMini(input_size=32), 3, optimizer=instantiate(
        {**OmegaConf.to_container(cfg.model.optimizer, resolve=True), "lr": 0.02}))
    assert set(optimizer_key(other)) == {"optim"}
    torch.save({"hyper_parameters": dict(m.hparams)}, tmp_path / "h.ckpt")
    assert torch.load(tmp_path / "h.ckpt", weights_only=True)["hyper_parameters"]["cfg"] == m.cfg
    seg = RCNNSegmentationModule(CaffeNetMini(input_size=32), 3, layers=["fc6"])
    assert seg.cfg == {**OmegaConf.to_container(compose_train(["task=rcnn_segmentation"]).rcnn_segmentation),
                       "layers": ["fc6"]}
    from transferrable.core.errors import ConfigError

    with pytest.raises(ConfigError, match="rcnn: no such key"):
        RCNNModule(CaffeNetMini(input_size=32), 3, iteration=5)
