"""PASCAL VOC detection evaluation (the suite's own; torchmetrics' MeanAveragePrecision is COCO-style).

Per class: detections of all images are sorted by score (descending, stable) and matched greedily to the
ground truth of their image: a detection is a true positive when its best-overlapping ground-truth box (IoU
>= ``iou_threshold``, 0.5) is not difficult and not matched yet, a false positive when that box is already
matched or the overlap is below the threshold, and *ignored* (neither TP nor FP) when the best box is
difficult -- the VOC devkit's rule. Recall is over the non-difficult boxes.

Two AP conventions (``average_precision``):

- ``voc07``: 11-point interpolation, mean over t in {0, 0.1, ..., 1} of max precision at recall >= t
- ``area`` (VOC2010+): area under the monotone (right-to-left running max) precision/recall curve

Boxes are 0-based pixel-edge ``x1, y1, x2, y2`` (width = x2 - x1, as the datamodules give them), so IoU is
torchvision's ``box_iou`` (the devkit's ``+1`` belongs to its 1-based inclusive coordinates).

A class with no non-difficult ground truth has AP NaN and is left out of the mean.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


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
    """AP from a recall/precision curve (in detection order). ``voc07`` 11-point or ``area`` (VOC2010+)."""
    recall, precision = np.asarray(recall, float), np.asarray(precision, float)
    if convention == "voc07":
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            p = precision[recall >= t - 1e-12]
            ap += (p.max() if p.size else 0.0) / 11.0
        return float(ap)
    if convention != "area":
        raise ValueError(f"unknown AP convention {convention!r}; expected 'voc07' or 'area'")
    mrec = np.concatenate([[0.0], recall, [1.0]])
    mpre = np.concatenate([[0.0], precision, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]  # monotone: max precision to the right
    idx = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[idx + 1] - mrec[idx]) * mpre[idx + 1]))


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
    det_boxes = np.asarray(det_boxes, dtype=np.float32).reshape(-1, 4)
    npos = int(sum(int((~np.asarray(d, bool)).sum()) for d in gt_difficult))
    order = np.argsort(-det_scores, kind="stable")
    tp = np.zeros(len(order))
    fp = np.zeros(len(order))
    matched = [np.zeros(len(g), dtype=bool) for g in gt_boxes]
    ious = {}
    for rank, d in enumerate(order):
        i = int(det_image[d])
        g = np.asarray(gt_boxes[i], dtype=np.float32).reshape(-1, 4)
        if len(g) == 0:
            fp[rank] = 1
            continue
        if i not in ious:
            ious[i] = box_iou(det_boxes[det_image == i], g), np.flatnonzero(det_image == i)
        mat, rows = ious[i]
        ov = mat[np.searchsorted(rows, d)]
        j = int(np.argmax(ov))
        if ov[j] >= iou_threshold:
            if np.asarray(gt_difficult[i], bool)[j]:
                continue  # neither TP nor FP
            if not matched[i][j]:
                tp[rank], matched[i][j] = 1, True
            else:
                fp[rank] = 1
        else:
            fp[rank] = 1
    ctp, cfp = np.cumsum(tp), np.cumsum(fp)
    recall = ctp / max(npos, 1)
    precision = ctp / np.maximum(ctp + cfp, np.finfo(np.float64).eps)
    if npos == 0:
        ap = ap07 = float("nan")
    else:
        ap, ap07 = average_precision(recall, precision, "area"), average_precision(recall, precision, "voc07")
    return ClassResult(ap, ap07, npos, len(order), tp, fp, recall, precision)


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
    per_class = []
    for c in range(num_classes):
        img, scores, boxes, gtb, gtd = [], [], [], [], []
        for i, (det, gt) in enumerate(zip(detections, ground_truth, strict=True)):
            m = np.asarray(det["labels"]) == c
            img.append(np.full(int(m.sum()), i))
            scores.append(np.asarray(det["scores"], float)[m])
            boxes.append(np.asarray(det["boxes"], np.float32).reshape(-1, 4)[m])
            g = np.asarray(gt["labels"]) == c
            gtb.append(np.asarray(gt["boxes"], np.float32).reshape(-1, 4)[g])
            gtd.append(np.asarray(gt.get("difficult", np.zeros(len(g), bool)), bool)[g])
        per_class.append(evaluate_class(np.concatenate(img), np.concatenate(scores), np.concatenate(boxes),
                                        gtb, gtd, iou_threshold))
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
