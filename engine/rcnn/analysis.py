"""Detector diagnosis figures of thesis 3.1 (Hoiem et al.'s analysis and the pool5 unit visualisation).

``false_positive_types``: every false positive of each class, in score order, typed as
  * ``Loc``: poor localisation -- overlaps a ground-truth box of its own class with 0.1 <= IoU < 0.5, or is
    a duplicate detection (IoU >= 0.5 with an object already detected);
  * ``Sim``: confusion with a similar class (IoU >= 0.1 with an object of a class in the same group);
  * ``Oth``: confusion with a dissimilar class (IoU >= 0.1 with an object of any other class);
  * ``BG``: fired on background (IoU < 0.1 with every labelled object).
  Difficult objects are neither TP nor FP, as in ``transferrable.metrics.voc_eval``.
``plot_false_positive_breakdown``: Figure 3.5 -- per class group, the share of each type among the top-ranked
false positives, as a stacked area over the number of false positives considered (log x).
``top_regions_per_unit``: Figure 3.4 -- for chosen pool5 units (a channel at a cell of the pool5 grid), the
highest-activating regions over held-out proposals, non-maximum suppressed within each image so that the
same object is not shown many times.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from transferrable.core.atomic import atomic_write_bytes
from transferrable.metrics.voc_eval import box_iou

FP_TYPES = ("Loc", "Sim", "Oth", "BG")
# the generated scenes' classes (Fashion-MNIST): similar = same kind of garment
SCENE_GROUPS = {"tops": ["t-shirt", "pullover", "dress", "coat", "shirt"], "footwear": ["sandal", "sneaker", "ankle-boot"],
                "trouser+bag": ["trouser", "bag"]}


def false_positive_types(detections: Sequence[dict], ground_truth: Sequence[dict], num_classes: int,
                         similar: Sequence[Sequence[int]] = (), iou_threshold: float = 0.5) -> list[list[str]]:
    """Per class, the types (``FP_TYPES``) of its false positives in descending score order; ``similar``:
    groups of class indices that count as similar to each other."""
    group_of = {c: gi for gi, g in enumerate(similar) for c in g}
    out = []
    for c in range(num_classes):
        dets = [(float(s), i, np.asarray(b, np.float32)) for i, d in enumerate(detections)
                for s, b, lab in zip(d["scores"], np.asarray(d["boxes"]).reshape(-1, 4), d["labels"], strict=True)
                if int(lab) == c]
        dets.sort(key=lambda t: -t[0])
        matched = {}
        types = []
        for _, i, box in dets:
            gt = ground_truth[i]
            gb = np.asarray(gt["boxes"], np.float32).reshape(-1, 4)
            gl = np.asarray(gt["labels"]).reshape(-1)
            gd = np.asarray(gt.get("difficult", np.zeros(len(gl), bool)), bool).reshape(-1)
            iou = box_iou(box[None], gb)[0] if len(gb) else np.zeros(0, np.float32)
            own = np.flatnonzero(gl == c)
            if len(own):
                j = own[int(np.argmax(iou[own]))]
                if iou[j] >= iou_threshold:
                    if gd[j]:
                        continue  # a difficult object: neither TP nor FP
                    seen = matched.setdefault(i, set())
                    if j not in seen:
                        seen.add(j)
                        continue  # true positive
                    types.append("Loc")  # duplicate
                    continue
                if iou[j] >= 0.1:
                    types.append("Loc")
                    continue
            other = np.flatnonzero((gl != c) & (iou >= 0.1))
            if len(other) == 0:
                types.append("BG")
            elif any(group_of.get(int(gl[k]), -1) == group_of.get(c, -2) for k in other):
                types.append("Sim")
            else:
                types.append("Oth")
        out.append(types)
    return out


def breakdown_curve(types_per_class: Sequence[Sequence[str]], counts: Sequence[int]) -> np.ndarray:
    """len(counts) x 4 percentages of each type among the top ``k`` false positives of every class (pooled
    over the classes given), for each ``k`` in ``counts``."""
    out = np.zeros((len(counts), len(FP_TYPES)))
    for r, k in enumerate(counts):
        pooled = [t for types in types_per_class for t in list(types)[: int(k)]]
        if pooled:
            out[r] = [100.0 * pooled.count(t) / len(pooled) for t in FP_TYPES]
    return out


def plot_false_positive_breakdown(types_per_class: Sequence[Sequence[str]], class_names: Sequence[str],
                                  groups: dict[str, Sequence[str]], path: str | Path, title: str = "") -> Path:
    """Figure 3.5: one stacked-area panel per class group, x = top-ranked false positives per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(class_names)
    groups = {g: [names.index(n) for n in members if n in names] for g, members in groups.items()}
    groups = {g: idx for g, idx in groups.items() if idx} or {"all": list(range(len(names)))}
    fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.2), squeeze=False)
    colours = ("#4c72b0", "#dd8452", "#c44e52", "#8c8c8c")
    for ax, (g, idx) in zip(axes[0], groups.items(), strict=True):
        sub = [types_per_class[c] for c in idx]
        most = max((len(t) for t in sub), default=0)
        counts = np.unique(np.clip(np.round(np.geomspace(1, max(most, 1), 24)), 1, None).astype(int))
        curve = breakdown_curve(sub, counts)
        ax.stackplot(counts, curve.T, labels=FP_TYPES, colors=colours, alpha=0.9)
        ax.set_xscale("log")
        ax.set_ylim(0, 100)
        ax.set_xlim(counts[0], max(counts[-1], counts[0] + 1))
        ax.set_title(f"{g} ({sum(len(t) for t in sub)} FP)")
        ax.set_xlabel("top false positives per class")
        ax.set_ylabel("percentage of each type")
    axes[0][-1].legend(loc="lower right", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    atomic_write_bytes(Path(path), buf.getvalue())
    return Path(path)


def top_regions_per_unit(activations: np.ndarray, image_index: np.ndarray, boxes: np.ndarray,
                         units: Sequence[int], top: int = 8, nms_threshold: float = 0.3) -> list[list[int]]:
    """Per unit (a column of ``activations``, R x D), the rows of its ``top`` highest activations, greedy
    per-image non-maximum suppression of the boxes at ``nms_threshold`` so one object shows once."""
    out = []
    for u in units:
        order = np.argsort(-np.asarray(activations[:, u], np.float32), kind="stable")
        kept: list[int] = []
        for r in order:
            same = [k for k in kept if image_index[k] == image_index[r]]
            if same and box_iou(boxes[r][None], boxes[same]).max() > nms_threshold:
                continue
            kept.append(int(r))
            if len(kept) == top:
                break
        out.append(kept)
    return out
