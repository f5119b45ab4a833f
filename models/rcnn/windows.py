"""R-CNN's regions as data: one split's images, ground truth and proposals (``ImageSet``), and the fine-tuning
minibatches drawn from them, warped windows (``WindowBatches``, R-CNN) or whole images whose regions are RoI-pooled
from one conv5 map (``RoiBatches``, Fast R-CNN)."""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from models.rcnn.feature_rows import RegionIndex
from models.rcnn.regions import assign_labels, image_tensor, warp_regions_multi


class ImageSet(RegionIndex):
    """One split in memory: images, ground truth, proposals and the region list used for features."""

    def __init__(self, name: str, items: list[dict], proposals: list[np.ndarray], with_gt: bool):
        self.name = name
        self.ids = [it["image_id"] for it in items]
        self.images = [it["image"] for it in items]
        self.gt = [{"boxes": it["boxes"], "labels": it["labels"], "difficult": it["difficult"]} for it in items]
        self.proposals = proposals
        # regions: GT first (training only), then proposals
        self.boxes, self.is_gt = [], []
        for it, p in zip(items, proposals, strict=True):
            g = it["boxes"] if with_gt else np.zeros((0, 4), np.float32)
            self.boxes.append(np.concatenate([g, p]).astype(np.float32))
            self.is_gt.append(np.concatenate([np.ones(len(g), bool), np.zeros(len(p), bool)]))
        counts = [len(b) for b in self.boxes]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)


class WindowBatches(Dataset):
    """Fine-tuning minibatches: item k is ``positives`` + ``background`` warped windows drawn (with a
    per-item seed) from every training image, labels 0 = background, 1..N = classes."""

    def __init__(self, data: ImageSet, labels: list[np.ndarray], iterations: int, positives: int,
                 background: int, size: int, pad: float, mean, std, seed: int):
        self.data, self.size, self.pad, self.mean, self.std = data, size, pad, mean, std
        self.iterations, self.n_pos, self.n_bg, self.seed = int(iterations), int(positives), int(background), seed
        img = np.concatenate([np.full(len(lab), i) for i, lab in enumerate(labels)])
        idx = np.concatenate([np.arange(len(lab)) for lab in labels])
        lab = np.concatenate(labels)
        self.pos = np.stack([img[lab > 0], idx[lab > 0]], 1)
        self.bg = np.stack([img[lab == 0], idx[lab == 0]], 1)
        self.labels = labels
        self.tensors: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.iterations

    def _tensor(self, i: int) -> torch.Tensor:
        if i not in self.tensors:
            self.tensors[i] = image_tensor(self.data.images[i], self.mean, self.std)
        return self.tensors[i]

    def __getitem__(self, k: int):
        rng = np.random.default_rng([self.seed, k])
        picks = []
        for pool, n in ((self.pos, self.n_pos), (self.bg, self.n_bg)):
            if len(pool) and n > 0:
                picks.append(pool[rng.choice(len(pool), n, replace=len(pool) < n)])
        sel = np.concatenate(picks) if picks else np.zeros((0, 2), np.int64)
        imgs, bxs, ys = [], [], []
        for i in np.unique(sel[:, 0]):
            j = sel[sel[:, 0] == i, 1]
            imgs.append(self._tensor(int(i)))
            bxs.append(self.data.boxes[i][j])
            ys.append(torch.from_numpy(self.labels[i][j]))
        return warp_regions_multi(imgs, bxs, self.size, self.pad), torch.cat(ys)


class RoiBatches(WindowBatches):
    """Fast R-CNN minibatches for fine-tuning through RoI pooling (``finetune.windows=roi_pool``): item k is
    ``images`` whole images (drawn with a per-item seed) and (``positives`` + ``background``) / ``images``
    proposals of each, positives first (as many as the image has, up to its share), so that the conv map of
    each image is computed once and shared by its regions, as at test time in ``feature_mode=roi_pool``."""

    def __init__(self, *args, images: int = 2, **kwargs):
        super().__init__(*args, **kwargs)
        self.per_batch = max(1, int(images))
        self.usable = np.array([i for i, lab in enumerate(self.labels) if len(lab)], np.int64)

    def __getitem__(self, k: int):
        rng = np.random.default_rng([self.seed, k])
        chosen = rng.choice(self.usable, min(self.per_batch, len(self.usable)), replace=False)
        per_image = max(1, (self.n_pos + self.n_bg) // len(chosen))
        pos_share = max(0, self.n_pos // len(chosen))
        imgs, bxs, ys = [], [], []
        for i in chosen:
            lab = self.labels[i]
            fg, bg = np.flatnonzero(lab > 0), np.flatnonzero(lab == 0)
            take = [rng.choice(fg, min(pos_share, len(fg)), replace=False)] if len(fg) else []
            n_bg = per_image - sum(len(t) for t in take)
            pool = bg if len(bg) else fg
            take.append(rng.choice(pool, n_bg, replace=len(pool) < n_bg))
            j = np.concatenate(take)
            imgs.append(self._tensor(int(i)))
            bxs.append(torch.from_numpy(self.data.boxes[i][j]))
            ys.append(torch.from_numpy(lab[j]))
        return imgs, bxs, torch.cat(ys)


def window_batches(data: ImageSet, finetune: dict, size: int, pad: float, iterations: int, mean, std,
                   seed: int) -> WindowBatches:
    """Fine-tuning minibatches of ``data`` in the ``finetune.windows`` mode (``rcnn.finetune``'s keys): regions
    with IoU >= ``fg_threshold`` to a ground-truth box are its class (+1), the rest background (0)."""
    labels = [assign_labels(b, g["boxes"], g["labels"], finetune["fg_threshold"])[0]
              for b, g in zip(data.boxes, data.gt, strict=True)]
    args = (data, labels, iterations, finetune["positives"], finetune["background"], size, pad, mean, std, seed)
    if finetune["windows"] == "roi_pool":
        return RoiBatches(*args, images=finetune["roi_images"])
    return WindowBatches(*args)
