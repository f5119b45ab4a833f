"""PASCAL VOC detection evaluation (the suite's own; torchmetrics' MeanAveragePrecision is COCO-style).

Per class: detections of all images are sorted by score (descending, stable) and matched greedily to the
ground truth of their image: a detection is a true positive when its best-overlapping ground-truth box (IoU
>= ``iou_threshold``, 0.5; the first such box on ties) is not difficult and not matched yet, a false positive
when that box is already matched or the overlap is below the threshold, and *ignored* (neither TP nor FP)
when the best box is difficult -- the VOC devkit's rule. Recall is over the non-difficult boxes.

Two AP conventions (``average_precision``), both exactly as ``voc_ap`` in py-faster-rcnn's ``voc_eval.py``:

- ``voc07``: 11-point interpolation, mean over the devkit's thresholds ``np.arange(0, 1.1, 0.1)`` of the max
  precision at ``recall >= t``, with no tolerance. Those thresholds are floating-point: t = 0.30000000000000004,
  0.6000000000000001 and 0.7000000000000001, so a recall of exactly 3/10, 6/10 or 7/10 does *not* reach
  them, as in published VOC2007 numbers.
- ``area`` (VOC2010+): area under the monotone (right-to-left running max) precision/recall curve

Boxes are 0-based pixel-edge ``x1, y1, x2, y2`` (width = x2 - x1, as the datamodules give them), so IoU has no
``+1`` (the devkit's ``+1`` belongs to its 1-based inclusive coordinates); the matcher computes it in float64
like the devkit (``BB.astype(float)``).

Vectorised per class (no per-detection Python or torch call): the detections are sorted once; every
(detection, ground-truth box of its image) pair is formed at once and its IoU computed in one numpy
expression; each detection's best box is a segmented max/argmax. The devkit's greedy matching only ever
looks at the best box, whatever is matched already, so "not matched yet" is "first detection in score order
whose best box this is" -- a ``np.unique(..., return_index=True)``.

A class with no non-difficult ground truth has AP NaN and is left out of the mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# py-faster-rcnn voc_eval.voc_ap(use_07_metric=True): ``for t in np.arange(0., 1.1, 0.1)``
VOC07_THRESHOLDS = np.arange(0.0, 1.1, 0.1)


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix (len(a) x len(b)) of 0-based pixel-edge boxes, via torchvision.ops.box_iou."""
    import torch
    from torchvision.ops import box_iou as tv_box_iou

    a = np.asarray(a, dtype=np.float32).reshape(-1, 4)
    b = np.asarray(b, dtype=np.float32).reshape(-1, 4)
    if len(a) == 0 or len(b) == 0:
        return np.zeros((len(a), len(b)), dtype=np.float32)
    return tv_box_iou(torch.from_numpy(a), torch.from_numpy(b)).numpy()


def average_precision(recall: np.ndarray, precision: np.ndarray, convention: str = "area") -> float:
    """AP from a recall/precision curve (in detection order). ``voc07`` 11-point or ``area`` (VOC2010+),
    both as py-faster-rcnn's ``voc_ap`` (the 11-point thresholds are ``np.arange(0, 1.1, 0.1)``, untouched)."""
    recall, precision = np.asarray(recall, float), np.asarray(precision, float)
    if convention == "voc07":
        ap = 0.0
        if recall.size and not np.all(recall[1:] >= recall[:-1]):  # any curve: the devkit's masks
            for t in VOC07_THRESHOLDS:
                p = precision[recall >= t]
                ap = ap + (p.max() if p.size else 0.0) / 11.0
            return float(ap)
        # recall non-decreasing (a detection-order curve): {recall >= t} is the suffix from the first index
        # that reaches t, so max(precision[recall >= t]) is a suffix max -- the same values, one pass
        suffix = np.maximum.accumulate(precision[::-1])[::-1]
        for i in np.searchsorted(recall, VOC07_THRESHOLDS, side="left"):
            ap = ap + (suffix[i] if i < recall.size else 0.0) / 11.0
        return float(ap)
    if convention != "area":
        raise ValueError(f"unknown AP convention {convention!r}; expected 'voc07' or 'area'")
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # monotone: max precision to the right
    idx = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


def precision_envelope(recall: np.ndarray, precision: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The curve the ``area`` AP integrates: at each recall ``r_k`` where recall rises, the best precision at that
    recall or beyond (``p_k``). ``AP = sum((r_k - r_{k-1}) * p_k)`` with ``r_0 = 0`` (VOC's recall-1 sentinel, whose
    precision is 0, is left out)."""
    mrec = np.concatenate([[0.0], np.asarray(recall, float), [1.0]])
    mpre = np.maximum.accumulate(np.concatenate([[0.0], np.asarray(precision, float), [0.0]])[::-1])[::-1]
    idx = np.where(mrec[1:] != mrec[:-1])[0] + 1
    idx = idx[idx < len(mrec) - 1]
    return mrec[idx], mpre[idx]


@dataclass
class ClassResult:
    ap: float  # area convention
    ap07: float
    npos: int
    ndet: int
    tp: np.ndarray  # per detection in score order (1 TP, 0 otherwise)
    fp: np.ndarray
    recall: np.ndarray
    precision: np.ndarray


def _pair_iou(d: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Row-wise IoU of float64 boxes ``d[k]`` and ``g[k]`` (pixel edges, no +1), the devkit's arithmetic."""
    iw = np.maximum(np.minimum(g[:, 2], d[:, 2]) - np.maximum(g[:, 0], d[:, 0]), 0.0)
    ih = np.maximum(np.minimum(g[:, 3], d[:, 3]) - np.maximum(g[:, 1], d[:, 1]), 0.0)
    inter = iw * ih
    union = (d[:, 2] - d[:, 0]) * (d[:, 3] - d[:, 1]) + (g[:, 2] - g[:, 0]) * (g[:, 3] - g[:, 1]) - inter
    with np.errstate(invalid="ignore", divide="ignore"):
        return inter / union


def _descending(scores: np.ndarray) -> np.ndarray:
    """``np.argsort(-scores, kind="stable")``: the fast unstable sort when no two scores tie (nor NaN), which
    is then the same order; the stable sort otherwise."""
    order = np.argsort(-scores)
    s = scores[order]
    if np.any(s[1:] == s[:-1]) or np.isnan(s).any():
        order = np.argsort(-scores, kind="stable")
    return order


def _match(det_image: np.ndarray, det_scores: np.ndarray, det_boxes: np.ndarray, gt_start: np.ndarray,
           gt_count: np.ndarray, gt_boxes: np.ndarray, gt_difficult: np.ndarray, iou_threshold: float,
           det_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(tp, fp) per detection in score order. The ground truth of image ``i`` is rows
    ``gt_start[i]:gt_start[i] + gt_count[i]`` of ``gt_boxes`` / ``gt_difficult``; detection ``k``'s box is
    ``det_boxes[det_rows[k]]`` (``det_rows`` None: row ``k``), any float type (IoU in float64)."""
    order = _descending(det_scores)
    img = det_image[order]
    n = len(order)
    tp, fp = np.zeros(n), np.ones(n)
    cnt = gt_count[img]
    has = np.flatnonzero(cnt > 0)  # detections (ranks) whose image has ground truth of the class
    if has.size == 0:
        return tp, fp
    c = cnt[has]
    ends = np.cumsum(c)
    starts = ends - c
    # every (detection, ground-truth box of its image) pair, in rank order then ground-truth order
    pair_gt = np.repeat(gt_start[img[has]] - starts, c) + np.arange(ends[-1])
    rows = order[has] if det_rows is None else det_rows[order[has]]
    dbox = np.asarray(det_boxes[rows], np.float64)
    iou = _pair_iou(np.repeat(dbox, c, axis=0), np.asarray(gt_boxes[pair_gt], np.float64))
    best = np.maximum.reduceat(iou, starts)  # NaN (0/0 of two empty boxes) propagates, as np.max: a FP
    ok = best >= iou_threshold
    # the first box that reaches the max (np.argmax's tie rule), only for detections over the threshold
    hit = np.flatnonzero((iou == np.repeat(best, c)) & np.repeat(ok, c))
    seg = np.repeat(np.arange(len(has)), c)[hit]
    first = np.ones(len(hit), bool)
    first[1:] = seg[1:] != seg[:-1]
    jmax = pair_gt[hit[first]]  # one per detection with ok, in rank order
    ranks = has[ok]
    diff = gt_difficult[jmax]
    fp[ranks[diff]] = 0.0  # best box difficult: neither TP nor FP
    counted, boxes = ranks[~diff], jmax[~diff]
    _, first_use = np.unique(boxes, return_index=True)  # the first detection on a box takes it
    tp[counted[first_use]] = 1.0
    fp[counted[first_use]] = 0.0
    return tp, fp


def _result(tp: np.ndarray, fp: np.ndarray, npos: int) -> ClassResult:
    ctp, cfp = np.cumsum(tp), np.cumsum(fp)
    recall = ctp / max(npos, 1)
    precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    if npos == 0:
        ap = ap07 = float("nan")
    else:
        ap, ap07 = average_precision(recall, precision, "area"), average_precision(recall, precision, "voc07")
    return ClassResult(ap, ap07, npos, len(tp), tp, fp, recall, precision)


def evaluate_class(
    det_image: Sequence[int],
    det_scores: Sequence[float],
    det_boxes: np.ndarray,
    gt_boxes: Sequence[np.ndarray],
    gt_difficult: Sequence[np.ndarray],
    iou_threshold: float = 0.5,
) -> ClassResult:
    """One class: detections (image index, score, box) against per-image ground truth of that class."""
    det_image = np.asarray(det_image, dtype=np.int64).reshape(-1)
    det_scores = np.asarray(det_scores, dtype=np.float64).reshape(-1)
    det_boxes = np.asarray(det_boxes, dtype=np.float64).reshape(-1, 4)
    gtb = [np.asarray(g, dtype=np.float64).reshape(-1, 4) for g in gt_boxes]
    gtd = [np.asarray(d, dtype=bool).reshape(-1) for d in gt_difficult]
    count = np.array([len(g) for g in gtb], dtype=np.int64)
    if len(det_image) and (det_image.min() < 0 or det_image.max() >= len(gtb)):
        raise IndexError(f"detection image index outside the {len(gtb)} images of ground truth")
    start = np.cumsum(count) - count
    boxes = np.concatenate(gtb) if gtb else np.zeros((0, 4))
    diff = np.concatenate(gtd) if gtd else np.zeros(0, bool)
    tp, fp = _match(det_image, det_scores, det_boxes, start, count, boxes, diff, iou_threshold)
    return _result(tp, fp, int((~diff).sum()))


def _flatten(entries: Sequence[dict], keys: tuple[str, ...]) -> tuple[np.ndarray, dict]:
    """Image index per row and the concatenation of ``keys`` over all images' dicts."""
    n = np.array([len(np.asarray(e["labels"]).reshape(-1)) for e in entries], dtype=np.int64)
    image = np.repeat(np.arange(len(entries)), n)
    out = {"labels": np.concatenate([np.asarray(e["labels"], np.int64).reshape(-1) for e in entries])
           if entries else np.zeros(0, np.int64)}
    for k in keys:
        if k == "boxes":  # kept in their float type (float32 halves the memory); float64 per class
            parts = [np.asarray(e["boxes"]).reshape(-1, 4) for e in entries]
            out[k] = np.concatenate(parts) if parts else np.zeros((0, 4))
            if not np.issubdtype(out[k].dtype, np.floating):
                out[k] = out[k].astype(np.float64)
        elif k == "difficult":
            parts = [np.asarray(e.get("difficult", np.zeros(m, bool)), bool).reshape(-1) for e, m in zip(entries, n, strict=True)]
            out[k] = np.concatenate(parts) if parts else np.zeros(0, bool)
        else:
            parts = [np.asarray(e[k], np.float64).reshape(-1) for e in entries]
            out[k] = np.concatenate(parts) if parts else np.zeros(0)
    return image, out


def _by_class(labels: np.ndarray, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """(stable order by label, ``lo``): class ``c``'s rows are ``order[lo[c]:lo[c + 1]]``; labels outside
    ``[0, num_classes)`` are left out. Labels go to the smallest integer type first (numpy's stable sort of
    8/16-bit integers is a radix sort: ~10x faster than int64 on the 9.9M detections of VOC2007 test)."""
    keep = (labels >= 0) & (labels < num_classes)
    small = np.uint8 if num_classes < 255 else np.uint16 if num_classes < 65535 else np.int64
    key = np.where(keep, labels, num_classes).astype(small)
    order = np.argsort(key, kind="stable")
    return order, np.searchsorted(key[order], np.arange(num_classes + 1))


def evaluate_detections(
    detections: Sequence[dict],
    ground_truth: Sequence[dict],
    num_classes: int,
    iou_threshold: float = 0.5,
) -> dict:
    """VOC evaluation of a whole split.

    ``detections[i]`` / ``ground_truth[i]`` belong to the same image: dicts of ``boxes`` (N x 4), ``labels``
    (N, 0-based) and ``scores`` (detections) / ``difficult`` (ground truth). Returns per-class ``ap``,
    ``ap07``, ``npos``, the results per class and ``mAP`` / ``mAP_07`` (means over classes with positives).
    """
    if len(detections) != len(ground_truth):
        raise ValueError(f"{len(detections)} detection entries for {len(ground_truth)} images")
    n_img = len(ground_truth)
    d_img, det = _flatten(detections, ("scores", "boxes"))
    g_img, gt = _flatten(ground_truth, ("boxes", "difficult"))
    # group once by class (stable: image order, then each image's own order, is kept within a class)
    d_ord, d_lo = _by_class(det["labels"], num_classes)
    g_ord, g_lo = _by_class(gt["labels"], num_classes)
    per_class = []
    for c in range(num_classes):
        di = d_ord[d_lo[c]:d_lo[c + 1]]
        gi = g_ord[g_lo[c]:g_lo[c + 1]]  # sorted by image (g_img is non-decreasing in row order)
        count = np.bincount(g_img[gi], minlength=n_img)
        start = np.cumsum(count) - count
        diff = gt["difficult"][gi]
        tp, fp = _match(d_img[di], det["scores"][di], det["boxes"], start, count, gt["boxes"][gi], diff,
                        iou_threshold, det_rows=di)
        per_class.append(_result(tp, fp, int((~diff).sum())))
    aps = np.array([r.ap for r in per_class])
    ap07s = np.array([r.ap07 for r in per_class])
    valid = ~np.isnan(aps)
    return {
        "ap": aps.tolist(),
        "ap07": ap07s.tolist(),
        "npos": [r.npos for r in per_class],
        "mAP": float(aps[valid].mean()) if valid.any() else float("nan"),
        "mAP_07": float(ap07s[valid].mean()) if valid.any() else float("nan"),
        "classes": per_class,
    }
