"""On-disk cache of extracted features (DeCAF's frozen activations, raw pixels, HOG): an ``ArtifactCache``.

An entry is identified by a *key*: a JSON-able dict naming everything the array depends on (the weights --
a checkpoint's sha256 or ``random:<seed>`` plus a hash of the loaded state --, the backbone config, the tap,
the dataset's content, the transform, the image pool, the extraction precision and ``CACHE_VERSION``). The
key's sha256 names two files under the cache directory (``${paths.cache_dir}/features`` by default)::

    <feature>-<hash16>.npy    the features, N x D float32, one row per pool image in the pool's order
    <feature>-<hash16>.json   the manifest: version, the full key and its hash, shape, dtype, n, the
                              .npy file's size and sha256 -- written last, so it marks a complete entry

``FeatureCache`` is a thin layer over ``transferrable.core.artifact_cache.ArtifactCache`` (``record_key=True``,
``manifest_name="{stem}.json"``), which writes both atomically (temporary file + ``os.replace``), so a crash never
leaves a half-written file under the final name; concurrent sweep jobs compute an entry once (the first computes
it under the entry's lock, ``transferrable.core.cache_lock``, the others wait and load it).
On load, a manifest whose key, version, shape or checksum does not match -- a truncated ``.npy``, a file copied
over from other weights, an old format -- is reported with a ``FeatureCacheWarning`` and the entry is rebuilt; a
damaged entry is never used silently.
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from transferrable.core.artifact_cache import (
    ABSENT,
    NO_MANIFEST,
    ArtifactCache,
    CacheWarning,
    Unusable,
    key_hash,
)

__all__ = ["CACHE_VERSION", "FeatureCache", "FeatureCacheWarning", "key_hash", "state_sha256"]

CACHE_VERSION = 1


class FeatureCacheWarning(CacheWarning):
    """A cache entry was unusable (truncated, other key, other version) and is being rebuilt."""


def state_sha256(module) -> str:
    """sha256 over a module's state dict (names, shapes, dtypes, values): the identity of loaded weights,
    whatever file (or random seed) they came from."""
    import torch

    h = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "feature"


def _load_npy(path: Path, manifest: dict) -> np.ndarray:
    arr = np.load(path, allow_pickle=False)
    if list(arr.shape) != list(manifest.get("shape", [])) or str(arr.dtype) != manifest.get("dtype"):
        raise Unusable(f"array {arr.shape}/{arr.dtype} != manifest {manifest.get('shape')}/{manifest.get('dtype')}")
    return arr


class FeatureCache:
    """``get_or_compute(name, key, compute)``: the cached array for ``key``, else ``compute()`` stored."""

    def __init__(self, root: str | Path, enabled: bool = True):
        self.root = Path(root)
        self.enabled = bool(enabled)
        self.hits = 0
        self.misses = 0
        self.rebuilt = 0
        self.cache = ArtifactCache(self.root, version=CACHE_VERSION, what="feature cache entry", record_key=True,
                                   manifest_name="{stem}.json", warning=FeatureCacheWarning)

    def paths(self, name: str, key: dict[str, Any]) -> tuple[Path, Path]:
        npy = self.cache.path_for(key, prefix=f"{_slug(name)}-", suffix=".npy")
        return npy, self.cache.manifest_path(npy)

    def load(self, name: str, key: dict[str, Any]) -> np.ndarray | None:
        """The cached array, or None (a miss). A damaged or mismatched entry warns and counts as a miss."""
        if not self.enabled:
            return None
        npy, _ = self.paths(name, key)
        arr, why = self.cache.read(npy, key, _load_npy)
        if why not in (None, ABSENT, NO_MANIFEST):  # damaged: warned by the cache
            self.rebuilt += 1
        return arr

    def save(self, name: str, key: dict[str, Any], array: np.ndarray) -> Path:
        npy, _ = self.paths(name, key)
        array = np.ascontiguousarray(array)
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        data = buf.getvalue()
        return self.cache.write_bytes(npy, key, data, name=name, shape=list(array.shape), dtype=str(array.dtype),
                                      n=int(array.shape[0]) if array.ndim else 1, nbytes=len(data))

    def get_or_compute(self, name: str, key: dict[str, Any], compute: Callable[[], np.ndarray]) -> tuple[np.ndarray, bool]:
        """(array, hit)."""
        arr = self.load(name, key)
        if arr is not None:
            self.hits += 1
            return arr, True
        if not self.enabled:
            self.misses += 1
            return compute(), False
        with self.cache.lock(self.paths(name, key)[0]):  # parallel jobs compute an entry once
            arr, why = self.cache.read(self.paths(name, key)[0], key, _load_npy, warn=False)
            if arr is not None:
                self.hits += 1
                return arr, True
            self.misses += 1
            arr = compute()
            self.save(name, key, arr)
        return arr, False
