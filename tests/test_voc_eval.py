"""``transferrable.metrics.voc_eval`` against a devkit-faithful reference, on random detections and hand cases.

``devkit_voc_eval`` below is py-faster-rcnn's ``lib/datasets/voc_eval.py`` (``voc_eval`` + ``voc_ap``)
translated line by line, one detection at a time, with the suite's conventions where they differ (each
marked ``# suite:``):

* boxes are 0-based pixel edges, so IoU has no ``+1`` (the devkit's ``+1`` is for 1-based inclusive pixels);
* IoU ``>= 0.5`` counts, as the official MATLAB devkit (``VOCevaldet.m``: ``ovmax>=VOCopts.minoverlap``);
  py-faster-rcnn writes ``ovmax > ovthresh``;
* the score sort is stable (py-faster-rcnn's default quicksort leaves ties in an unspecified order);
* precision divides by ``max(tp + fp, eps)`` (later py-faster-rcnn / Detectron) so that leading ignored
  detections give 0, not NaN.

The 11-point thresholds are the devkit's ``np.arange(0., 1.1, 0.1)`` with no tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest

from transferrable.metrics.voc_eval import (
    VOC07_THRESHOLDS,
    average_precision,
    evaluate_class,
    evaluate_detections,
)


# -- the reference ----------------------------------------------------------------------------------------
def devkit_voc_ap(rec, prec, use_07_metric=False):
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            if np.sum(rec >= t) == 0:
                p = 0
            else:
                p = np.max(prec[rec >= t])
            ap = ap + p / 11.0
    else:
        mrec = np.concatenate(([0.0], rec, [1.0]))
        mpre = np.concatenate(([0.0], prec, [0.0]))
        for i in range(mpre.size - 1, 0, -1):
            mpre[i - 1] = np.maximum(mpre[i - 1], mpre[i])
        i = np.where(mrec[1:] != mrec[:-1])[0]
        ap = np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1])
    return ap


def devkit_voc_eval(detections, ground_truth, classname, ovthresh=0.5):
    """(tp, fp, ap, ap07) of one class; ``detections`` / ``ground_truth`` as ``evaluate_detections`` takes them."""
    class_recs = {}
    npos = 0
    for imagename, gt in enumerate(ground_truth):
        keep = np.asarray(gt["labels"]) == classname
        bbox = np.asarray(gt["boxes"], float).reshape(-1, 4)[keep]
        difficult = np.asarray(gt["difficult"]).astype(bool)[keep]
        det = [False] * len(bbox)
        npos = npos + sum(~difficult)
        class_recs[imagename] = {"bbox": bbox, "difficult": difficult, "det": det}

    image_ids, confidence, BB = [], [], []
    for imagename, d in enumerate(detections):
        for label, score, box in zip(d["labels"], d["scores"], np.asarray(d["boxes"]).reshape(-1, 4), strict=True):
            if label == classname:
                image_ids.append(imagename)
                confidence.append(float(score))
                BB.append([float(z) for z in box])
    confidence = np.array(confidence)
    BB = np.array(BB).reshape(-1, 4)

    sorted_ind = np.argsort(-confidence, kind="stable")  # suite: stable
    BB = BB[sorted_ind, :]
    image_ids = [image_ids[x] for x in sorted_ind]

    nd = len(image_ids)
    tp = np.zeros(nd)
    fp = np.zeros(nd)
    for d in range(nd):
        R = class_recs[image_ids[d]]
        bb = BB[d, :].astype(float)
        ovmax = -np.inf
        BBGT = R["bbox"].astype(float)
        if BBGT.size > 0:
            ixmin = np.maximum(BBGT[:, 0], bb[0])
            iymin = np.maximum(BBGT[:, 1], bb[1])
            ixmax = np.minimum(BBGT[:, 2], bb[2])
            iymax = np.minimum(BBGT[:, 3], bb[3])
            iw = np.maximum(ixmax - ixmin, 0.0)  # suite: no +1
            ih = np.maximum(iymax - iymin, 0.0)
            inters = iw * ih
            uni = ((bb[2] - bb[0]) * (bb[3] - bb[1]) + (BBGT[:, 2] - BBGT[:, 0]) * (BBGT[:, 3] - BBGT[:, 1]) - inters)
            with np.errstate(invalid="ignore", divide="ignore"):
                overlaps = inters / uni
            ovmax = np.max(overlaps)
            jmax = np.argmax(overlaps)
        if ovmax >= ovthresh:  # suite: >= (VOCevaldet.m)
            if not R["difficult"][jmax]:
                if not R["det"][jmax]:
                    tp[d] = 1.0
                    R["det"][jmax] = 1
                else:
                    fp[d] = 1.0
        else:
            fp[d] = 1.0

    ctp, cfp = np.cumsum(tp), np.cumsum(fp)
    if npos == 0:
        return tp, fp, float("nan"), float("nan")
    rec = ctp / float(npos)
    prec = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)  # suite: eps
    return tp, fp, float(devkit_voc_ap(rec, prec, False)), float(devkit_voc_ap(rec, prec, True))


# -- random scenes ----------------------------------------------------------------------------------------
def random_scene(seed: int, images: int, classes: int, grid: bool):
    """Per image 0-5 objects (~20% difficult, some exact duplicates); detections are exact or jittered copies
    (some relabelled), duplicates, and clutter. ``grid``: integer coordinates on a coarse grid, so exact IoU
    ties between boxes and IoU exactly 0.5 happen; scores then tie too (they come from 8 levels)."""
    rng = np.random.default_rng(seed)
    dets, gts = [], []
    for _ in range(images):
        n = int(rng.integers(0, 6))
        xy = rng.uniform(0, 100, (n, 2))
        wh = rng.uniform(5, 60, (n, 2))
        boxes = np.concatenate([xy, xy + wh], 1)
        if grid:
            boxes = np.round(boxes / 5) * 5
        if n > 1 and rng.random() < 0.3:
            boxes[-1] = boxes[0]  # duplicate ground truth: argmax takes the first
        labels = rng.integers(0, classes, n)
        gts.append({"boxes": boxes, "labels": labels, "difficult": rng.random(n) < 0.2})
        copies = rng.integers(0, n, int(rng.integers(0, 3 * n + 1))) if n else np.zeros(0, int)
        jitter = rng.normal(0, 0.15, (len(copies), 4)) * np.tile(wh[copies], 2)
        jitter[rng.random(len(copies)) < 0.2] = 0.0
        db = boxes[copies] + jitter
        dl = np.where(rng.random(len(copies)) < 0.1, rng.integers(0, classes, len(copies)), labels[copies])
        k = int(rng.integers(0, 5))
        cxy = rng.uniform(0, 120, (k, 2))
        clutter = np.concatenate([cxy, cxy + rng.uniform(3, 70, (k, 2))], 1)
        db = np.concatenate([db, clutter])
        if grid:
            db = np.round(db / 5) * 5
        m = len(db)
        scores = rng.integers(0, 8, m) / 8 if grid else rng.random(m)
        dets.append({"boxes": db, "labels": np.concatenate([dl, rng.integers(0, classes, k)]), "scores": scores})
    return dets, gts


def _assert_same(dets, gts, classes):
    ev = evaluate_detections(dets, gts, classes)
    for c in range(classes):
        tp, fp, ap, ap07 = devkit_voc_eval(dets, gts, c)
        r = ev["classes"][c]
        np.testing.assert_array_equal(r.tp, tp)
        np.testing.assert_array_equal(r.fp, fp)
        if np.isnan(ap):
            assert np.isnan(r.ap) and np.isnan(r.ap07)
        else:
            assert (r.ap, r.ap07) == (ap, ap07), c  # bit for bit, both conventions
    return ev


@pytest.mark.parametrize("grid", [False, True])
@pytest.mark.parametrize("seed", range(6))
def test_identical_to_the_devkit_on_random_detections(seed, grid):
    dets, gts = random_scene(seed, images=60, classes=4, grid=grid)
    _assert_same(dets, gts, 4)


def _tolerant_ap07(rec, prec):
    """The suite's former 11-point AP: thresholds ``t - 1e-12`` (a recall of exactly 0.3 reached 0.3)."""
    return sum((prec[rec >= t - 1e-12].max() if (rec >= t - 1e-12).any() else 0.0) / 11 for t in VOC07_THRESHOLDS)


def test_recalls_of_exactly_three_six_and_seven_tenths():
    """10 objects, one per image. Recalls k/10 fall exactly on the 11-point thresholds, where the devkit's
    ``np.arange(0, 1.1, 0.1)`` (0.30000000000000004, 0.6000000000000001, 0.7000000000000001) is not reached
    by 3/10, 6/10, 7/10."""
    assert [float(t) for t in VOC07_THRESHOLDS] == [float(t) for t in np.arange(0.0, 1.1, 0.1)]
    assert 3 / 10 < VOC07_THRESHOLDS[3] and 6 / 10 < VOC07_THRESHOLDS[6] and 7 / 10 < VOC07_THRESHOLDS[7]
    gtb = [np.array([[0, 0, 10, 10]], float)] * 10
    gtd = [np.array([False])] * 10
    far = [50, 50, 60, 60]
    for found, ap07 in ((3, 3 / 11), (6, 6 / 11), (7, 7 / 11)):
        # `found` true positives first (precision 1), then 5 misses
        img = list(range(found)) + [0] * 5
        boxes = np.array([[0, 0, 10, 10]] * found + [far] * 5, float)
        scores = np.linspace(1, 0.1, found + 5)
        r = evaluate_class(img, scores, boxes, gtb, gtd)
        assert r.recall[found - 1] == found / 10
        # thresholds 0 .. (found-1)/10 reached with precision 1; t = found/10 (+ ulp) is not
        assert r.ap07 == pytest.approx(ap07, abs=1e-15)
        assert _tolerant_ap07(r.recall, r.precision) == pytest.approx(ap07 + 1 / 11)  # the former result
        det = [{"boxes": boxes[np.array(img) == i], "labels": np.zeros(int((np.array(img) == i).sum()), int),
                "scores": scores[np.array(img) == i]} for i in range(10)]
        gt = [{"boxes": g, "labels": np.zeros(1, int), "difficult": d} for g, d in zip(gtb, gtd, strict=True)]
        tp, fp, ap, ap07_ref = devkit_voc_eval(det, gt, 0)
        assert (r.ap, r.ap07) == (ap, ap07_ref)
    assert average_precision(np.array([0.3]), np.array([1.0]), "voc07") == pytest.approx(3 / 11)
    assert average_precision(np.array([0.3 + 1e-9]), np.array([1.0]), "voc07") == pytest.approx(4 / 11)


def test_random_scenes_with_ten_or_twenty_objects_per_class_hit_the_thresholds():
    """npos of 10 or 20 per class: many recalls land on k/10, where the former tolerance changed the 11-point
    AP; the suite still agrees with the devkit bit for bit, and differs from the tolerant variant somewhere."""
    rng = np.random.default_rng(7)
    differed = 0
    for _ in range(30):
        npos = int(rng.choice([10, 20]))
        gts = [{"boxes": np.array([[0, 0, 20, 20]], float) + 30 * (i % 3), "labels": np.zeros(1, int),
                "difficult": np.zeros(1, bool)} for i in range(npos)]
        dets = []
        for _ in range(npos):
            m = int(rng.integers(0, 4))
            boxes = np.array([[0, 0, 20, 20]], float) + rng.normal(0, 4, (m, 4))
            boxes += 30 * ((len(dets)) % 3)
            dets.append({"boxes": boxes, "labels": np.zeros(m, int), "scores": rng.random(m)})
        ev = _assert_same(dets, gts, 1)
        r = ev["classes"][0]
        differed += _tolerant_ap07(r.recall, r.precision) != r.ap07
    assert differed >= 3


def test_no_detections_no_ground_truth_and_out_of_range_labels():
    gt = [{"boxes": np.zeros((0, 4)), "labels": np.zeros(0, int), "difficult": np.zeros(0, bool)},
          {"boxes": np.array([[0, 0, 10, 10]]), "labels": np.array([1]), "difficult": np.array([False])}]
    det = [{"boxes": np.array([[0, 0, 10, 10], [0, 0, 10, 10]]), "labels": np.array([0, 7]), "scores": np.array([.9, .8])},
           {"boxes": np.zeros((0, 4)), "labels": np.zeros(0, int), "scores": np.zeros(0)}]
    ev = evaluate_detections(det, gt, 2)
    assert np.isnan(ev["ap"][0]) and ev["classes"][0].fp.tolist() == [1.0]  # no GT of class 0 anywhere
    assert ev["ap"][1] == 0.0 and ev["ap07"][1] == 0.0 and ev["classes"][1].ndet == 0  # label 7 is dropped
    assert ev["mAP"] == 0.0
    r = evaluate_class([], [], np.zeros((0, 4)), [np.zeros((0, 4))], [np.zeros(0, bool)])
    assert r.ndet == 0 and np.isnan(r.ap)


@pytest.mark.parametrize("seed", range(4))
def test_average_precision_is_the_devkits_voc_ap_on_any_curve(seed):
    """Detection-order curves (recall non-decreasing: the suffix-max path) and arbitrary ones (the mask path)."""
    rng = np.random.default_rng(seed)
    npos = int(rng.integers(1, 30))
    tp = rng.random(200) < 0.3
    ctp = np.cumsum(tp)
    rec, prec = np.minimum(ctp, npos) / npos, ctp / np.arange(1, 201)
    shuffled = rng.permutation(200)
    for r, p in ((rec, prec), (rec[shuffled], prec[shuffled]), (rec[:0], prec[:0])):
        assert average_precision(r, p, "voc07") == devkit_voc_ap(r, p, True)
        assert average_precision(r, p, "area") == devkit_voc_ap(r, p, False)


def test_the_bench_reference_is_the_devkit():
    """bench/evaluators.py's per-detection reference (timed against the suite) is this devkit translation."""
    from bench.evaluators import random_detections, reference_voc_eval

    dets, gts = random_detections(30, 3, seed=1)
    ap, ap07 = reference_voc_eval(dets, gts, 3)
    for c in range(3):
        _, _, a, a7 = devkit_voc_eval(dets, gts, c)
        assert (ap[c], ap07[c]) == (a, a7) or (np.isnan(a) and np.isnan(ap[c]))
