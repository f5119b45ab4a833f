"""Reader for the IDX format of (Fashion-)MNIST, plain or gzipped."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np

from datamodules.base import DatasetError
from datamodules.file_checks import kind_fault

_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError) as err:
        raise DatasetError(f"unreadable IDX file: {path} ({err})") from err
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _DTYPES:
        raise DatasetError(f"not an IDX file: {path} (bad magic number)")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
    offset, dtype = 4 + 4 * ndim, np.dtype(_DTYPES[data[2]])
    expected = int(np.prod(dims)) * dtype.itemsize
    if len(data) - offset != expected:
        raise DatasetError(f"truncated IDX file: {path} (header says {dims}, {len(data) - offset} of {expected} bytes)")
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(dims)


def find_idx(directory: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (directory / name).is_file():
            return directory / name
    # torchvision's download layout
    for name in (stem, stem + ".gz"):
        for sub in directory.glob(f"*/raw/{name}"):
            return sub
    return None


def load_idx_split(directory: Path, prefix: str, dataset: str, how_to_get: str,
                   num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``prefix`` is ``train`` or ``t10k``; returns (images N x 28 x 28 uint8, labels)."""
    why = kind_fault(directory, "folder")
    if why:
        raise DatasetError(f"dataset.data_dir={directory} {why}; expected a folder of {dataset} IDX files "
                           f"{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz]. {how_to_get}")
    found = {}
    for stem in (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte"):
        found[stem] = find_idx(directory, stem)
        if found[stem] is None:
            wrong = [directory / n for n in (stem, stem + ".gz") if (directory / n).exists()]
            what = f"{wrong[0]} {kind_fault(wrong[0], 'file')}" if wrong else f"no {stem}[.gz] there"
            raise DatasetError(f"dataset.data_dir={directory}: {what}; expected the {dataset} IDX files "
                               f"{{train,t10k}}-{{images-idx3,labels-idx1}}-ubyte[.gz]. {how_to_get}")
    img, lab = found.values()
    images, labels = read_idx(img), read_idx(lab).astype(np.int64)
    if len(images) != len(labels):
        raise DatasetError(f"{img}: {len(images)} images but {lab.name} has {len(labels)} labels")
    if len(labels) == 0:
        raise DatasetError(f"{lab}: no samples (expected at least one image and label)")
    if num_classes is not None and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(labels[(labels < 0) | (labels >= num_classes)][0])
        raise DatasetError(f"{lab}: label {bad} is outside the class list (expected 0..{num_classes - 1})")
    return images, labels


def download_idx(data_dir: Path, torchvision_dataset: str) -> None:
    """``dataset.download=true``: fetch the IDX files with torchvision (needs internet) unless present."""
    if find_idx(Path(data_dir), "train-images-idx3-ubyte") is None:
        import torchvision

        for train in (True, False):
            getattr(torchvision.datasets, torchvision_dataset)(str(data_dir), train=train, download=True)
