"""One artifact cache for the whole suite: key hashing, the version, atomic writes, manifests with content hashes,
validation on read, and a ``CacheWarning`` + rebuild when an entry is damaged.

Every on-disk cache of the suite (source weights, the BiGAN encoder, features, proposals, segments, decoded frames and
flow, generated data sets, and -- through the engine -- R-CNN's fine-tuned weights and pool5 rows) is an
:class:`ArtifactCache`. An entry is identified by a *key*: a JSON-able value naming everything the artefact depends
on. The cache owns:

* **key hashing** -- :func:`key_hash` (sha256 of the key's canonical JSON: sorted keys, compact separators) is what
  every manifest records; :meth:`ArtifactCache.path_for` names an entry ``<prefix><key_hash[:16]><suffix>`` unless a
  ``name`` is given. Caches that predate this module keep their file names (so existing caches stay valid); they build
  them with :func:`digest`, the recipe they always used (``json.dumps(..., sort_keys=True)`` hashed with sha256 or
  sha1, or a plain string hashed as is);
* **the version** -- ``ArtifactCache(..., version=N)`` records ``N`` in every manifest; an entry of another version is
  unusable (it warns and is rebuilt), so bumping the version invalidates every entry of the cache;
* **atomic writes** -- a file is written to a hidden temporary (``.<name>.<pid>-<random>.tmp``) and ``os.replace``-d
  into place, a directory is built in a hidden sibling and renamed (``transferrable.core.atomic.publish_dir``), the
  manifest is removed before and written after the artefact, so its presence vouches for a complete entry; a build
  that raises or is killed leaves no entry under the final name (the temporaries of dead processes are removed by the
  next build of the same entry);
* **an inter-process lock per entry** (``transferrable.core.cache_lock``: ``.<name>.lock`` beside it) -- ``get_or_build``,
  ``ensure`` and the writers build under it, so parallel jobs build an entry once: the first builds, the others wait
  and then reuse it; a killed holder releases it (an OS lock), a stuck one makes the others stop after
  ``paths.cache_lock_timeout_s`` with one line;
* **manifests** -- a file's sidecar (``<name>.manifest.json`` by default, ``manifest_name="{stem}.json"`` for the
  caches that always named it so): ``version``, ``key_hash``, ``bytes``, ``sha256`` (unless ``checksum=False``, for
  multi-GB arrays that are memory-mapped), the ``key`` itself with ``record_key=True`` (then a mismatch names the
  key fields that differ), and any extra fields (shape, dtype, ...); a directory's ``manifest.json`` inside it:
  ``version``, ``params`` (the key), ``files`` (every file's size) and extra fields; a ``.npz`` of arrays carries its
  manifest inside (``__manifest__``: version, key hash, each array's shape, dtype and sha256);
* **validation on read** -- manifest parses, same version, same key, same size (a truncated file), same checksum,
  then the caller's ``load`` (which may raise :class:`Unusable`) or a directory's ``validate``; an unusable entry is
  reported once with a :class:`CacheWarning` (``<what> <path> is unusable: <why>; rebuilding it``) and rebuilt -- a
  damaged entry is never used silently. An absent entry, or a file without a manifest (a build killed between the
  file and its manifest) is a plain miss; ``adopt`` may instead vouch for a file cached before manifests existed.

Examples, one per kind of artefact::

    from transferrable.core.artifact_cache import ArtifactCache, adopt_state_dict_file, digest

    # 1. a single file (torch weights, an .npy, a JSON): build(tmp) writes exactly the path it is given
    cache = ArtifactCache(cache_dir, "encoders", version=1, what="encoder")
    state = cache.get_or_build(
        key, lambda tmp: torch.save({"state_dict": model.state_dict()}, tmp),
        suffix=".pt",                                               # -> <cache_dir>/encoders/<key_hash16>.pt
        load=lambda path, manifest: torch.load(path, weights_only=True),
        adopt=adopt_state_dict_file)                                # use (and vouch for) a file from before manifests

    # ... or step by step with the writer context, which commits atomically when the block ends without an
    # exception -- e.g. R-CNN's fine-tuned network, under the name it always had (sidecar <name>.manifest.json)
    cache = ArtifactCache(finetune_cache_dir, what="fine-tuned R-CNN network")
    path = cache.path_for(key, name=f"{digest(key, 16)}.pt")
    saved, why = cache.read(path, key, lambda p, m: torch.load(p, map_location="cpu", weights_only=True))
    if saved is None:                                               # absent, killed before its manifest, or damaged
        fine_tune()                                                 # (only damage warns: a CacheWarning)
        with cache.writer(path, key) as w:
            torch.save({"state_dict": model.state_dict(), "info_json": info}, w.path)
            w.manifest["note"] = "optional extra manifest fields"

    # 2. small named arrays in one .npz that carries its own manifest (proposals, segments)
    boxes = ArtifactCache(cache_dir, "proposals").get_or_build(
        key, lambda: {"boxes": compute(), "image_size": np.array([w, h])}, kind="arrays", suffix=".npz")

    # 3. a directory (a generated data set in VOC / COCO / UCF101 layout): write(tmp) fills a hidden sibling and may
    #    return extra manifest fields; validate(path) adds layout checks; the directory appears whole, or not at all
    cache = ArtifactCache(out_dir, version=GENERATOR_VERSION, what="generated scenes")
    root = cache.get_or_build(params, lambda tmp: write_voc(tmp, params), kind="dir", name="VOCScenes",
                              validate=lambda root: None if (root / "ImageSets").is_dir() else "no ImageSets")

    # 4. a memmap written in chunks that resumes after a kill (R-CNN pool5): rows go to ``.<stem>.partial`` and a
    #    progress file ``.<stem>.progress.json``; the block's end renames it into place and writes the manifest.
    #    These are R-CNN's names and manifest fields (pool5-<split>-<hash16>.dat + .json: version, key, key_hash,
    #    shape, dtype, bytes), so its existing entries and partial files stay valid
    cache = ArtifactCache(cache_dir, version=CACHE_VERSION, what="pool5 cache", checksum=False, record_key=True,
                          manifest_name="{stem}.json")
    path = cache.path_for(key, prefix=f"pool5-{split}-", suffix=".dat")
    rows = cache.open_memmap(path, key, shape, dtype)                # read-only memmap, or None (warned if damaged)
    if rows is None:
        with cache.memmap_writer(path, key, shape, dtype) as w:      # w.start: images already on disk
            for i in range(w.start, n):
                w.array[rows_of(i)] = extract(i)
                if (i + 1) % every == 0 and i + 1 < n:
                    w.checkpoint(i + 1)                             # flushed, then the progress file says so
        rows = w.result

``transferrable.core.manifest`` keeps the helpers of before (``write_sidecar``, ``check_sidecar``, ``usable_weights_file``,
``save_npz``, ``load_npz``, ``directory_problem``, ...) as thin layers over this module, and
``transferrable.core.feature_cache.FeatureCache`` is an ``ArtifactCache`` with the feature cache's names and manifest.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from transferrable.core.atomic import atomic_write_bytes, atomic_write_json, publish_dir
from transferrable.core.cache_lock import entry_lock

log = logging.getLogger(__name__)

ABSENT = "absent"  # nothing there: a plain miss, nothing to warn about
NO_MANIFEST = "it has no manifest"  # the artefact without its manifest: a build killed before the manifest
MANIFEST_NAME = "manifest.json"  # a directory entry's manifest, inside it
SIDECAR = "{name}.manifest.json"  # a file entry's manifest, beside it (``{name}``: the file's name, ``{stem}``)
LEGACY_VERSION = 1  # the version of a generated directory whose manifest predates version fields


class CacheWarning(UserWarning):
    """A cache entry was unusable (truncated, damaged, another key or version) and is being rebuilt."""


class Unusable(Exception):
    """Raised by a ``load`` / ``adopt`` hook: the entry cannot be used, for the reason given."""


# -- key hashing ----------------------------------------------------------------------------------------
def canonical_json(key: Any) -> str:
    """The key's canonical JSON: sorted keys, compact separators, anything not JSON-able as ``str``."""
    return json.dumps(key, sort_keys=True, default=str, separators=(",", ":"))


def key_hash(key: Any) -> str:
    """sha256 of the key's canonical JSON, hex: what every manifest records."""
    return hashlib.sha256(canonical_json(key).encode()).hexdigest()


def jsonable(key: Any) -> Any:
    """The key as a manifest records it (tuples as lists, anything not JSON-able as ``str``)."""
    return json.loads(json.dumps(key, default=str))


def digest(obj: Any, length: int | None = None, algo: str = "sha256") -> str:
    """A hex digest for an entry's *name*, by the recipe the suite's caches named their entries with before this
    module: a ``str`` hashed as its UTF-8 bytes, anything else as ``json.dumps(obj, sort_keys=True, default=str)``
    (default separators); ``algo`` a ``hashlib`` name (``sha256``, ``sha1``); the first ``length`` characters."""
    text = obj if isinstance(obj, str) else json.dumps(obj, sort_keys=True, default=str)
    return hashlib.new(algo, text.encode()).hexdigest()[:length]


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sidecar(path: str | Path) -> Path:
    """``<file>.manifest.json``: the default manifest of a file entry."""
    path = Path(path)
    return path.with_name(path.name + ".manifest.json")


def warn_rebuild(what: str, path: str | Path, why: str, category: type[Warning] = CacheWarning,
                 stacklevel: int = 3) -> None:
    warnings.warn(f"{what} {path} is unusable: {why}; rebuilding it", category, stacklevel=stacklevel)
    log.warning("%s %s unusable (%s): rebuilding", what, path, why)


def _reason(err: BaseException) -> str:
    return str(err) if isinstance(err, Unusable) else f"it does not load ({type(err).__name__}; truncated?)"


def _key_differs(recorded: Any, key: Any) -> str:
    if isinstance(recorded, dict) and isinstance(key, dict):
        fields = sorted(k for k in set(recorded) | set(key)
                        if json.dumps(recorded.get(k), sort_keys=True, default=str)
                        != json.dumps(key.get(k), sort_keys=True, default=str))
        return f"it was written for another key (differs in: {', '.join(fields) or 'hash'})"
    return "it was written for another key"


def _remove_orphans(parent: Path, prefix: str) -> None:
    """Temporaries ``<prefix><pid>-...`` whose process is gone (a build that was killed)."""
    if not parent.is_dir():
        return
    for p in parent.iterdir():
        if not p.name.startswith(prefix):
            continue
        try:
            os.kill(int(p.name[len(prefix):].split("-")[0]), 0)
        except ProcessLookupError:
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p, ignore_errors=True)
            else:
                p.unlink(missing_ok=True)
        except (ValueError, OSError):  # not our naming, or a live process of another user: leave it
            pass


def remove_stale_temporaries(path: str | Path) -> None:
    """The hidden temporaries of builds of ``path`` (a file or a directory entry) whose process died."""
    path = Path(path)
    for prefix in (f".{path.name}.", f".{path.name}.tmp-", f".{path.name}.old-"):
        _remove_orphans(path.parent, prefix)


# -- generated directories: file lists --------------------------------------------------------------------
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


# -- arrays in one .npz with the manifest inside -----------------------------------------------------------
def _array_entry(a: np.ndarray) -> dict:
    a = np.require(a, requirements="C")  # (ascontiguousarray would make a 0-d array 1-d)
    return {"shape": list(a.shape), "dtype": str(a.dtype), "sha256": hashlib.sha256(a.tobytes()).hexdigest()}


def save_npz(path: str | Path, arrays: dict[str, np.ndarray], key: Any, version: int = 1) -> Path:
    """Write ``arrays`` atomically as one ``.npz`` whose ``__manifest__`` member vouches for them."""
    arrays = {k: np.require(v, requirements="C") for k, v in arrays.items()}
    manifest = {"version": int(version), "key_hash": key_hash(key),
                "arrays": {k: _array_entry(v) for k, v in arrays.items()}}
    buf = io.BytesIO()
    np.savez(buf, __manifest__=np.array(json.dumps(manifest, sort_keys=True)), **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def load_npz(path: str | Path, key: Any, adopt: bool = True, version: int = 1
             ) -> tuple[dict[str, np.ndarray] | None, str | None]:
    """(arrays, None), or (None, why the file is unusable). A whole file written before manifests existed (no
    ``__manifest__`` member) is adopted -- rewritten with one for ``key`` -- when ``adopt``."""
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except Exception as err:  # noqa: BLE001 - a truncated zip raises anything from BadZipFile to EOFError
        return None, f"unreadable ({type(err).__name__})"
    if "__manifest__" not in arrays:
        if not adopt:
            return None, NO_MANIFEST
        save_npz(path, arrays, key, version)
        log.info("%s: manifest written for a file cached before manifests", path)
        return arrays, None
    try:
        manifest = json.loads(str(arrays.pop("__manifest__")))
    except ValueError:
        return None, "unreadable manifest"
    if not isinstance(manifest, dict):
        return None, "unreadable manifest"
    if manifest.get("version") != version:
        return None, f"manifest version {manifest.get('version')} != {version}"
    if manifest.get("key_hash") != key_hash(key):
        return None, "it was written for another key"
    listed = manifest.get("arrays") or {}
    if set(listed) != set(arrays):
        return None, f"arrays {sorted(arrays)} != manifest {sorted(listed)}"
    for name, a in arrays.items():
        if _array_entry(a) != listed[name]:
            return None, f"array {name!r} does not match its manifest (shape, dtype or checksum)"
    return arrays, None


# -- hooks ------------------------------------------------------------------------------------------------
def adopt_state_dict_file(path: Path) -> dict:
    """``adopt`` hook for a ``torch.save``d dict with a ``state_dict`` cached before manifests: vouched for when it
    loads whole (so a finished source representation is never retrained for want of a manifest)."""
    import torch  # imported here for start-up speed: most caches never need torch

    blob = torch.load(path, map_location="cpu", weights_only=True)
    if not (isinstance(blob, dict) and isinstance(blob.get("state_dict"), dict)):
        raise Unusable("no state_dict")
    return {}


# -- writers ----------------------------------------------------------------------------------------------
class FileWriter:
    """What ``ArtifactCache.writer`` yields: write the artefact to exactly ``path`` (a hidden temporary next to the
    entry; ``np.save`` appends ``.npy`` to a path without it, so hand it an open file); ``manifest`` takes extra
    manifest fields. ``result`` is the committed manifest once the block has ended."""

    def __init__(self, path: Path):
        self.path = path
        self.manifest: dict[str, Any] = {}
        self.result: dict | None = None


class MemmapWriter:
    """What ``ArtifactCache.memmap_writer`` yields: ``array`` (a writable memmap of the partial file), ``start`` (the
    units a killed earlier build left on disk, to resume from), ``checkpoint(done)``, and, after the block, ``result``
    (the committed entry as a read-only memmap)."""

    def __init__(self, cache: ArtifactCache, path: Path, key: Any, shape: tuple[int, ...], dtype: np.dtype):
        self.cache, self.path, self.key = cache, path, key
        self.shape, self.dtype = tuple(int(s) for s in shape), np.dtype(dtype)
        self.partial = path.with_name(f".{path.stem}.partial")
        self.progress = path.with_name(f".{path.stem}.progress.json")
        self.key_hash = key_hash(key)
        expected = int(np.prod(self.shape)) * self.dtype.itemsize
        self.start = 0
        try:
            done = json.loads(self.progress.read_text())
            if done.get("key_hash") == self.key_hash and self.partial.stat().st_size == expected:
                self.start = int(done["done"] if "done" in done else done["images"])  # "images": pool5's name
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            self.start = 0
        path.parent.mkdir(parents=True, exist_ok=True)
        self.array = np.memmap(self.partial, dtype=self.dtype, mode="r+" if self.start else "w+", shape=self.shape)
        self.result: np.memmap | None = None

    def checkpoint(self, done: int) -> None:
        """The first ``done`` units are written: flushed to the file before the progress file says so."""
        self.array.flush()
        atomic_write_json(self.progress, {"key_hash": self.key_hash, "done": int(done)})

    def _commit(self, extra: dict) -> None:
        self.array.flush()
        del self.array
        self.cache.manifest_path(self.path).unlink(missing_ok=True)
        self.partial.replace(self.path)
        self.progress.unlink(missing_ok=True)
        self.cache.write_manifest(self.path, self.key, shape=list(self.shape), dtype=self.dtype.name, **extra)
        self.result = np.memmap(self.path, dtype=self.dtype, mode="r", shape=self.shape)


# -- the cache --------------------------------------------------------------------------------------------
class ArtifactCache:
    """Entries under ``root/namespace`` (or ``root``), each vouched for by a manifest (see the module docstring).

    ``version``: recorded in every manifest; another version is unusable. ``what``: how warnings name an entry.
    ``checksum``: record and verify each file's sha256 (off for memory-mapped arrays of many GB: size only).
    ``record_key``: the manifest holds the key itself. ``manifest_name``: a file entry's manifest, a format of
    ``{name}`` / ``{stem}``. ``warning``: the ``CacheWarning`` subclass to warn with. ``stats`` counts ``hits``,
    ``misses``, ``rebuilt`` (damaged entries) and ``adopted``."""

    def __init__(self, root: str | Path, namespace: str | None = None, version: int = 1, *,
                 what: str = "cache entry", checksum: bool = True, record_key: bool = False,
                 manifest_name: str = SIDECAR, warning: type[CacheWarning] = CacheWarning):
        self.root = Path(root)
        self.dir = self.root / namespace if namespace else self.root
        self.version = int(version)
        self.what, self.checksum, self.record_key = what, bool(checksum), bool(record_key)
        self.manifest_name, self.warning = manifest_name, warning
        self.stats: Counter = Counter()

    # -- names ------------------------------------------------------------------------------------------
    def path_for(self, key: Any, *, name: str | None = None, prefix: str = "", suffix: str = "") -> Path:
        """The entry's path: ``name`` when given, else ``<prefix><key_hash[:16]><suffix>``."""
        return self.dir / (name if name is not None else f"{prefix}{key_hash(key)[:16]}{suffix}")

    def manifest_path(self, path: str | Path) -> Path:
        path = Path(path)
        return path.with_name(self.manifest_name.format(name=path.name, stem=path.stem))

    def warn(self, path: str | Path, why: str) -> None:
        """Report an unusable entry (it is about to be rebuilt)."""
        self.stats["rebuilt"] += 1
        warn_rebuild(self.what, path, why, self.warning, stacklevel=4)

    def lock(self, path: str | Path, timeout: float | None = None):
        """The entry's inter-process lock (re-entrant in a thread): ``with cache.lock(path) as waited: ...``."""
        return entry_lock(path, self.what, timeout)

    def ensure(self, path: str | Path, key: Any, build: Callable[[], Any], *,
               load: Callable[[Path, dict], Any] | None = None,
               adopt: Callable[[Path], dict | None] | None = None) -> tuple[Any, bool]:
        """``(value, built)``: the entry as :meth:`read` gives it, else -- under the entry's lock, after reading it
        again (another process may have built it meanwhile) -- ``build()``, which writes it (e.g. through
        :meth:`writer`), and the entry read back. For entries built by a whole run (the source representation)."""
        value, why = self.read(path, key, load, adopt=adopt)
        if why is None:
            self.stats["hits"] += 1
            return value, False
        with self.lock(path):
            value, why = self.read(path, key, load, adopt=adopt, warn=False)  # (the first read warned)
            if why is None:
                self.stats["hits"] += 1
                return value, False
            self.stats["misses"] += 1
            build()
        value, why = self.read(path, key, load)
        if why is not None:
            raise RuntimeError(f"{self.what} {path}: unusable right after it was built ({why})")
        return value, True

    # -- single files -----------------------------------------------------------------------------------
    def _manifest_problem(self, m: Any, key: Any, expect: dict | None) -> str | None:
        if not isinstance(m, dict):
            return "unreadable manifest"
        if m.get("version") != self.version:
            return f"manifest version {m.get('version')} != {self.version}"
        if "key_hash" not in m and "key" not in m:
            return "its manifest names no key"
        if ("key_hash" in m and m["key_hash"] != key_hash(key)) or ("key" in m and m["key"] != jsonable(key)):
            return _key_differs(m.get("key"), jsonable(key))
        bad = [f"{k} {m.get(k)} != {v}" for k, v in (expect or {}).items() if m.get(k) != jsonable(v)]
        return "; ".join(bad) or None

    def _inspect(self, path: Path, key: Any, expect: dict | None = None) -> tuple[str | None, dict | None]:
        if not path.is_file():
            return ABSENT, None
        try:
            m = json.loads(self.manifest_path(path).read_text())
        except FileNotFoundError:
            return NO_MANIFEST, None
        except (OSError, ValueError) as err:
            return f"unreadable manifest ({type(err).__name__})", None
        why = self._manifest_problem(m, key, expect)
        if why is not None:
            return why, None
        size, listed = path.stat().st_size, m.get("bytes", m.get("nbytes"))  # "nbytes": the feature cache's name
        if size != listed:
            return f"it has {size} bytes, the manifest says {listed} (truncated?)", None
        if self.checksum:
            if "sha256" not in m:
                return "its manifest records no checksum", None
            if file_sha256(path) != m["sha256"]:
                return "its checksum does not match the manifest", None
        return None, m

    def check(self, path: str | Path, key: Any, expect: dict | None = None) -> str | None:
        """Why the file entry at ``path`` cannot be used for ``key``: ``ABSENT`` (no file), ``NO_MANIFEST`` (a file
        without its manifest), another version or key, a size or checksum that differs, a manifest field that is
        not as ``expect``-ed; None when its manifest vouches for it. Warns about nothing."""
        return self._inspect(Path(path), key, expect)[0]

    def read(self, path: str | Path, key: Any, load: Callable[[Path, dict], Any] | None = None, *,
             adopt: Callable[[Path], dict | None] | None = None, expect: dict | None = None,
             warn: bool = True) -> tuple[Any, str | None]:
        """``(load(path, manifest), None)`` -- ``(path, None)`` without ``load`` -- when the entry is usable, else
        ``(None, why)``. ``load`` may raise (``Unusable`` or a loader's error): the entry is then unusable. A file
        without a manifest is a silent miss unless ``adopt(path)`` vouches for it (returns extra manifest fields,
        or raises). A damaged entry warns (``warn``) and counts as ``rebuilt``; the caller rebuilds it."""
        path = Path(path)
        why, m = self._inspect(path, key, expect)
        if why == NO_MANIFEST and adopt is not None:
            try:
                extra = adopt(path) or {}
            except Exception as err:  # noqa: BLE001 - a truncated file raises anything from RuntimeError to EOFError
                why = _reason(err)
            else:
                m, why = self.write_manifest(path, key, **extra), None
                self.stats["adopted"] += 1
                log.info("%s %s: manifest written for a file cached before manifests", self.what, path)
        value = path
        if why is None and load is not None:
            try:
                value = load(path, m)
            except Exception as err:  # noqa: BLE001 - see above
                why = _reason(err)
        if why is None:
            return value, None
        if warn and why not in (ABSENT, NO_MANIFEST):
            self.warn(path, why)
        return None, why

    def write_manifest(self, path: str | Path, key: Any, **extra: Any) -> dict:
        """The manifest of a file already written (atomically) at ``path``; written after it, so it marks it
        complete. Returns the manifest."""
        path = Path(path)
        m = {"version": self.version, "key_hash": key_hash(key), "bytes": path.stat().st_size}
        if self.checksum:
            m["sha256"] = file_sha256(path)
        if self.record_key:
            m["key"] = jsonable(key)
        m.update(extra)
        atomic_write_json(self.manifest_path(path), m)
        return m

    @contextlib.contextmanager
    def writer(self, path: str | Path, key: Any, **extra: Any) -> Iterator[FileWriter]:
        """Write a file entry: the block writes ``w.path`` (a hidden temporary); when it ends without an exception
        the old manifest is removed, the file is fsynced and renamed into place, and the new manifest written.
        An exception (or a kill) leaves no entry under the final name."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.lock(path):  # one writer of an entry at a time, across processes
            remove_stale_temporaries(path)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.{os.getpid()}-", suffix=".tmp")
            os.close(fd)
            w = FileWriter(Path(tmp))
            try:
                yield w
                with open(w.path, "rb+") as f:
                    os.fsync(f.fileno())
                self.manifest_path(path).unlink(missing_ok=True)  # the old manifest must not vouch for the new file
                os.replace(w.path, path)
            except BaseException:
                w.path.unlink(missing_ok=True)
                raise
            w.result = self.write_manifest(path, key, **{**extra, **w.manifest})

    def write_bytes(self, path: str | Path, key: Any, data: bytes, **extra: Any) -> Path:
        with self.writer(path, key, **extra) as w:
            w.path.write_bytes(data)
        return Path(path)

    def build_file(self, path: str | Path, key: Any, build: Callable[[Path], dict | None], **extra: Any) -> dict:
        """``build(tmp)`` writes the file (and may return extra manifest fields); committed atomically. Returns
        the manifest."""
        with self.writer(path, key, **extra) as w:
            w.manifest.update(build(w.path) or {})
        return w.result

    # -- memmaps written in chunks ----------------------------------------------------------------------
    def open_memmap(self, path: str | Path, key: Any, shape: tuple[int, ...], dtype: Any) -> np.memmap | None:
        """The committed rows as a read-only memmap, or None (absent, or damaged: warned)."""
        dtype, shape = np.dtype(dtype), tuple(int(s) for s in shape)
        rows, _ = self.read(path, key, lambda p, m: np.memmap(p, dtype=dtype, mode="r", shape=shape),
                            expect={"shape": list(shape), "dtype": dtype.name})
        return rows

    @contextlib.contextmanager
    def memmap_writer(self, path: str | Path, key: Any, shape: tuple[int, ...], dtype: Any,
                      **extra: Any) -> Iterator[MemmapWriter]:
        """Write a memmap entry in chunks (see :class:`MemmapWriter`). On an exception the partial file and its
        progress stay, so the next writer of the same key resumes at ``start``; on success the partial file is
        renamed into place and the manifest (with ``shape`` and ``dtype``) written."""
        path = Path(path)
        with self.lock(path):  # two writers of one partial file would interleave their rows
            w = MemmapWriter(self, path, key, shape, dtype)
            try:
                yield w
            except BaseException:
                w.array.flush()  # what is written stays for the next writer (the progress file says how much)
                raise
            w._commit(extra)

    # -- arrays in one .npz ------------------------------------------------------------------------------
    def read_arrays(self, path: str | Path, key: Any, *, adopt: bool = True,
                    warn: bool = True) -> tuple[dict[str, np.ndarray] | None, str | None]:
        """(arrays, None) or (None, why): ``ABSENT`` without a file; a damaged one warns (``warn``)."""
        path = Path(path)
        if not path.is_file():
            return None, ABSENT
        arrays, why = load_npz(path, key, adopt=adopt, version=self.version)
        if why is not None and warn and why != NO_MANIFEST:
            self.warn(path, why)
        return arrays, why

    def write_arrays(self, path: str | Path, key: Any, arrays: dict[str, np.ndarray]) -> Path:
        return save_npz(path, arrays, key, self.version)

    # -- directories -------------------------------------------------------------------------------------
    def dir_problem(self, path: str | Path, key: Any, validate: Callable[[Path], str | None] | None = None
                    ) -> str | None:
        """Why the directory entry ``path`` cannot be used: its ``manifest.json`` does not parse, is of another
        version, names other parameters, a file it lists is missing or of another size, or ``validate(path)``
        says why; ``ABSENT`` without a manifest (nothing to warn about: it is simply built); None when complete."""
        path = Path(path)
        try:
            m = json.loads((path / MANIFEST_NAME).read_text())
        except FileNotFoundError:
            return ABSENT
        except (OSError, ValueError) as err:
            return f"unreadable manifest ({type(err).__name__})"
        if not isinstance(m, dict):
            return "unreadable manifest"
        if m.get("version", LEGACY_VERSION) != self.version:
            return f"manifest version {m.get('version', LEGACY_VERSION)} != {self.version}"
        if m.get("params") != jsonable(key):
            return "it was generated with other parameters"
        why = check_file_sizes(path, m.get("files"))
        if why is None and validate is not None:
            try:
                why = validate(path)
            except OSError as err:
                why = f"unreadable ({type(err).__name__})"
        return why

    def build_dir(self, path: str | Path, key: Any, write: Callable[[Path], dict | None], *,
                  validate: Callable[[Path], str | None] | None = None) -> Path:
        """Build the directory with ``write(tmp)`` in a hidden sibling (it may return extra manifest fields), write
        its ``manifest.json`` (version, params = the key, every file's size) last, and rename it into place. A
        process that loses a race to build the same entry uses the winner's; temporaries of dead builders go."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(path)

        def run(tmp: Path) -> None:
            tmp.mkdir(parents=True, exist_ok=True)
            extra = write(tmp) or {}
            atomic_write_json(tmp / MANIFEST_NAME, {**extra, "version": self.version, "params": jsonable(key),
                                                    "files": file_sizes(tmp)})

        with self.lock(path):
            return publish_dir(path, run, lambda: self.dir_problem(path, key, validate) is None)

    def _dir_entry(self, path: Path, key: Any, load: Callable[[Path, dict], Any] | None,
                   validate: Callable[[Path], str | None] | None) -> tuple[Any, str | None]:
        why = self.dir_problem(path, key, validate)
        if why is None:
            try:
                value = path if load is None else load(path, json.loads((path / MANIFEST_NAME).read_text()))
                self.stats["hits"] += 1
                log.info("%s: reusing %s", self.what, path)
                return value, None
            except Exception as err:  # noqa: BLE001 - a damaged file under an old manifest without a file list
                why = _reason(err)
                (path / MANIFEST_NAME).unlink(missing_ok=True)  # it must not vouch for the entry any more
        return None, why

    def _get_dir(self, path: Path, key: Any, build: Callable[[Path], dict | None],
                 load: Callable[[Path, dict], Any] | None, validate: Callable[[Path], str | None] | None) -> Any:
        value, why = self._dir_entry(path, key, load, validate)
        if why is None:
            return value
        with self.lock(path):  # another process may have built it while this one waited: look again
            value, again = self._dir_entry(path, key, load, validate)
            if again is None:
                return value
            if why != ABSENT:
                self.warn(path, why)
            self.stats["misses"] += 1
            log.info("%s: building %s", self.what, path)
            self.build_dir(path, key, build, validate=validate)
        return path if load is None else load(path, json.loads((path / MANIFEST_NAME).read_text()))

    # -- one call ------------------------------------------------------------------------------------------
    def get_or_build(self, key: Any, build: Callable, *, kind: str = "file", name: str | None = None,
                     prefix: str = "", suffix: str = "", load: Callable[[Path, dict], Any] | None = None,
                     adopt: Callable[[Path], dict | None] | None = None,
                     validate: Callable[[Path], str | None] | None = None) -> Any:
        """The entry for ``key`` (at ``path_for(key, name=, prefix=, suffix=)``), built when absent or unusable.

        ``kind="file"``: ``build(tmp)`` writes the file (may return extra manifest fields); returns
        ``load(path, manifest)``, or the path. ``kind="dir"``: ``build(tmp_dir)`` fills the directory (may return
        extra manifest fields), ``validate(path)`` checks the layout; returns ``load(path, manifest)`` or the path.
        ``kind="arrays"``: ``build()`` returns ``{name: array}``, stored as one ``.npz``; returns the arrays."""
        path = self.path_for(key, name=name, prefix=prefix, suffix=suffix)
        if kind == "dir":
            return self._get_dir(path, key, build, load, validate)
        if kind == "arrays":
            arrays, _ = self.read_arrays(path, key)
            if arrays is not None:
                self.stats["hits"] += 1
                return arrays
            with self.lock(path):  # built once across processes: the others wait, then read it
                arrays, _ = self.read_arrays(path, key, warn=False)
                if arrays is not None:
                    self.stats["hits"] += 1
                    return arrays
                self.stats["misses"] += 1
                arrays = build()
                self.write_arrays(path, key, arrays)
            return arrays
        if kind != "file":
            raise ValueError(f"ArtifactCache.get_or_build(kind={kind!r}): expected file, dir or arrays")
        value, why = self.read(path, key, load, adopt=adopt)
        if why is None:
            self.stats["hits"] += 1
            return value
        with self.lock(path):  # built once across processes: the others wait, then read it
            value, why = self.read(path, key, load, adopt=adopt, warn=False)  # (the first read warned)
            if why is None:
                self.stats["hits"] += 1
                return value
            self.stats["misses"] += 1
            m = self.build_file(path, key, build)
        return path if load is None else load(path, m)

