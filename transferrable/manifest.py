"""Manifests that vouch for cache files: what was written (shape, dtype, sizes, checksums) and for which key.

Every cache in the suite is written atomically (``transferrable.atomic``) and carries a manifest; a reader checks
it and, when the file is truncated, damaged, of another version or written for another key, warns with a
``CacheWarning`` (``warn_rebuild``) and rebuilds the entry -- a damaged entry is never used silently.

* small per-item arrays (proposals, segments, video frames and flow): one ``.npz`` whose ``__manifest__`` member
  holds the version, the key's hash and each array's shape, dtype and sha256 (``save_npz`` / ``load_npz``);
* whole generated directories (scenes, videos, caption sets, video tuples): ``manifest.json`` lists every file
  with its size (``file_sizes`` / ``check_file_sizes``);
* single files (source weights, BiGAN encoders, generated JSON): a sidecar ``<name>.manifest.json`` with the file's size and
  sha256 (``write_sidecar`` / ``check_sidecar``).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from transferrable.atomic import atomic_write_bytes, atomic_write_json

log = logging.getLogger(__name__)

MANIFEST_VERSION = 1
MANIFEST_NAME = "manifest.json"
ABSENT = "absent"


class CacheWarning(UserWarning):
    """A cache entry was unusable (truncated, damaged, another key or version) and is being rebuilt."""


def key_hash(key: Any) -> str:
    """sha256 of the key's canonical JSON (sorted keys), hex."""
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str, separators=(",", ":")).encode()).hexdigest()


def warn_rebuild(what: str, path: str | Path, why: str) -> None:
    warnings.warn(f"{what} {path} is unusable: {why}; rebuilding it", CacheWarning, stacklevel=3)
    log.warning("%s %s unusable (%s): rebuilding", what, path, why)


# -- per-item arrays ------------------------------------------------------------------------------------
def _array_entry(a: np.ndarray) -> dict:
    a = np.require(a, requirements="C")  # (ascontiguousarray would make a 0-d array 1-d)
    return {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": hashlib.sha256(a.tobytes()).hexdigest()}


def save_npz(path: str | Path, arrays: dict[str, np.ndarray], key: Any) -> Path:
    arrays = {k: np.require(v, requirements="C") for k, v in arrays.items()}
    manifest = {"version": MANIFEST_VERSION, "key_hash": key_hash(key),
                "arrays": {k: _array_entry(v) for k, v in arrays.items()}}
    buf = io.BytesIO()
    np.savez(buf, __manifest__=np.array(json.dumps(manifest, sort_keys=True)), **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def load_npz(path: str | Path, key: Any, adopt: bool = True) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """(arrays, None), or (None, why the file is unusable). A whole file written before manifests existed (no
    ``__manifest__`` member) is adopted -- rewritten with one for ``key`` -- when ``adopt``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as err:  # noqa: BLE001 - a truncated zip raises anything from BadZipFile to EOFError
        return None, f"unreadable ({type(err).__name__})"
    if "__manifest__" not in arrays:
        if not adopt:
            return None, "it has no manifest"
        save_npz(path, arrays, key)
        log.info("%s: manifest written for a file cached before manifests", path)
        return arrays, None
    try:
        manifest = json.loads(str(arrays.pop("__manifest__")))
    except ValueError:
        return None, "unreadable manifest"
    if manifest.get("version") != MANIFEST_VERSION:
        return None, f"manifest version {manifest.get('version')} != {MANIFEST_VERSION}"
    if manifest.get("key_hash") != key_hash(key):
        return None, "it was written for another key"
    listed = manifest.get("arrays") or {}
    if set(listed) != set(arrays):
        return None, f"arrays {sorted(arrays)} != manifest {sorted(listed)}"
    for name, a in arrays.items():
        if _array_entry(a) != listed[name]:
            return None, f"array {name!r} does not match its manifest (shape, dtype or checksum)"
    return arrays, None


# -- generated directories ------------------------------------------------------------------------------
def file_sizes(root: str | Path, skip: tuple[str, ...] = (MANIFEST_NAME,)) -> dict[str, int]:
    """{relative path: bytes} of every file under ``root`` (the manifest itself left out)."""
    root = Path(root)
    return {p.relative_to(root).as_posix(): p.stat().st_size for p in sorted(root.rglob("*"))
            if p.is_file() and p.relative_to(root).as_posix() not in skip}


def check_file_sizes(root: str | Path, listed: dict[str, int] | None) -> str | None:
    """Why the files under ``root`` do not match the manifest's list (missing, truncated), or None. A manifest
    from before file lists (``listed`` None) is left to the generator's own completeness checks."""
    if listed is None:
        return None
    root = Path(root)
    for rel, size in listed.items():
        p = root / rel
        if not p.is_file():
            return f"{rel} is missing"
        if p.stat().st_size != size:
            return f"{rel} has {p.stat().st_size} bytes, the manifest says {size} (truncated?)"
    return None


def directory_problem(root: str | Path, params: Any) -> str | None:
    """Why the generated directory ``root`` cannot be used: its ``manifest.json`` does not parse, names other
    parameters, or a file it lists is missing or has another size; None when it is complete. An absent
    directory or manifest is ``ABSENT`` (nothing to warn about: it is simply built)."""
    try:
        m = json.loads((Path(root) / MANIFEST_NAME).read_text())
    except FileNotFoundError:
        return ABSENT
    except (OSError, ValueError) as err:
        return f"unreadable manifest ({type(err).__name__})"
    if not isinstance(m, dict):
        return "unreadable manifest"
    if m.get("params") != json.loads(json.dumps(params)):
        return "it was generated with other parameters"
    return check_file_sizes(root, m.get("files"))


def warn_if_damaged(root: str | Path, params: Any, what: str) -> None:
    """Before (re)building ``root``: a damaged one (not merely absent) is reported as such."""
    why = directory_problem(root, params)
    if why is not None and why != ABSENT:
        warn_rebuild(what, root, why)


# -- single files ---------------------------------------------------------------------------------------
def sidecar(path: str | Path) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".manifest.json")


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def write_sidecar(path: str | Path, key: Any, **extra: Any) -> Path:
    """The manifest of a file already written (atomically) at ``path``; written after it, so it marks it complete."""
    path = Path(path)
    return atomic_write_json(sidecar(path), {"version": MANIFEST_VERSION, "key_hash": key_hash(key),
                                             "bytes": path.stat().st_size, "sha256": file_sha256(path), **extra})


def check_sidecar(path: str | Path, key: Any) -> str | None:
    """Why ``path`` cannot be trusted (no/unreadable manifest, other key, other size or checksum), or None."""
    path = Path(path)
    try:
        m = json.loads(sidecar(path).read_text())
    except FileNotFoundError:
        return "it has no manifest"
    except (OSError, ValueError) as err:
        return f"unreadable manifest ({type(err).__name__})"
    if not isinstance(m, dict) or m.get("version") != MANIFEST_VERSION:
        return "manifest of another version"
    if m.get("key_hash") != key_hash(key):
        return "it was written for another key"
    if not path.is_file():
        return "the file is missing"
    if path.stat().st_size != m.get("bytes"):
        return f"it has {path.stat().st_size} bytes, the manifest says {m.get('bytes')} (truncated?)"
    if file_sha256(path) != m.get("sha256"):
        return "its checksum does not match the manifest"
    return None


def usable_weights_file(path: str | Path, key: Any, what: str) -> bool:
    """Whether the cached weights ``path`` (a ``torch.save``d dict with a ``state_dict``) can be used as is.

    With a sidecar manifest: it must match (key, size, checksum). Without one (written before manifests) the
    file is adopted -- a manifest written for it -- when it loads, so a finished source representation is never
    retrained for want of a manifest. Anything else (truncated, damaged, another key) warns and returns False:
    the caller rebuilds it."""
    path = Path(path)
    if not path.is_file():
        return False
    why = check_sidecar(path, key)
    if why == "it has no manifest":
        import torch

        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            why = None if isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict) else "no state_dict"
        except Exception as err:  # noqa: BLE001 - a truncated zip raises anything from RuntimeError to EOFError
            why = f"it does not load ({type(err).__name__}; truncated?)"
        if why is None:
            write_sidecar(path, key)
            log.info("%s %s: manifest written for a file cached before manifests", what, path)
    if why is not None:
        warn_rebuild(what, path, why)
        return False
    return True
