"""One inter-process lock per cache entry, so that parallel jobs (a joblib sweep, SLURM array jobs on a shared file
system, DDP-free reruns) build each entry once: the first job builds, the others wait and then reuse it.

The lock is ``.<entry name>.lock`` beside the entry, an OS lock (``flock``) taken through ``filelock``: the kernel
drops it when its holder dies, so a killed or crashed builder never blocks the others; its half-built temporaries
are removed by the next build (``artifact_cache.remove_stale_temporaries``). A holder that is alive but stuck
is the one thing that can keep others waiting: they give up after ``paths.cache_lock_timeout_s`` seconds
(conf/paths/default.yaml) with a :class:`CacheLockTimeout` naming the entry and the override.

The holder unlinks the lock file before it unlocks it (nothing is left beside the entries); a waiter that then
gets the lock of the unlinked file sees it has no name any more and takes the new one (filelock >= 4 checks the
link count), so no two processes ever hold one entry's lock. Within a process the lock is re-entrant (one
``FileLock`` per path and thread), so ``get_or_build`` may hold it while its build writes through ``writer``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

from transferrable.core.errors import UserError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 6 * 3600.0  # the value of paths.cache_lock_timeout_s when no run set it (tests, scripts)
_timeout_s = DEFAULT_TIMEOUT_S
_locks: dict[str, object] = {}  # lock path -> its FileLock (one per path: re-entrant in a thread)
_depth: dict[tuple[str, int], int] = {}  # (lock path, thread id) -> how many times this thread holds it
_registry = threading.Lock()


class CacheLockTimeout(UserError, TimeoutError):
    """Another process held a cache entry's lock for longer than ``paths.cache_lock_timeout_s``."""


def set_lock_timeout(seconds: float) -> None:
    """How long a process waits for another one building the same entry (the runner sets it from the config)."""
    global _timeout_s
    _timeout_s = float(seconds)


def lock_timeout() -> float:
    return _timeout_s


def lock_path(entry: str | Path) -> Path:
    """``.<name>.lock`` beside the entry (a file or a directory)."""
    entry = Path(entry)
    return entry.with_name(f".{entry.name}.lock")


def _file_lock(path: Path):
    from filelock import FileLock  # imported here: most runs never contend for an entry

    with _registry:
        lock = _locks.get(str(path))
        if lock is None:
            lock = _locks[str(path)] = FileLock(path)
        return lock


@contextlib.contextmanager
def entry_lock(entry: str | Path, what: str = "cache entry", timeout: float | None = None) -> Iterator[bool]:
    """Hold the entry's lock for the block; yields whether this process had to wait for another one.

    Raises :class:`CacheLockTimeout` after ``timeout`` (default: ``paths.cache_lock_timeout_s``) seconds."""
    from filelock import Timeout

    path = lock_path(entry)
    path.parent.mkdir(parents=True, exist_ok=True)
    lock, me = _file_lock(path), (str(path), threading.get_ident())
    limit = _timeout_s if timeout is None else float(timeout)
    waited = False
    try:
        lock.acquire(timeout=0)
    except Timeout:
        waited = True
        log.info("%s %s: another process is building it; waiting for it (at most %g s)", what, entry, limit)
        t0 = time.monotonic()
        try:
            lock.acquire(timeout=limit)
        except Timeout:
            raise CacheLockTimeout(
                f"{what} {entry}: another process held its lock {path} for more than {limit:g} s (a dead process "
                "holds none, so one is still running or stuck): wait for it, stop it, or raise "
                "paths.cache_lock_timeout_s") from None
        log.info("%s %s: the other process finished after %.1f s", what, entry, time.monotonic() - t0)
    _depth[me] = _depth.get(me, 0) + 1
    try:
        yield waited
    finally:
        _depth[me] -= 1
        if _depth[me] == 0:
            del _depth[me]
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)  # while still locked: see the module docstring
        lock.release()
