"""From scored proposals to detections: per-class NMS and the per-image cap (thesis 3.1.1's test time)."""

from __future__ import annotations

import numpy as np
import torch


def detect_boxes(boxes: np.ndarray, scores: np.ndarray, reg_boxes: list[np.ndarray] | None,
                 image_size: tuple[int, int], nms_threshold: float = 0.3, max_per_image: int = 100) -> dict:
    """Per-class NMS (``nms_threshold``) over one image's scored proposals, then the top
    ``max_per_image`` overall. ``scores`` R x C; ``reg_boxes`` per class R x 4 (box regression) or None."""
    from torchvision.ops import batched_nms

    R, C = scores.shape
    if R == 0:
        return {"boxes": np.zeros((0, 4), np.float32), "scores": np.zeros(0), "labels": np.zeros(0, np.int64)}
    w, h = image_size
    all_boxes = np.stack(reg_boxes, 0) if reg_boxes is not None else np.broadcast_to(boxes, (C, R, 4))
    all_boxes = all_boxes.reshape(-1, 4).copy()
    all_boxes[:, [0, 2]] = all_boxes[:, [0, 2]].clip(0, w)
    all_boxes[:, [1, 3]] = all_boxes[:, [1, 3]].clip(0, h)
    labels = np.repeat(np.arange(C), R)
    s = scores.T.reshape(-1)
    ok = np.isfinite(s) & (all_boxes[:, 2] > all_boxes[:, 0]) & (all_boxes[:, 3] > all_boxes[:, 1])
    b, s, lab = torch.from_numpy(all_boxes[ok]), torch.from_numpy(s[ok].astype(np.float32)), torch.from_numpy(labels[ok])
    keep = batched_nms(b, s, lab, float(nms_threshold))[: int(max_per_image)]
    return {"boxes": b[keep].numpy(), "scores": s[keep].numpy(), "labels": lab[keep].numpy()}
