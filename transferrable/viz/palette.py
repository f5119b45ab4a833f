"""The PASCAL VOC palette: label maps as colours, for the generated segmentation PNGs and the figures."""

from __future__ import annotations

from functools import lru_cache

import numpy as np


def voc_colormap(n: int = 256) -> np.ndarray:
    """The PASCAL VOC palette (n x 3 uint8): index 0 black, 1 (128, 0, 0), ..., 255 (224, 224, 192)."""
    return _voc_colormap(int(n)).copy()


@lru_cache(maxsize=4)
def _voc_colormap(n: int) -> np.ndarray:
    cmap = np.zeros((n, 3), dtype=np.uint8)
    for i in range(n):
        r = g = b = 0
        c = i
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        cmap[i] = (r, g, b)
    return cmap


def colorize(labels: np.ndarray) -> np.ndarray:
    """uint8 H x W x 3: a label map (0..254, 255 void) in the VOC palette."""
    return voc_colormap(256)[np.asarray(labels, np.uint8)]
