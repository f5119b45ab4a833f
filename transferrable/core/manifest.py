"""The manifest helpers of before ``transferrable.core.artifact_cache``, kept with their signatures for their callers.

Everything here is a thin layer over :mod:`transferrable.core.artifact_cache`, which owns key hashing, the version,
atomic writes, manifests, validation and the ``CacheWarning``; new code uses ``ArtifactCache`` directly.

* small per-item arrays: one ``.npz`` whose ``__manifest__`` member holds the version, the key's hash and each
  array's shape, dtype and sha256 (``save_npz`` / ``load_npz``);
* whole generated directories: ``manifest.json`` lists every file with its size (``file_sizes`` /
  ``check_file_sizes`` / ``directory_problem``);
* single files: a sidecar ``<name>.manifest.json`` with the file's size and sha256 (``write_sidecar`` /
  ``check_sidecar`` / ``usable_weights_file``).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transferrable.core.artifact_cache import (
    ABSENT,
    MANIFEST_NAME,
    NO_MANIFEST,
    ArtifactCache,
    CacheWarning,
    adopt_state_dict_file,
    check_file_sizes,
    file_sha256,
    file_sizes,
    key_hash,
    load_npz,
    save_npz,
    sidecar,
    warn_rebuild,
)

__all__ = ["ABSENT", "MANIFEST_NAME", "MANIFEST_VERSION", "CacheWarning", "check_file_sizes", "check_sidecar",
           "directory_problem", "file_sha256", "file_sizes", "key_hash", "load_npz", "save_npz", "sidecar",
           "usable_weights_file", "warn_if_damaged", "warn_rebuild", "write_sidecar"]

MANIFEST_VERSION = 1


def _cache(path: str | Path, what: str = "cache entry") -> ArtifactCache:
    return ArtifactCache(Path(path).parent, version=MANIFEST_VERSION, what=what)


# -- generated directories ------------------------------------------------------------------------------
def directory_problem(root: str | Path, params: Any) -> str | None:
    """Why the generated directory ``root`` cannot be used (``ArtifactCache.dir_problem``); ``ABSENT`` without a
    manifest; None when it is complete."""
    return _cache(root).dir_problem(root, params)


def warn_if_damaged(root: str | Path, params: Any, what: str) -> None:
    """Before (re)building ``root``: a damaged one (not merely absent) is reported as such."""
    why = directory_problem(root, params)
    if why is not None and why != ABSENT:
        warn_rebuild(what, root, why)


# -- single files ---------------------------------------------------------------------------------------
def write_sidecar(path: str | Path, key: Any, **extra: Any) -> Path:
    """The manifest of a file already written (atomically) at ``path``; written after it, so it marks it complete."""
    _cache(path).write_manifest(path, key, **extra)
    return sidecar(path)


def check_sidecar(path: str | Path, key: Any) -> str | None:
    """Why ``path`` cannot be trusted (no/unreadable manifest, other key, other size or checksum), or None."""
    if not sidecar(path).is_file():
        return NO_MANIFEST
    why = _cache(path).check(path, key)
    return "the file is missing" if why == ABSENT else why


def usable_weights_file(path: str | Path, key: Any, what: str) -> bool:
    """Whether the cached weights ``path`` (a ``torch.save``d dict with a ``state_dict``) can be used as is.

    With a sidecar manifest: it must match (key, size, checksum). Without one (written before manifests) the
    file is adopted -- a manifest written for it -- when it loads, so a finished source representation is never
    retrained for want of a manifest. Anything else (truncated, damaged, another key) warns and returns False:
    the caller rebuilds it."""
    _, why = _cache(path, what).read(path, key, adopt=adopt_state_dict_file)
    return why is None
