"""Region warping (thesis 3.1.1 / appendix 3.4.1, "warp" with context padding) and label assignment.

``context_boxes``: the tight box is dilated about its centre so that, once warped anisotropically to
``size x size``, exactly ``pad`` pixels of image context surround the original box: the box covers
``size - 2 pad`` output pixels, so each side grows by ``pad * w / (size - 2 pad)`` (in x; likewise y).
``scaled_pad``: the thesis's p = 16 at 227 px, scaled to the backbone's ``input_size`` (p * size / 227).

``warp_regions``: one bilinear ``torchvision.ops.roi_align`` (``aligned=True``: pixel-edge coordinates)
over the normalised image tensor for all boxes of an image at once. The image is mean-subtracted first,
so a dilated box reaching outside the image samples zeros there, i.e. out-of-image pixels are the mean,
as in the original. Boxes are 0-based pixel-edge ``x1, y1, x2, y2``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from transferrable.metrics.voc_eval import box_iou

REFERENCE_SIZE, REFERENCE_PAD = 227, 16


def scaled_pad(input_size: int, pad: float = REFERENCE_PAD, reference: int = REFERENCE_SIZE) -> float:
    return float(pad) * float(input_size) / float(reference)


def context_boxes(boxes: np.ndarray | torch.Tensor, size: int, pad: float) -> torch.Tensor:
    b = torch.as_tensor(np.asarray(boxes, dtype=np.float32) if not torch.is_tensor(boxes) else boxes).float()
    if pad <= 0:
        return b.clone()
    if 2 * pad >= size:
        raise ValueError(f"context pad {pad} leaves nothing of a {size}px warp")
    grow = pad / (size - 2.0 * pad)
    w, h = b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]
    return torch.stack([b[:, 0] - grow * w, b[:, 1] - grow * h, b[:, 2] + grow * w, b[:, 3] + grow * h], 1)


def image_tensor(image: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 H x W x 3 -> normalised float 1 x 3 x H x W (the mean becomes 0)."""
    x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255.0)
    m = torch.tensor(mean, dtype=torch.float32)[:, None, None]
    s = torch.tensor(std, dtype=torch.float32)[:, None, None]
    return ((x - m) / s)[None]


def warp_regions(image: np.ndarray | torch.Tensor, boxes: np.ndarray | torch.Tensor, size: int, pad: float,
                 mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                 sampling_ratio: int = 2) -> torch.Tensor:
    """Warped regions, R x 3 x size x size, normalised (see the module docstring). ``image`` is a uint8
    H x W x 3 array or an already normalised 1 x 3 x H x W tensor."""
    from torchvision.ops import roi_align

    x = image if torch.is_tensor(image) else image_tensor(image, mean, std)
    dil = context_boxes(boxes, size, pad)
    if len(dil) == 0:
        return x.new_zeros((0, 3, size, size))
    rois = torch.cat([torch.zeros(len(dil), 1), dil], 1)
    return roi_align(x, rois, output_size=(size, size), spatial_scale=1.0, sampling_ratio=sampling_ratio,
                     aligned=True)


def warp_regions_multi(images: Sequence[torch.Tensor], boxes: Sequence[np.ndarray], size: int, pad: float,
                       sampling_ratio: int = 2) -> torch.Tensor:
    """``warp_regions`` for boxes of many (normalised 1 x 3 x H x W) images, in the order given: images of one
    shape share a single ``roi_align`` call (a call costs milliseconds however few boxes it warps, and a
    fine-tuning minibatch draws its 128 windows from up to 128 images)."""
    from torchvision.ops import roi_align

    counts = [len(b) for b in boxes]
    out = images[0].new_zeros((sum(counts), 3, size, size)) if images else torch.zeros((0, 3, size, size))
    starts = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    by_shape: dict[tuple, list[int]] = {}
    for i, x in enumerate(images):
        if counts[i]:
            by_shape.setdefault(tuple(x.shape), []).append(i)
    with torch.no_grad():
        for members in by_shape.values():
            stack = torch.cat([images[i] for i in members])
            rois = torch.cat([torch.cat([torch.full((counts[i], 1), float(k)), context_boxes(boxes[i], size, pad)], 1)
                              for k, i in enumerate(members)])
            warped = roi_align(stack, rois, output_size=(size, size), spatial_scale=1.0,
                               sampling_ratio=sampling_ratio, aligned=True)
            rows = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in members])
            out[torch.from_numpy(rows)] = warped
    return out


def assign_labels(boxes: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray, fg_threshold: float = 0.5,
                  background: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fine-tuning labels (appendix 3.4.2): each box takes the class of the ground-truth box it overlaps
    most, shifted by one (``1..N``), when that IoU >= ``fg_threshold``; else ``background`` (0).
    Returns (labels, max IoU, index of that ground-truth box; -1 without ground truth)."""
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    gt_boxes = np.asarray(gt_boxes, np.float32).reshape(-1, 4)
    if len(gt_boxes) == 0:
        z = np.zeros(len(boxes))
        return np.full(len(boxes), background, np.int64), z, np.full(len(boxes), -1, np.int64)
    iou = box_iou(boxes, gt_boxes)
    arg = iou.argmax(1)
    best = iou[np.arange(len(boxes)), arg]
    labels = np.where(best >= fg_threshold, np.asarray(gt_labels, np.int64)[arg] + 1, background)
    return labels.astype(np.int64), best.astype(np.float64), arg.astype(np.int64)


def class_max_iou(boxes: np.ndarray, gt_boxes: np.ndarray, gt_labels: np.ndarray, num_classes: int) -> np.ndarray:
    """R x C: each box's highest IoU with a ground-truth box of each class (0 where the class is absent);
    what SVM negatives (< 0.3 for that class) are chosen by."""
    out = np.zeros((len(boxes), num_classes), np.float32)
    if len(gt_boxes) == 0 or len(boxes) == 0:
        return out
    iou = box_iou(boxes, gt_boxes)
    for c in np.unique(gt_labels):
        out[:, int(c)] = iou[:, np.asarray(gt_labels) == c].max(1)
    return out
