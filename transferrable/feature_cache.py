"""On-disk cache of extracted features (DeCAF's frozen activations, raw pixels, HOG).

An entry is identified by a *key*: a JSON-able dict naming everything the array depends on (the weights --
a checkpoint's sha256 or ``random:<seed>`` plus a hash of the loaded state --, the backbone config, the tap,
the dataset's content, the transform, the image pool, the extraction precision and ``CACHE_VERSION``). The
key's sha256 names two files under the cache directory (``${paths.cache_dir}/features`` by default)::

    <feature>-<hash16>.npy    the features, N x D float32, one row per pool image in the pool's order
    <feature>-<hash16>.json   the manifest: version, the full key and its hash, shape, dtype, n, the
                              .npy file's size and sha256 -- written last, so it marks a complete entry

Both are written atomically (temporary file + ``os.replace``), so a crash never leaves a half-written file
under the final name and concurrent sweep jobs at worst compute the same entry twice. On load, a manifest
whose key, version, shape or checksum does not match -- a truncated ``.npy``, a file copied over from other
weights, an old format -- is reported with a ``FeatureCacheWarning`` and the entry is rebuilt; a damaged
entry is never used silently.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from transferrable.atomic import atomic_write_bytes, atomic_write_json
from transferrable.manifest import CacheWarning, file_sha256

log = logging.getLogger(__name__)

CACHE_VERSION = 1


class FeatureCacheWarning(CacheWarning):
    """A cache entry was unusable (truncated, other key, other version) and is being rebuilt."""


def key_hash(key: dict[str, Any]) -> str:
    """sha256 of the key's canonical JSON (sorted keys), hex."""
    blob = json.dumps(key, sort_keys=True, default=str, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()


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


class FeatureCache:
    """``get_or_compute(name, key, compute)``: the cached array for ``key``, else ``compute()`` stored."""

    def __init__(self, root: str | Path, enabled: bool = True):
        self.root = Path(root)
        self.enabled = bool(enabled)
        self.hits = 0
        self.misses = 0
        self.rebuilt = 0

    def paths(self, name: str, key: dict[str, Any]) -> tuple[Path, Path]:
        stem = f"{_slug(name)}-{key_hash(key)[:16]}"
        return self.root / f"{stem}.npy", self.root / f"{stem}.json"

    # -- read -----------------------------------------------------------------------------------
    def _problem(self, npy: Path, manifest: Path, key: dict[str, Any]) -> tuple[str | None, np.ndarray | None]:
        """(why the entry is unusable, None) or (None, the array)."""
        try:
            meta = json.loads(manifest.read_text())
        except (OSError, ValueError) as err:
            return f"unreadable manifest ({type(err).__name__})", None
        if meta.get("version") != CACHE_VERSION:
            return f"cache version {meta.get('version')} != {CACHE_VERSION}", None
        if meta.get("key_hash") != key_hash(key) or meta.get("key") != json.loads(json.dumps(key, default=str)):
            differs = sorted(k for k in set(key) | set(meta.get("key") or {})
                             if json.dumps((meta.get("key") or {}).get(k), sort_keys=True, default=str)
                             != json.dumps(key.get(k), sort_keys=True, default=str))
            return f"it was written for another key (differs in: {', '.join(differs) or 'hash'})", None
        if not npy.is_file():
            return "the .npy file is missing", None
        size = npy.stat().st_size
        if size != meta.get("nbytes"):
            return f"the .npy file has {size} bytes, the manifest says {meta.get('nbytes')} (truncated?)", None
        if file_sha256(npy) != meta.get("sha256"):
            return "the .npy file's checksum does not match its manifest", None
        try:
            arr = np.load(npy, allow_pickle=False)
        except (OSError, ValueError, EOFError) as err:
            return f"the .npy file does not load ({type(err).__name__}: {err})", None
        if list(arr.shape) != list(meta.get("shape", [])) or str(arr.dtype) != meta.get("dtype"):
            return f"array {arr.shape}/{arr.dtype} != manifest {meta.get('shape')}/{meta.get('dtype')}", None
        return None, arr

    def load(self, name: str, key: dict[str, Any]) -> np.ndarray | None:
        """The cached array, or None (a miss). A damaged or mismatched entry warns and counts as a miss."""
        if not self.enabled:
            return None
        npy, manifest = self.paths(name, key)
        if not manifest.is_file():
            return None
        why, arr = self._problem(npy, manifest, key)
        if why is not None:
            self.rebuilt += 1
            warnings.warn(f"feature cache entry {manifest.name} for '{name}' is unusable: {why}; rebuilding it",
                          FeatureCacheWarning, stacklevel=2)
            log.warning("feature cache %s: %s; rebuilding", manifest, why)
            manifest.unlink(missing_ok=True)
            return None
        return arr

    # -- write ----------------------------------------------------------------------------------
    def save(self, name: str, key: dict[str, Any], array: np.ndarray) -> Path:
        npy, manifest = self.paths(name, key)
        array = np.ascontiguousarray(array)
        buf = io.BytesIO()
        np.save(buf, array, allow_pickle=False)
        data = buf.getvalue()
        manifest.unlink(missing_ok=True)  # the old manifest must not vouch for the new .npy mid-write
        atomic_write_bytes(npy, data)
        atomic_write_json(manifest, {
            "version": CACHE_VERSION,
            "name": name,
            "key": json.loads(json.dumps(key, default=str)),
            "key_hash": key_hash(key),
            "shape": list(array.shape),
            "dtype": str(array.dtype),
            "n": int(array.shape[0]) if array.ndim else 1,
            "nbytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        })
        return npy

    def get_or_compute(self, name: str, key: dict[str, Any], compute: Callable[[], np.ndarray]) -> tuple[np.ndarray, bool]:
        """(array, hit)."""
        arr = self.load(name, key)
        if arr is not None:
            self.hits += 1
            return arr, True
        self.misses += 1
        arr = compute()
        if self.enabled:
            self.save(name, key, arr)
        return arr, False
