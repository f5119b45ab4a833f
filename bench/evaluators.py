"""``voc_ap`` and ``caption_metrics``: the suite's evaluators against references, in the same run.

``voc_ap``: ``transferrable.metrics.voc_eval.evaluate_detections`` (vectorised per class) on randomised detections
(jittered ground-truth boxes and clutter, continuous scores, ~15% of ground truth difficult) against

* ``reference_voc_eval`` below: an independent, straightforward per-detection loop in the shape of
  py-faster-rcnn's ``voc_eval`` (sort by score, match each detection to its best-overlapping box, difficult ->
  ignored, TP/FP cumsums, ``voc_ap`` with the devkit's 11-point thresholds ``np.arange(0, 1.1, 0.1)`` and the
  area AP) -- every class's AP must be identical in both conventions, and the speed ratio (target >= 5x) is
  reported;
* torchmetrics ``MeanAveragePrecision`` (COCO-style, pycocotools backend, IoU 0.5 only, difficult passed
  as ``iscrowd``) on the same boxes: speed only (target >= 10x), its AP is a different definition (101-point);
* the VOC2007 test set's size (4,952 images, 20 classes, 100 detections per image per class: 9.9M
  detections), ``evaluate_detections`` alone, against a 10 s budget.

``caption_metrics``: the coco-caption protocol (pycocoevalcap: PTB tokenizer, BLEU-1..4, METEOR, ROUGE-L,
CIDEr; never SPICE) on 5,000 generated captions with 5 references each, timed per metric; BLEU and ROUGE-L
against torchmetrics' ``BLEUScore`` / ``ROUGEScore(rougeL)`` on the same tokenised captions, the others as
their share of the whole protocol's time.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import time

import numpy as np

from bench.registry import Context, Figure, Stats, Target, benchmark
from bench.timing import interleave, per_second

# -- VOC AP --------------------------------------------------------------------------------------------


def random_detections(images: int, classes: int, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """(detections, ground truth) per image: 1-4 objects, ~15% difficult; detections are jittered copies
    of the objects (some duplicated, some of the wrong class) plus random clutter, scores uniform (no ties)."""
    rng = np.random.default_rng(seed)
    dets, gts = [], []
    for _ in range(images):
        n = int(rng.integers(1, 5))
        xy = rng.uniform(0, 400, (n, 2))
        wh = rng.uniform(20, 120, (n, 2))
        boxes = np.concatenate([xy, xy + wh], 1)
        labels = rng.integers(0, classes, n)
        gts.append({"boxes": boxes.astype(np.float32), "labels": labels, "difficult": rng.random(n) < 0.15})
        copies = rng.integers(0, n, int(rng.integers(0, 3 * n + 1)))
        jitter = rng.normal(0, 0.12, (len(copies), 4)) * np.repeat(wh[copies], 2, axis=0).reshape(-1, 4)
        det_labels = np.where(rng.random(len(copies)) < 0.1, rng.integers(0, classes, len(copies)), labels[copies])
        k = int(rng.integers(0, 6))
        cxy = rng.uniform(0, 450, (k, 2))
        clutter = np.concatenate([cxy, cxy + rng.uniform(10, 150, (k, 2))], 1)
        dets.append({"boxes": np.concatenate([boxes[copies] + jitter, clutter]).astype(np.float32),
                     "labels": np.concatenate([det_labels, rng.integers(0, classes, k)]),
                     "scores": rng.random(len(copies) + k)})
    return dets, gts


def reference_ap(rec: np.ndarray, prec: np.ndarray, use_07_metric: bool) -> float:
    """The VOC AP definitions as py-faster-rcnn's ``voc_ap``: the 11-point thresholds are the devkit's
    ``np.arange(0, 1.1, 0.1)``, untouched (t = 0.30000000000000004, so a recall of exactly 0.3 does not reach
    it -- as in published VOC2007 numbers)."""
    if use_07_metric:
        ap = 0.0
        for t in np.arange(0.0, 1.1, 0.1):
            above = prec[rec >= t]
            ap = ap + (np.max(above) if above.size else 0.0) / 11.0
        return float(ap)
    mrec = np.concatenate(([0.0], rec, [1.0]))
    mpre = np.concatenate(([0.0], prec, [0.0]))
    for i in range(len(mpre) - 1, 0, -1):  # precision envelope, right to left
        mpre[i - 1] = max(mpre[i - 1], mpre[i])
    i = np.where(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def reference_voc_eval(detections: list[dict], ground_truth: list[dict], num_classes: int,
                       iou_threshold: float = 0.5) -> tuple[list[float], list[float]]:
    """(area APs, 11-point APs) per class, one detection at a time; boxes are 0-based pixel edges (no +1)."""
    ap, ap07 = [], []
    for c in range(num_classes):
        recs, npos = {}, 0
        for i, gt in enumerate(ground_truth):
            m = np.asarray(gt["labels"]) == c
            difficult = np.asarray(gt["difficult"], bool)[m]
            recs[i] = {"bbox": np.asarray(gt["boxes"], np.float64)[m], "difficult": difficult,
                       "det": [False] * int(m.sum())}
            npos += int((~difficult).sum())
        image_ids, confidence, bb = [], [], []
        for i, det in enumerate(detections):
            m = np.asarray(det["labels"]) == c
            image_ids += [i] * int(m.sum())
            confidence += list(np.asarray(det["scores"], float)[m])
            bb += list(np.asarray(det["boxes"], np.float64)[m])
        order = np.argsort(-np.asarray(confidence), kind="stable")
        tp, fp = np.zeros(len(order)), np.zeros(len(order))
        for d, k in enumerate(order):
            r, box = recs[image_ids[k]], bb[k]
            ovmax, jmax = -np.inf, -1
            gtb = r["bbox"]
            if gtb.size:
                iw = np.maximum(np.minimum(gtb[:, 2], box[2]) - np.maximum(gtb[:, 0], box[0]), 0.0)
                ih = np.maximum(np.minimum(gtb[:, 3], box[3]) - np.maximum(gtb[:, 1], box[1]), 0.0)
                inter = iw * ih
                union = (box[2] - box[0]) * (box[3] - box[1]) + (gtb[:, 2] - gtb[:, 0]) * (gtb[:, 3] - gtb[:, 1]) - inter
                overlaps = inter / union
                ovmax, jmax = overlaps.max(), int(overlaps.argmax())
            if ovmax >= iou_threshold:
                if r["difficult"][jmax]:
                    continue
                if not r["det"][jmax]:
                    tp[d], r["det"][jmax] = 1, True
                else:
                    fp[d] = 1
            else:
                fp[d] = 1
        if npos == 0:
            ap.append(float("nan"))
            ap07.append(float("nan"))
            continue
        fp, tp = np.cumsum(fp), np.cumsum(tp)
        rec = tp / npos
        prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        ap.append(reference_ap(rec, prec, False))
        ap07.append(reference_ap(rec, prec, True))
    return ap, ap07


def identical_aps(suite: dict, reference: tuple[list[float], list[float]], tol: float = 1e-12) -> tuple[int, int, float]:
    """(classes whose AP agrees in both conventions, classes, largest difference)."""
    same, worst = 0, 0.0
    for a, b, a7, b7 in zip(suite["ap"], reference[0], suite["ap07"], reference[1], strict=True):
        if np.isnan(a) and np.isnan(b) and np.isnan(a7) and np.isnan(b7):
            same += 1
            continue
        d = max(abs(a - b), abs(a7 - b7))
        worst = max(worst, d) if np.isfinite(d) else float("inf")
        same += bool(d <= tol)
    return same, len(suite["ap"]), worst


def voc2007_sized(images: int = 4952, classes: int = 20, per_class: int = 100, seed: int = 0
                  ) -> tuple[list[dict], list[dict]]:
    """(detections, ground truth) of the VOC2007 test set's size: per image 1-5 objects (mean 3, as its 14,976
    objects in 4,952 images), ~15% difficult, and ``per_class`` detections for *every* class (a detector's
    output before a score cut): up to 5 jittered copies of each object of that class (higher scores), the
    rest clutter. Built with whole-array numpy; the per-image dicts are views of (images, classes * per_class)
    arrays, float32 boxes as a detector gives them."""
    rng = np.random.default_rng(seed)
    n = rng.integers(1, 6, images)
    total = int(n.sum())
    g_img = np.repeat(np.arange(images), n)
    xy = rng.uniform(0, 400, (total, 2))
    wh = rng.uniform(20, 200, (total, 2))
    g_boxes = np.concatenate([xy, xy + wh], 1).astype(np.float32)
    g_labels = rng.integers(0, classes, total)
    g_diff = rng.random(total) < 0.15
    cxy = rng.uniform(0, 450, (images, classes, per_class, 2))
    boxes = np.concatenate([cxy, cxy + rng.uniform(10, 200, (images, classes, per_class, 2))], -1)
    scores = rng.random((images, classes, per_class)) * 0.8
    # the k-th object of a class in an image gets that (image, class) block's slots 5k .. 5k + 4
    key = g_img * classes + g_labels
    order = np.argsort(key, kind="stable")
    first = np.r_[True, key[order][1:] != key[order][:-1]]
    rank = np.arange(total) - np.maximum.accumulate(np.where(first, np.arange(total), 0))
    k = np.empty(total, np.int64)
    k[order] = rank
    copies = min(5, per_class)
    for c in range(copies):
        slot = k * copies + c
        keep = slot < per_class
        i, cl, sl = g_img[keep], g_labels[keep], slot[keep]
        jitter = rng.normal(0, 0.1, (int(keep.sum()), 4)) * np.tile(wh[keep], 2)
        boxes[i, cl, sl] = g_boxes[keep] + jitter
        scores[i, cl, sl] = 0.4 + 0.6 * rng.random(int(keep.sum()))
    boxes = boxes.astype(np.float32).reshape(images, classes * per_class, 4)
    scores = scores.reshape(images, classes * per_class)
    labels = np.repeat(np.arange(classes), per_class)
    starts = np.r_[0, np.cumsum(n)]
    dets = [{"boxes": boxes[i], "labels": labels, "scores": scores[i]} for i in range(images)]
    gts = [{"boxes": g_boxes[a:b], "labels": g_labels[a:b], "difficult": g_diff[a:b]}
           for a, b in zip(starts[:-1], starts[1:], strict=True)]
    return dets, gts


def _torchmetrics_map(detections: list[dict], ground_truth: list[dict]):
    import torch
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(iou_type="bbox", iou_thresholds=[0.5], backend="pycocotools")
    preds = [{"boxes": torch.from_numpy(d["boxes"]), "scores": torch.from_numpy(d["scores"]).float(),
              "labels": torch.from_numpy(np.asarray(d["labels"]))} for d in detections]
    target = [{"boxes": torch.from_numpy(g["boxes"]), "labels": torch.from_numpy(np.asarray(g["labels"])),
               "iscrowd": torch.from_numpy(g["difficult"].astype(np.int64))} for g in ground_truth]

    def run():
        metric.reset()
        metric.update(preds, target)
        return metric.compute()

    return run


@benchmark("voc_ap")
def voc_ap(ctx: Context) -> list[Figure]:
    import warnings

    from transferrable.metrics.voc_eval import evaluate_detections

    images, classes = (40, 4) if ctx.quick else (500, 20)
    dets, gts = random_detections(images, classes)
    suite = evaluate_detections(dets, gts, classes)
    same, total, worst = identical_aps(suite, reference_voc_eval(dets, gts, classes))
    ndet = sum(len(d["scores"]) for d in dets)
    ctx.log(f"{images} images, {ndet} detections, {classes} classes: suite mAP {suite['mAP']:.4f} / "
            f"mAP_07 {suite['mAP_07']:.4f}; {same}/{total} classes identical (largest difference {worst:.1e})")
    tm = _torchmetrics_map(dets, gts)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tm()  # warm-up: pycocotools import
        rates = interleave({
            "suite": lambda: per_second(images, lambda: evaluate_detections(dets, gts, classes)),
            "reference": lambda: per_second(images, lambda: reference_voc_eval(dets, gts, classes)),
            "torchmetrics": lambda: per_second(images, tm),
        }, ctx.repeats)
    suite_rate = Stats(rates["suite"])
    shape = f"{images} images, {ndet} detections, {classes} classes"
    # the VOC2007 test set's size (quick: tiny), evaluate_detections alone against a 10 s budget
    big = (20, 4, 10) if ctx.quick else (4952, 20, 100)
    bdets, bgts = voc2007_sized(*big)
    seconds = []
    for _ in range(ctx.repeats if ctx.quick else min(ctx.repeats, 3)):
        t0 = time.perf_counter()
        big_ev = evaluate_detections(bdets, bgts, big[1])
        seconds.append(time.perf_counter() - t0)
    bshape = f"{big[0]} images x {big[1]} classes x {big[2]} detections ({big[0] * big[1] * big[2]:,})"
    ctx.log(f"{bshape}: mAP {big_ev['mAP']:.4f} / mAP_07 {big_ev['mAP_07']:.4f} in {np.median(seconds):.2f} s")
    del bdets, bgts, big_ev
    return [
        Figure(f"VOC AP classes identical to the reference (07 11-point and 2010+ area), {shape}",
               Stats([same] * ctx.repeats), "classes", reference=Stats([total]),
               reference_name="classes evaluated", reference_unit="classes", target=Target(">=", 1.0),
               note=f"largest |AP difference| {worst:.1e}; difficult boxes ignored in both"),
        Figure(f"VOC AP evaluation speed, {shape}", suite_rate, "images/s", reference=Stats(rates["reference"]),
               reference_name="straightforward per-detection reference (bench/evaluators.py)",
               target=Target(">=", 5.0),
               note="evaluate_detections, both conventions, vs the devkit-shaped loop"),
        Figure(f"VOC AP evaluation speed vs torchmetrics, {shape}", suite_rate, "images/s",
               reference=Stats(rates["torchmetrics"]),
               reference_name="torchmetrics MeanAveragePrecision (pycocotools, IoU 0.5)", target=Target(">=", 10.0),
               note="update + compute; COCO-style 101-point AP, so speed only"),
        Figure(f"VOC AP evaluation time, VOC2007 test size: {bshape}", Stats(seconds), "s",
               reference=Stats([10.0]), reference_name="10 s budget (issue 20)", target=Target("<=", 1.0),
               note=f"evaluate_detections, both conventions, one process on {os.cpu_count()} cores "
                    "(numpy, single-threaded)"),
    ]


# -- caption metrics -----------------------------------------------------------------------------------

_WORDS = ("a man woman dog cat person group of people two on in the with is are sitting standing next to "
          "table street field grass water red blue white black small large young old holding riding playing "
          "ball bike horse car bus train plate food pizza room kitchen tree sky beach wave surfboard near "
          "front top background an at while looking eating walking down road building").split()


def random_captions(n: int, refs: int = 5, seed: int = 0) -> tuple[dict, dict]:
    """(references, candidates) in pycocoevalcap's input format: ``{id: [{"caption": str}, ...]}``.
    Words are Zipf-distributed; each candidate is one of its references with ~30% of the words changed."""
    rng = np.random.default_rng(seed)
    p = 1.0 / np.arange(1, len(_WORDS) + 1)
    p /= p.sum()

    def sentence():
        return list(rng.choice(_WORDS, int(rng.integers(8, 16)), p=p))

    gts, res = {}, {}
    for i in range(n):
        r = [sentence() for _ in range(refs)]
        cand = [w if rng.random() > 0.3 else str(rng.choice(_WORDS, p=p)) for w in r[int(rng.integers(refs))]]
        gts[i] = [{"caption": " ".join(s).capitalize() + "."} for s in r]
        res[i] = [{"caption": " ".join(cand) + "."}]
    return gts, res


def _timed(fn, *args) -> tuple[float, object]:
    t0 = time.perf_counter()
    out = fn(*args)
    return time.perf_counter() - t0, out


@benchmark("caption_metrics")
def caption_metrics(ctx: Context) -> list[Figure]:
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer
    from torchmetrics.text import BLEUScore
    from torchmetrics.text.rouge import ROUGEScore

    if shutil.which("java") is None:
        raise RuntimeError("caption metrics need Java (PTB tokenizer, METEOR): apt-get install openjdk-17-jre-headless")
    from pycocoevalcap.meteor.meteor import Meteor

    n = 60 if ctx.quick else 5000
    repeats = ctx.repeats if ctx.quick else min(ctx.repeats, 2)  # one repeat is ~a minute of Java on 2 cores
    # --quick leaves METEOR out: its Java start-up alone (~6 s idle, over a minute on a busy machine) would
    # dominate the test run; the PTB tokenizer still exercises the Java path
    metrics = ["bleu", "rouge", "cider"] if ctx.quick else ["bleu", "meteor", "rouge", "cider"]
    gts_raw, res_raw = random_captions(n)
    samples = {k: [] for k in ("tokenize", *metrics, "total", "tm_bleu", "tm_rouge")}
    scores = {}
    for _ in range(repeats):
        with contextlib.redirect_stdout(io.StringIO()):  # pycocoevalcap prints its internals
            t_tok, (gts, res) = _timed(lambda: (PTBTokenizer().tokenize(gts_raw), PTBTokenizer().tokenize(res_raw)))
            timed = {"tokenize": t_tok}
            for key in metrics:
                # METEOR's Java process starts in its constructor: that is part of its cost
                make = {"bleu": lambda: Bleu(4), "meteor": Meteor, "rouge": Rouge, "cider": Cider}[key]
                t, (score, _) = _timed(lambda m, g, r: m().compute_score(g, r), make, gts, res)
                timed[key], scores[key] = t, score
        timed["total"] = sum(timed.values())
        ids = sorted(res)
        preds, targets = [res[i][0] for i in ids], [gts[i] for i in ids]
        timed["tm_bleu"], tm_bleu = _timed(BLEUScore(n_gram=4), preds, targets)
        timed["tm_rouge"], _ = _timed(ROUGEScore(rouge_keys=("rougeL",)), preds, targets)
        for k, v in timed.items():
            samples[k].append(v)
    meteor = f"METEOR {scores['meteor']:.3f}, " if "meteor" in scores else ""
    ctx.log(f"{n} captions x 5 refs: BLEU-4 {scores['bleu'][3]:.3f} (torchmetrics {float(tm_bleu):.3f}), "
            f"{meteor}ROUGE-L {scores['rouge']:.3f}, CIDEr {scores['cider']:.3f}; "
            f"total {np.median(samples['total']):.1f} s")
    total = Stats(samples["total"])
    shape = f"{n} captions x 5 refs"
    share = {"reference": total, "reference_name": "whole coco-caption protocol (tokenize + metrics)",
             "note": "ratio = share of the protocol's time"}
    return [
        Figure(f"caption metrics, {shape}: PTB tokenizer (Java)", Stats(samples["tokenize"]), "s", **share),
        Figure(f"caption metrics, {shape}: BLEU-1..4", Stats(samples["bleu"]), "s",
               reference=Stats(samples["tm_bleu"]), reference_name="torchmetrics BLEUScore(4), same tokens"),
        *([Figure(f"caption metrics, {shape}: METEOR (Java, incl. start)", Stats(samples["meteor"]), "s", **share)]
          if "meteor" in samples else []),
        Figure(f"caption metrics, {shape}: ROUGE-L", Stats(samples["rouge"]), "s",
               reference=Stats(samples["tm_rouge"]), reference_name="torchmetrics ROUGEScore(rougeL), same tokens"),
        Figure(f"caption metrics, {shape}: CIDEr", Stats(samples["cider"]), "s", **share),
        Figure(f"caption metrics, {shape}: all{'' if 'meteor' in samples else ' but METEOR'} (no SPICE)", total, "s",
               reference=Stats([a + b for a, b in zip(samples["tm_bleu"], samples["tm_rouge"], strict=True)]),
               reference_name="torchmetrics BLEU + ROUGE-L only",
               note=f"{1000 * total.median / n:.2f} ms per caption"),
    ]
