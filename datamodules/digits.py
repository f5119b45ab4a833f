"""scikit-learn's digits: 1,797 real 8x8 handwritten digits, a second digit domain next to MNIST.

Pixel values 0..16 are scaled to uint8 0..255; the train/test split is stratified by class,
``test_fraction`` held out, deterministic from ``seed``. Ships with scikit-learn, so no data_dir.
"""

from __future__ import annotations

import functools
import logging

import numpy as np

from datamodules.base import DatasetError, ImageClassificationDataModule, stratified_split

log = logging.getLogger(__name__)

CLASSES = [str(d) for d in range(10)]


@functools.lru_cache(maxsize=1)
def _load() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = np.clip(np.round(bunch.images * (255.0 / 16.0)), 0, 255).astype(np.uint8)
    labels = np.asarray(bunch.target, dtype=np.int64)
    images.flags.writeable = labels.flags.writeable = False  # shared by the cache
    return images, labels


def load_digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """(images 1797 x 8 x 8 uint8 in 0..255, labels 0..9)."""
    return _load()


class DigitsDataModule(ImageClassificationDataModule):
    name = "digits"

    def __init__(self, data_dir: str | None = None, test_fraction: float = 0.2, **kwargs):
        super().__init__(data_dir=data_dir, **kwargs)
        self.test_fraction = float(test_fraction)
        if not 0.0 < self.test_fraction < 1.0:
            raise DatasetError(f"dataset.test_fraction={test_fraction}: expected a fraction in (0, 1)")

    @property
    def class_names(self) -> list[str]:
        return CLASSES

    def load_splits(self):
        images, labels = load_digits_uint8()
        train, test = stratified_split(labels, self.test_fraction, self.seed)
        log.info(
            "digits: sklearn load_digits(), %d train / %d test (test_fraction=%g, seed=%d)",
            len(train), len(test), self.test_fraction, self.seed,
        )
        return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}
