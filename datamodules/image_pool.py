"""A dataset's images as one *pool* in canonical order, and the N-per-class draws of DeCAF's protocol.

``pool: all`` joins a DataModule's train+val+test and lets the protocol draw its splits from it (Caltech-101
style); ``pool: given`` draws the N training samples per class from train+val and tests on the DataModule's test
split. Every image goes through the *evaluation* transform (resize to ``input_size``, normalise; no augmentation).
The pool is put in a canonical order (by label, then image content), so its features do not depend on the
DataModule's seed; ``max_images`` keeps at most ``ceil(max_images / num_classes)`` images per class, for quick
runs. The pool's ``key`` (dataset, content hash, transform) is the dataset part of a feature-cache key.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from datamodules.base import build_transform, subset
from transferrable.core.errors import ConfigError, DatasetError


@dataclass
class Pool:
    """Images of one dataset in canonical order; ``part`` is 0 (training candidates) or 1 (fixed test set)."""

    name: str
    images: Any
    labels: np.ndarray
    part: np.ndarray
    class_names: list[str]
    key: dict
    transform: Any = field(repr=False, default=None)
    gray: bool = False

    def __len__(self) -> int:
        return len(self.labels)


def _item_digest(item) -> bytes:
    if isinstance(item, str | Path):
        st = os.stat(item)
        return hashlib.sha1(f"{item}|{st.st_size}|{st.st_mtime_ns}".encode()).digest()
    arr = np.ascontiguousarray(item)
    return hashlib.sha1(f"{arr.shape}|{arr.dtype}|".encode() + arr.tobytes()).digest()


def _capped(order: list[int], part: np.ndarray, labels: np.ndarray, cap: int) -> list[int]:
    """The first ``cap`` entries of ``order`` of each (part, label)."""
    seen: dict[tuple[int, int], int] = {}
    kept = []
    for i in order:
        k = (int(part[i]), int(labels[i]))
        if seen.get(k, 0) < cap:
            seen[k] = seen.get(k, 0) + 1
            kept.append(i)
    return kept


def build_pool(datamodule, pool: str = "all", max_images: int | None = None) -> Pool:
    """The DataModule's images as one pool (see the module docstring), with the dataset part of the cache key."""
    if pool not in ("all", "given"):
        raise ConfigError(f"decaf.pool={pool!r}: expected 'all' (train+val+test, split by the protocol) or 'given'")
    datamodule.setup()
    names = list(datamodule.class_names)
    parts = [("train", 0), ("val", 0), ("test", 0 if pool == "all" else 1)]
    chunks = [(datamodule.splits[s].images, datamodule.splits[s].labels, p) for s, p in parts if s in datamodule.splits]
    if all(isinstance(x, np.ndarray) for x, _, _ in chunks):
        images = np.concatenate([x for x, _, _ in chunks])
    else:
        images = [i for x, _, _ in chunks for i in (x if not isinstance(x, np.ndarray) else list(x))]
    labels = np.concatenate([np.asarray(y, dtype=np.int64) for _, y, _ in chunks])
    part = np.concatenate([np.full(len(y), p, dtype=np.int8) for _, y, p in chunks])

    digests = [_item_digest(images[i]) for i in range(len(labels))]
    order = sorted(range(len(labels)), key=lambda i: (int(part[i]), int(labels[i]), digests[i]))
    if max_images:
        order = _capped(order, part, labels, math.ceil(int(max_images) / max(len(names), 1)))
    idx = np.asarray(order, dtype=np.int64)
    images, labels, part = subset(images, idx), labels[idx], part[idx]
    h = hashlib.sha256()
    for i in idx:
        h.update(digests[i])
    h.update(labels.tobytes() + part.tobytes())

    size, mean, std = int(datamodule.input_size), list(datamodule.mean), list(datamodule.std)
    gray = isinstance(images, np.ndarray) and images.ndim == 3
    cls = type(datamodule)
    key = {
        "datamodule": f"{cls.__module__}.{cls.__qualname__}",
        "name": getattr(datamodule, "name", cls.__name__),
        "pool": pool,
        "max_images": max_images,
        "n": int(len(labels)),
        "content_sha256": h.hexdigest(),
        "transform": {"resize": size, "mean": mean, "std": std},
    }
    return Pool(getattr(datamodule, "name", cls.__name__), images, labels, part, names, key,
                build_transform(size, mean, std, "none"), gray)


def subset_pool(pool: Pool, rows: np.ndarray) -> Pool:
    """The pool's ``rows`` as a pool of their own, with a cache key of its own (dataset key + the rows)."""
    rows = np.asarray(rows, dtype=np.int64)
    key = {**pool.key, "n": int(len(rows)), "rows_sha256": hashlib.sha256(rows.tobytes()).hexdigest()}
    return Pool(pool.name, subset(pool.images, rows), pool.labels[rows], pool.part[rows], pool.class_names, key,
                pool.transform, pool.gray)


def check_pool(pool: Pool, n_train: int, what: str = "decaf.train_per_class") -> None:
    """One-line DatasetErrors for a pool the protocol cannot use: one class, or N >= a class's size."""
    train_labels = pool.labels[pool.part == 0]
    present = np.unique(pool.labels)
    if len(present) < 2:
        only = pool.class_names[present[0]] if len(present) else "-"
        raise DatasetError(
            f"dataset '{pool.name}' has a single class ('{only}', {len(pool)} images): a classifier needs at least 2"
        )
    counts = np.bincount(train_labels, minlength=len(pool.class_names))
    counts = np.where(np.isin(np.arange(len(counts)), present), counts, np.iinfo(np.int64).max)
    smallest = int(np.argmin(counts))
    given = bool((pool.part == 1).any())
    need = n_train if given else n_train + 1
    if counts[smallest] < need:
        where = "in its train+val splits" if given else "in the pool (train+val+test)"
        raise DatasetError(
            f"{what}={n_train}: class '{pool.class_names[smallest]}' of dataset '{pool.name}' has only "
            f"{counts[smallest]} images {where}; every class needs "
            f"{'at least' if given else 'more than'} {n_train} (N to train, the rest to test)"
        )


def per_class_draw(labels: np.ndarray, candidates: np.ndarray, n: int | None, seed: int) -> np.ndarray:
    """``n`` random indices of each class among ``candidates`` (all of them when ``n`` is None), sorted.
    The draw for a smaller ``n`` with the same seed is a subset of the draw for a larger one."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(labels[candidates]):
        idx = rng.permutation(candidates[labels[candidates] == c])
        chosen.append(idx if n is None else idx[:n])
    return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, dtype=np.int64)


def protocol_split(pool: Pool, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) indices: ``n`` per class from the training candidates, the rest (pool=all) or the
    given test split (pool=given) for test."""
    candidates = np.flatnonzero(pool.part == 0)
    train = per_class_draw(pool.labels, candidates, n, seed)
    if (pool.part == 1).any():
        test = np.flatnonzero(pool.part == 1)
    else:
        test = np.setdiff1d(np.arange(len(pool)), train)
    return train, test


class DirectTransform:
    """A fixed albumentations pipeline (Resize / Normalize / ToTensorV2 only) run by calling each transform's
    ``apply`` in turn: the same output bit for bit, without Compose's per-call bookkeeping (shape checks,
    probability draws, parameter and target routing), which is over half of the per-image loading cost at
    DeCAF's small image sizes -- and loading is what kept extraction below the bare forward's speed."""

    FIXED = ("Resize", "Normalize", "ToTensorV2")

    def __init__(self, transforms: Sequence):
        self.transforms = list(transforms)

    @classmethod
    def of(cls, transform):
        """The direct form of ``transform`` when it is such a pipeline that always applies, else ``transform``."""
        steps = getattr(transform, "transforms", None)
        if steps is None or getattr(transform, "p", 1.0) != 1.0:
            return transform
        if all(type(t).__name__ in cls.FIXED and getattr(t, "p", 1.0) == 1.0 for t in steps):
            return cls(steps)
        return transform

    def __call__(self, image: np.ndarray) -> dict:
        for t in self.transforms:
            image = t.apply(image)
        return {"image": image}
