"""R-CNN's tables and figures (``tables.json`` in ``transferrable.viz.tables``'s format, PNGs): the per-class AP
table (Table 3.2's layout), detections drawn on test images, the pool5 units' top regions (Figure 3.4), the
false-positive breakdown (Figure 3.5), and segmentation's Tables 3.5 / 3.7 and label maps."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np


# -- detection --------------------------------------------------------------------------------------
def ap_table(results: dict, class_names: list[str], dataset: str, arch: str, feature_mode: str,
             finetuned: bool) -> dict:
    """One row per variant (``svm/fc7``, ``svm/fc7+bb``, ...): AP per class, mAP and the 11-point mAP_07 (%)."""
    tag = "FT " if finetuned else ""
    return {
        "title": f"Detection AP (%) on {dataset} test (VOC2010+ area; mAP_07 = 11-point), backbone {arch}, "
                 f"feature_mode={feature_mode}",
        "corner": "variant", "columns": [*class_names, "mAP", "mAP_07"],
        "rows": [{"label": f"R-CNN {tag}{k.replace('svm/', '').replace('+bb', ' BB')}",
                  "cells": [None if not math.isfinite(a) else [100 * a] for a in r["ap"]]
                  + [[100 * r["mAP"]], [100 * r["mAP_07"]]]} for k, r in results.items()],
    }


def draw_detections(data, dets: list[dict], class_names: list[str], path: Path, n: int = 8, top: int = 5) -> Path:
    """The first ``n`` test images of ``data`` (an ``ImageSet``) with ground truth (green) and the ``top``
    highest-scoring detections (red, class and score), as one PNG grid."""
    from PIL import Image, ImageDraw

    from transferrable.viz.image_grid import save_image_grid

    n = min(n, len(data))
    W = max(data.images[i].shape[1] for i in range(n))
    H = max(data.images[i].shape[0] for i in range(n))
    up = max(1, int(round(240 / W)))
    tiles, titles = [], []
    for i in range(n):
        img = Image.fromarray(data.images[i]).convert("RGB")
        sx, sy = W * up / img.width, H * up / img.height
        img = img.resize((W * up, H * up), Image.NEAREST)
        d = ImageDraw.Draw(img)

        def box(b, sx=sx, sy=sy):
            return [float(b[0]) * sx, float(b[1]) * sy, float(b[2]) * sx, float(b[3]) * sy]

        for b in data.gt[i]["boxes"]:
            d.rectangle(box(b), outline=(0, 200, 0), width=1)
        det = dets[i]
        for j in np.argsort(-det["scores"])[:top]:
            b = box(det["boxes"][j])
            d.rectangle(b, outline=(230, 0, 0), width=2)
            d.text((b[0] + 2, b[1] + 1), f"{class_names[int(det['labels'][j])]} {det['scores'][j]:.2f}", fill=(255, 255, 0))
        tiles.append(np.asarray(img))
        titles.append(data.ids[i])
    return save_image_grid(np.stack(tiles), path, nrow=4, titles=titles)


def pool5_unit_index(channel: int, y: int, x: int, grid: int) -> int:
    """Column of a pool5 row (flattened C x grid x grid) for channel ``channel`` at cell (y, x)."""
    return int(channel) * grid * grid + int(y) * grid + int(x)


def choose_pool5_units(pool5: np.ndarray, grid: int, count: int = 6) -> list[int]:
    """``count`` units at the centre cell of the pool5 grid (as the thesis shows units at (3, 3) of 6 x 6),
    the channels whose activation varies most over the regions (dead or constant units show nothing)."""
    channels = pool5.shape[1] // (grid * grid)
    cols = [pool5_unit_index(c, grid // 2, grid // 2, grid) for c in range(channels)]
    sample = np.asarray(pool5[: min(len(pool5), 50000)][:, cols], np.float32)
    best = np.argsort(-sample.std(0), kind="stable")[:count]
    return [cols[int(b)] for b in best]


def _resize(image: np.ndarray, side: int) -> np.ndarray:
    import cv2

    return cv2.resize(np.ascontiguousarray(image), (side, side), interpolation=cv2.INTER_LINEAR)


def pool5_units_figure(test, pool5_test: np.ndarray, grid: int, units: list[int] | None, top: int,
                       path: Path) -> tuple[Path, dict]:
    """Figure 3.4: the ``top`` test regions of each pool5 unit (``units``, or the six of :func:`choose_pool5_units`)
    with non-maximum suppression within an image; returns the PNG and what ``info["pool5_units"]`` records."""
    from engine.rcnn.analysis import top_regions_per_unit
    from transferrable.viz.image_grid import save_image_grid

    units = [int(u) for u in units] if units else choose_pool5_units(pool5_test, grid)
    image_index = np.concatenate([np.full(len(b), i) for i, b in enumerate(test.boxes)]).astype(np.int64)
    boxes = np.concatenate(test.boxes).astype(np.float32)
    rows = top_regions_per_unit(pool5_test, image_index, boxes, units, top=top)
    tiles, titles = [], []
    side = 64
    for u, picks in zip(units, rows, strict=True):
        c = u // (grid * grid)
        for r in picks:
            img = test.images[image_index[r]]
            x1, y1, x2, y2 = np.round(boxes[r]).astype(int)
            crop = img[max(0, y1):max(y1 + 1, y2), max(0, x1):max(x1 + 1, x2)]
            tiles.append(_resize(crop, side))
            titles.append(f"c{c} {float(pool5_test[r, u]):.1f}")  # the cell is the same for the row
        tiles += [np.full((side, side, 3), 255, np.uint8)] * (top - len(picks))
        titles += [""] * (top - len(picks))
    out = save_image_grid(np.stack(tiles), path, nrow=top, titles=titles)
    record = {"units": units, "grid": grid,
              "channel_cell": [[u // (grid * grid), list(divmod(u % (grid * grid), grid))] for u in units]}
    return out, record


def fp_breakdown_figure(detections: list[dict], gt: list[dict], class_names: list[str], num_classes: int, arch: str,
                        path: Path) -> tuple[Path, dict]:
    """Figure 3.5: the headline detector's false positives by type (Loc / Sim / Oth / BG); returns the PNG and the
    counts among each class's top-ranked false positives, up to as many as the class has objects (Hoiem et al.)."""
    from engine.rcnn.analysis import (
        FP_TYPES,
        SCENE_GROUPS,
        false_positive_types,
        plot_false_positive_breakdown,
    )

    groups = SCENE_GROUPS if set(sum(SCENE_GROUPS.values(), [])) <= set(class_names) else {"all": class_names}
    similar = [[class_names.index(n) for n in g if n in class_names] for g in groups.values()]
    types = false_positive_types(detections, gt, num_classes, similar)
    npos = [int(sum(int(((np.asarray(g["labels"]) == c) & ~np.asarray(g["difficult"], bool)).sum()) for g in gt))
            for c in range(num_classes)]
    within = [t[: max(n, 1)] for t, n in zip(types, npos, strict=True)]
    flat = [t for ts in within for t in ts]
    out = plot_false_positive_breakdown(types, class_names, groups, path,
                                        title=f"false positives of {arch} R-CNN by type (Loc / Sim / Oth / BG)")
    return out, {t: flat.count(t) for t in FP_TYPES}


# -- segmentation -----------------------------------------------------------------------------------
def segmentation_tables(variants: dict, bg, class_names: list[str], num_classes: int, dataset: str, arch: str,
                        finetune: str) -> list[dict]:
    """Table 3.5's layout (mean IoU per feature variant) and Table 3.7's (IoU per class, and the all-background
    baseline ``bg``, a ``seg_eval.ConfusionMatrix``)."""
    tag = "detection fine-tuned" if finetune == "detection" else "frozen"
    cols = [f"{k.split('/')[0]} {k.split('/')[1]}" for k in variants]
    cells = [[100 * v["mean_iou"]] for v in variants.values()]  # one run: no std
    best = int(np.argmax([c[0] for c in cells]))
    t35 = {"title": f"Segmentation mean accuracy (%) = mean IoU over background + {num_classes} classes, "
                    f"{dataset} test, backbone {arch} ({tag}); all-background baseline "
                    f"{100 * bg.mean_iou():.1f} (Table 3.5 layout)",
           "corner": "", "columns": cols, "rows": [{"label": f"R-CNN ({tag})", "cells": cells}], "bold": [0, best]}

    def row(label, iou):
        iou = np.asarray(iou, np.float64)
        return {"label": label, "cells": [None if not math.isfinite(v) else [100 * v] for v in iou]
                + [[100 * float(np.nanmean(iou))]]}

    rows = [row(f"{k.split('/')[0]} R-CNN {k.split('/')[1]}", v["iou"]) for k, v in variants.items()]
    rows.append(row("all background (baseline)", bg.iou()))
    t37 = {"title": f"Per-category segmentation accuracy (%) = IoU, {dataset} test ({tag}; Table 3.7 layout)",
           "corner": dataset, "columns": ["bg", *class_names, "mean"], "rows": rows,
           "bold": [best, len(class_names) + 1]}
    return [t35, t37]


def draw_label_maps(data, preds: list[np.ndarray], path: Path, n: int, variant: str) -> Path:
    """``n`` test images of ``data`` (a ``SegSplit``) as rows of image | ground truth | prediction (VOC palette;
    void drawn as in VOC)."""
    from PIL import Image

    from transferrable.viz.image_grid import save_image_grid
    from transferrable.viz.palette import colorize

    n = min(n, len(data))
    H = max(data.shapes[i][0] for i in range(n))
    W = max(data.shapes[i][1] for i in range(n))
    up = max(1, int(round(160 / W)))
    tiles, titles = [], []
    for i in range(n):
        for arr, title in ((data.images[i], data.ids[i]), (colorize(data.gt[i]), "ground truth"),
                           (colorize(preds[i]), variant)):
            img = Image.fromarray(np.ascontiguousarray(arr)).resize((W * up, H * up), Image.NEAREST)
            tiles.append(np.asarray(img.convert("RGB")))
            titles.append(title)
    return save_image_grid(np.stack(tiles), path, nrow=3, titles=titles)
