"""Region features, quality targets and label pasting for R-CNN segmentation (thesis 3.2).

Features (``warp_full_and_fg``): every region's tight box is dilated with the detection context pad and
warped to ``size x size`` exactly as for detection (``models.rcnn.regions.warp_regions``) -- the *full*
input. The region's binary mask is warped with the same ``roi_align`` sampling grid and multiplies the
warped, mean-subtracted image -- the *fg* input: wherever the warped mask is 0 (background, or context
outside the region) the input is 0, i.e. the mean input, as the thesis replaces the background with the
mean; along the mask's border the bilinearly sampled mask blends the two. *full+fg* concatenates the two
inputs' features.

Quality targets (``region_quality``): for each region and class, the overlap (intersection over union,
void pixels excluded from both) of the region with the class's ground-truth segments -- by default with the
best-matching *instance* of the class (as O2P's CPMC segments are scored), or with the union of the class's
pixels (``mode="class"``); 0 for a class absent from the image.

Pasting (``paste_labels``): each region takes its best class among those whose predicted quality exceeds
the class's threshold; regions are painted in increasing score order, so on every pixel the highest-scoring
region wins; pixels no such region covers are background.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from models.rcnn.regions import context_boxes, image_tensor, warp_regions

VOID = 255


def warp_masks(masks: np.ndarray | torch.Tensor, boxes: np.ndarray, size: int, pad: float, sampling_ratio: int = 2,
               chunk: int = 64) -> torch.Tensor:
    """R x 1 x size x size: mask r warped with region r's context-padded box (the grid of ``warp_regions``)."""
    from torchvision.ops import roi_align

    m = torch.as_tensor(np.asarray(masks), dtype=torch.float32) if not torch.is_tensor(masks) else masks.float()
    dil = context_boxes(boxes, size, pad)
    out = []
    for s in range(0, len(m), chunk):
        part = m[s:s + chunk, None]
        rois = torch.cat([torch.arange(len(part), dtype=torch.float32)[:, None], dil[s:s + chunk]], 1)
        out.append(roi_align(part, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=sampling_ratio,
                             aligned=True))
    return torch.cat(out) if out else m.new_zeros((0, 1, size, size))


def warp_full_and_fg(image: np.ndarray, masks: np.ndarray, boxes: np.ndarray, size: int, pad: float,
                     mean: Sequence[float], std: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(full, fg) warped inputs, each R x 3 x size x size, normalised (see the module docstring)."""
    x = image_tensor(image, mean, std)
    full = warp_regions(x, boxes, size, pad)
    return full, full * warp_masks(masks, boxes, size, pad)


def gt_segments(mask: np.ndarray, instances: np.ndarray | None, num_classes: int, mode: str = "instance"
                ) -> tuple[np.ndarray, np.ndarray]:
    """(segments bool K x H x W, classes int K): the class's instances (``instance``) or one union per
    present class (``class``); void pixels are in no segment."""
    if mode not in ("instance", "class"):
        raise ValueError(f"quality={mode!r}: expected instance or class")
    valid = (mask != VOID) & (mask > 0)
    segs, classes = [], []
    if mode == "instance" and instances is not None:
        for k in np.unique(instances[valid]):
            sel = valid & (instances == k)
            segs.append(sel)
            classes.append(int(np.bincount(mask[sel]).argmax()) - 1)
    else:
        for c in np.unique(mask[valid]):
            segs.append(mask == c)
            classes.append(int(c) - 1)
    h, w = mask.shape
    return np.asarray(segs, bool).reshape(-1, h, w), np.asarray(classes, np.int64)


def region_quality(masks: np.ndarray, mask: np.ndarray, instances: np.ndarray | None, num_classes: int,
                   mode: str = "instance") -> np.ndarray:
    """R x C: the best IoU of each region with a ground-truth segment of each class (void excluded)."""
    R = len(masks)
    q = np.zeros((R, num_classes), np.float32)
    segs, classes = gt_segments(mask, instances, num_classes, mode)
    if R == 0 or len(segs) == 0:
        return q
    valid = (mask != VOID).ravel()
    reg = np.asarray(masks, bool).reshape(R, -1)[:, valid].astype(np.float32)
    gt = segs.reshape(len(segs), -1)[:, valid].astype(np.float32)
    inter = reg @ gt.T
    union = reg.sum(1)[:, None] + gt.sum(1)[None, :] - inter
    iou = np.where(union > 0, inter / np.maximum(union, 1), 0.0)
    for k, c in enumerate(classes):
        if 0 <= c < num_classes:
            q[:, c] = np.maximum(q[:, c], iou[:, k])
    return q


def paste_labels(masks: np.ndarray, scores: np.ndarray, thresholds: np.ndarray | float) -> np.ndarray:
    """uint8 H x W label map (0 background, c + 1) from regions ``masks`` (R x H x W) and their predicted
    qualities ``scores`` (R x C); see the module docstring."""
    R = len(masks)
    h, w = masks.shape[1:] if R else (0, 0)
    out = np.zeros((h, w), np.uint8)
    if R == 0:
        return out
    s = np.where(scores > np.broadcast_to(np.asarray(thresholds, np.float32), scores.shape[1:]), scores, -np.inf)
    best = s.argmax(1)
    top = s[np.arange(R), best]
    for r in np.argsort(top, kind="stable"):
        if np.isfinite(top[r]):
            out[masks[r]] = best[r] + 1
    return out
