"""Parallel jobs share caches safely (issue 28): the first process builds an entry under its lock, the others wait
and reuse it; a killed holder never blocks the others; a stuck one makes them stop with one line."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from zygote import popen_script

from transferrable.core.artifact_cache import ArtifactCache
from transferrable.core.cache_lock import CacheLockTimeout, entry_lock, lock_path

ROOT = Path(__file__).resolve().parents[1]

# One job: arrive, then get_or_build the shared entry; the build (random bytes, so two builds never agree) waits
# until every job has arrived, so they all ask for the entry while it is being built. Prints the sha256 of what
# the job got back.
_JOB = """
import hashlib, json, logging, os, sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
import numpy as np
from transferrable.core.artifact_cache import ArtifactCache

logging.basicConfig(level=logging.INFO, stream=sys.stderr)
shared, kind, jobs, hold = Path({shared!r}), {kind!r}, {jobs}, {hold}
(shared / f"arrived-{{os.getpid()}}").touch()

def wait_for_everyone():
    with open(shared / "builds.log", "a") as f:
        f.write(f"{{os.getpid()}}\\n")
    t0 = time.monotonic()
    while len(list(shared.glob("arrived-*"))) < jobs and time.monotonic() - t0 < 30:
        time.sleep(0.05)
    time.sleep(hold)

def build_file(tmp):
    wait_for_everyone()
    tmp.write_bytes(os.urandom(1 << 16))

def build_dir(tmp):
    wait_for_everyone()
    (tmp / "a.bin").write_bytes(os.urandom(1 << 12))
    (tmp / "sub").mkdir()
    (tmp / "sub" / "b.bin").write_bytes(os.urandom(1 << 12))

def build_arrays():
    wait_for_everyone()
    return {{"x": np.random.default_rng().normal(size=(64, 8))}}

cache = ArtifactCache(shared / "cache", "ns", what="test entry")
build = {{"file": build_file, "dir": build_dir, "arrays": build_arrays}}[kind]
got = cache.get_or_build({{"k": 1}}, build, kind=kind, name=None if kind == "arrays" else "entry",
                         suffix=".npz" if kind == "arrays" else "")
if kind == "file":
    digest = hashlib.sha256(got.read_bytes()).hexdigest()
elif kind == "dir":
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(got.rglob("*.bin")))).hexdigest()
else:
    digest = hashlib.sha256(got["x"].tobytes()).hexdigest()
print(json.dumps({{"digest": digest, "stats": dict(cache.stats)}}))
"""


def _start(shared: Path, kind: str, jobs: int, hold: float = 0.3) -> subprocess.Popen:
    code = _JOB.format(root=str(ROOT), shared=str(shared), kind=kind, jobs=jobs, hold=hold)
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("kind", ["file", "dir", "arrays"])
def test_three_processes_build_an_entry_once_and_share_its_bytes(kind, tmp_path):
    procs = [_start(tmp_path, kind, jobs=3) for _ in range(3)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], [err[-2000:] for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    builders = (tmp_path / "builds.log").read_text().split()
    assert len(builders) == 1  # exactly one build
    assert len({r["digest"] for r in results}) == 1  # random bytes: every process got the builder's
    assert sorted(r["stats"].get("misses", 0) for r in results) == [0, 0, 1]
    waited = [err for _, err in outs if "another process is building it; waiting" in err]
    assert len(waited) >= 1  # at least one asked while the build ran (usually both)
    assert not list((tmp_path / "cache" / "ns").glob(".*"))  # no lock file or temporary left beside the entry


_HOLDER = """
import os, sys, time
sys.path.insert(0, {root!r})
from pathlib import Path
from transferrable.core.artifact_cache import ArtifactCache

def build(tmp):
    Path({marker!r}).touch()
    time.sleep(120)  # a long build, killed by the test

ArtifactCache({cache!r}).get_or_build({{"k": 1}}, build, name="entry")
"""


def test_a_killed_holder_does_not_block_the_waiting_process(tmp_path):
    marker, cache_dir = tmp_path / "holding", tmp_path / "cache"
    holder = subprocess.Popen([sys.executable, "-c", _HOLDER.format(root=str(ROOT), marker=str(marker),
                                                                    cache=str(cache_dir))])
    try:
        t0 = time.monotonic()
        while not marker.exists():
            assert holder.poll() is None and time.monotonic() - t0 < 60, "the holder never started its build"
            time.sleep(0.05)
        code = (f"import sys, logging; sys.path.insert(0, {str(ROOT)!r}); logging.basicConfig(level=logging.INFO)\n"
                "from transferrable.core.artifact_cache import ArtifactCache\n"
                f"p = ArtifactCache({str(cache_dir)!r}).get_or_build({{'k': 1}}, "
                "lambda tmp: tmp.write_bytes(b'built by the waiter') and None, name='entry')\n"
                "print(p.read_bytes().decode())")
        waiter = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                  text=True)
        time.sleep(2.0)
        assert waiter.poll() is None  # blocked by the live holder
        holder.send_signal(signal.SIGKILL)  # a crash: no cleanup, the lock file stays; the kernel drops the lock
        holder.wait()
        t_kill = time.monotonic()
        out, err = waiter.communicate(timeout=60)
        assert waiter.returncode == 0, err[-2000:]
        assert out.strip() == "built by the waiter" and "waiting for it" in err
        assert time.monotonic() - t_kill < 30
    finally:
        holder.kill()
        holder.wait()
    names = {p.name for p in cache_dir.iterdir()}  # (the dead build's temporary goes when its pid is reaped)
    assert {"entry", "entry.manifest.json"} <= names and ".entry.lock" not in names


def test_a_stuck_holder_makes_the_waiter_stop_with_one_line(tmp_path):
    entry, held, release = tmp_path / "entry", threading.Event(), threading.Event()

    def hold():  # another thread: its own lock file descriptor, so it excludes this thread as a process would
        with entry_lock(entry, "test entry"):
            held.set()
            release.wait(30)

    t = threading.Thread(target=hold)
    t.start()
    try:
        assert held.wait(30)
        t0 = time.monotonic()
        with pytest.raises(CacheLockTimeout) as err:
            with entry_lock(entry, "test entry", timeout=0.5):
                pass
        assert 0.4 < time.monotonic() - t0 < 10
        msg = str(err.value)
        assert "\n" not in msg and str(entry) in msg and "paths.cache_lock_timeout_s" in msg and "0.5 s" in msg
    finally:
        release.set()
        t.join()
    assert not lock_path(entry).exists()  # released: the holder removed its lock file


def test_the_lock_is_reentrant_in_a_thread_so_a_build_may_write_through_the_writer(tmp_path):
    cache = ArtifactCache(tmp_path)
    path = cache.path_for({"k": 2}, name="entry")

    def build():
        with cache.writer(path, {"k": 2}) as w:  # takes the same lock again
            w.path.write_bytes(b"inner")

    value, built = cache.ensure(path, {"k": 2}, build, load=lambda p, m: p.read_bytes())
    assert (value, built) == (b"inner", True)
    assert cache.ensure(path, {"k": 2}, build, load=lambda p, m: p.read_bytes()) == (b"inner", False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["entry", "entry.manifest.json"]


_HAMMER = """
import os, sys, time
sys.path.insert(0, {root!r})
from transferrable.core.cache_lock import entry_lock
inside, overlaps = {inside!r}, 0
for _ in range(40):
    with entry_lock({entry!r}):
        try:
            fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            overlaps, fd = overlaps + 1, None
        time.sleep(0.002)
        if fd is not None:
            os.close(fd)
            os.unlink(inside)
print(overlaps)
"""


def test_unlinking_the_lock_file_on_release_never_lets_two_processes_in(tmp_path):
    """The holder unlinks the lock file before unlocking it; a waiter that then locks the unlinked file must
    retry on the new one (filelock >= 4), or two processes would hold one entry."""
    code = _HAMMER.format(root=str(ROOT), inside=str(tmp_path / "inside"), entry=str(tmp_path / "entry"))
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=120)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    assert [int(o.strip()) for o in outs] == [0, 0, 0]
    assert list(tmp_path.iterdir()) == []


# -- end to end: two train.py jobs that need the same generated source data set and source network ------------------
TINY_SOURCE = ["task=classify", "dataset=fractal_caltech", "dataset.n_classes=3", "dataset.images_per_class=6",
               "dataset.train_per_class=3", "dataset.progress=false", "backbone.weights=source:fractalnet",
               "backbone.widths=[8,16,16,16,16]", "backbone.fc_dim=32",
               "+source_overrides={dataset.n_classes: 4, dataset.images_per_class: 5, dataset.val_per_class: 2, "
               "dataset.progress: false, trainer.max_epochs: 1}",
               "trainer.max_epochs=1", "trainer.deterministic=true", "trainer.precision=32-true", "logger=none",
               "callbacks.progress_bar.refresh_rate=0", "trainer.enable_model_summary=false",
               "~callbacks.model_summary", "seed=5"]


@pytest.mark.slow
def test_two_train_jobs_pretrain_the_source_and_generate_its_data_once(tmp_path):
    env = {**os.environ, "TRANSFERRABLE_CACHE": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}
    procs = [popen_script(["train.py", *TINY_SOURCE, f"hydra.run.dir={tmp_path / f'run{i}'}"], ROOT, env)
             for i in range(2)]  # two overlapping runs, forked from the test zygote
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[-3000:] for o in outs]
    both = "".join(outs)
    assert both.count("no cached representation at") == 1  # one source pretraining
    assert both.count("generated fractal world: building") == 2  # the source's set and the target's, once each
    assert "another process is building it; waiting" in both
    sources = list((tmp_path / "cache" / "source").glob("*.pt"))
    assert len(sources) == 1 and not list((tmp_path / "cache" / "source").glob(".*"))
    manifest = json.loads(Path(f"{sources[0]}.manifest.json").read_text())
    assert hashlib.sha256(sources[0].read_bytes()).hexdigest() == manifest["sha256"]
    a, b = (json.loads((tmp_path / f"run{i}" / "metrics.json").read_text()) for i in range(2))
    assert a["test/acc"] == b["test/acc"] and a["test/loss"] == b["test/loss"]  # the same weights, the same run
