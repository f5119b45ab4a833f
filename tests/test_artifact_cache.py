"""``transferrable.core.artifact_cache``: the one cache mechanism behind every on-disk cache of the suite.

Key stability (names and manifests of existing caches stay valid), atomic commits (a build that raises or is
SIGKILLed leaves no entry), damaged entries detected, warned about (``CacheWarning``) and rebuilt, a version bump
invalidating entries, directory and chunked-memmap entries, and readers that never see a torn file while another
process rewrites it."""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

from transferrable.core.artifact_cache import (
    ABSENT,
    NO_MANIFEST,
    ArtifactCache,
    CacheWarning,
    Unusable,
    digest,
    file_sha256,
    key_hash,
)

ROOT = Path(__file__).resolve().parents[1]
KEY = {"version": 1, "tap": "fc6", "weights": {"spec": "sha256:aaaa"}, "dataset": {"n": 5}, "mean": [0.5, 0.25]}


@contextlib.contextmanager
def _no_cache_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        yield


class Builds:
    """A build function that counts its calls and writes ``payload``."""

    def __init__(self, payload: bytes = b"artefact bytes " * 100):
        self.payload, self.calls = payload, 0

    def __call__(self, tmp: Path) -> dict:
        self.calls += 1
        tmp.write_bytes(self.payload)
        return {"note": "extra field"}


def _read(path: Path, _manifest: dict) -> bytes:
    return path.read_bytes()


# -- key stability ---------------------------------------------------------------------------------------
def test_key_hash_is_canonical():
    assert key_hash({"b": 1, "a": [1, 2]}) == key_hash({"a": [1, 2], "b": 1}) == key_hash({"a": (1, 2), "b": 1})
    assert key_hash({"a": 1}) != key_hash({"a": 2}) and key_hash({"a": 1}) != key_hash({"a": "1"})
    assert key_hash(KEY) == hashlib.sha256(json.dumps(KEY, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def test_names_of_existing_caches_are_unchanged(tmp_path):
    """Golden names, computed with the code before ``ArtifactCache``: every cache keeps its file names."""
    from datamodules.caption_generator import caption_key
    from datamodules.motion_generator import motion_key
    from datamodules.scene_generator import scene_key
    from datamodules.ucf101 import ArrayCache
    from datamodules.video_tuples import VideoTuplesDataModule, load_or_generate
    from models.rcnn.proposals import ProposalCache
    from models.rcnn.segments import SegmentCache, SegmentProposals
    from transferrable.core import feature_cache, manifest
    from transferrable.run.bigan_source import bigan_source_path
    from transferrable.run.source import source_key

    golden = "677210c245b6ceee78994885ec4b7fd06eaf520d55d4bc7a2827c81e352e7309"
    assert key_hash(KEY) == feature_cache.key_hash(KEY) == manifest.key_hash(KEY) == golden
    fc = feature_cache.FeatureCache("/r")
    assert fc.paths("fc6", KEY)[0].name == "fc6-677210c245b6ceee.npy"
    assert fc.paths("pool5/x y", KEY)[1].name == "pool5_x_y-677210c245b6ceee.json"
    pc = ProposalCache("/r", method="selective_search", mode="fast", width=320, max_proposals=2000, min_size=2.0)
    assert pc.path("img 01").name == "img_01.fast-w320-2dc8a56185.npz"
    assert ProposalCache("/r", method="sliding_window", max_proposals=None).path("000001").name == "000001.sw-wn-0949fcd7f7.npz"
    sp = SegmentProposals(colour_spaces=["hsv"], scales=[50], min_size=10, max_regions=20)
    assert SegmentCache("/r", sp).path("im").name == "im.seg20-d152b9fee8.npz"
    bb = OmegaConf.create({"_target_": "models.backbones.CaffeNetMini", "input_size": 32, "widths": [8, 16],
                           "fc_dim": 32, "weights": "source:fashion_mnist", "freeze": "none"})
    assert source_key(bb, "fashion_mnist") == "caffenetmini-fashion_mnist-32px-54ccbe20fa"
    assert source_key(bb, "mnist", {"trainer": {"max_epochs": 2}}) == "caffenetmini-mnist-32px-0e45828177"
    cfg = OmegaConf.create({"paths": {"cache_dir": "/c"}, "bigan_source_overrides": {"trainer": {"max_epochs": 5}},
                            "backbone": {"_target_": "models.backbones.BiGANAlexNet", "input_size": 64,
                                         "in_channels": 1, "weights": "bigan:fashion_mnist"}})
    assert bigan_source_path(cfg, "fashion_mnist") == Path("/c/bigan/bigan_alexnet-fashion_mnist-64px-adb976c3a6.pt")
    params = {"version": 1, "n_train": 2, "seed": 0, "image_size": [64, 48], "classes": ["MoveLeft", "MoveRight"],
              "noise": 4.0}
    assert (caption_key(params), motion_key(params), scene_key(params)) == ("9a119e1b04dc2f59", "743eb7ac321e",
                                                                            "743eb7ac321e")
    dm = VideoTuplesDataModule(root=tmp_path, n_train=6, n_val=0, n_test=2, vocab_min_count=1)
    load_or_generate(tmp_path, dm.params)
    assert [p.name for p in tmp_path.iterdir()] == ["5fb8aef04e98b3dd"]
    ident = "/v/a.avi|10|123|[('frame_size', (16, 16)), ('max_frames', None)]"
    assert digest(ident, 20, algo="sha1") == "03e88274a65ef68409af"
    video = tmp_path / "v.avi"
    video.write_bytes(b"x" * 10)
    st = video.stat()
    settings = {"frame_size": (16, 16), "max_frames": None}
    want = f"{video.resolve()}|{st.st_size}|{st.st_mtime_ns}|{sorted(settings.items())}"
    assert ArrayCache.key(video, settings) == hashlib.sha1(want.encode()).hexdigest()[:20]
    # what the engine's R-CNN caches will ask for: pool5 rows and the fine-tuned network keep their names
    cache = ArtifactCache("/r")
    assert cache.path_for(KEY, prefix="pool5-train-", suffix=".dat").name == "pool5-train-677210c245b6ceee.dat"
    assert cache.path_for(KEY, name=f"{digest(KEY, 16)}.pt").name == "e9dd7dd9d48b7f2a.pt"


def test_manifests_written_before_artifact_cache_stay_valid(tmp_path):
    """Entries exactly as the earlier code wrote them are used as they are: no warning, no rebuild."""
    from datamodules.ucf101 import ArrayCache
    from transferrable.core.feature_cache import FeatureCache

    arr = np.arange(12, dtype=np.float32).reshape(3, 4)
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    data = buf.getvalue()
    # the feature cache's manifest: "nbytes" (not "bytes"), the key and its hash
    fc = FeatureCache(tmp_path / "features")
    npy, man = fc.paths("fc6", KEY)
    npy.parent.mkdir(parents=True)
    npy.write_bytes(data)
    man.write_text(json.dumps({"version": 1, "name": "fc6", "key": KEY, "key_hash": key_hash(KEY), "shape": [3, 4],
                               "dtype": "float32", "n": 3, "nbytes": len(data),
                               "sha256": hashlib.sha256(data).hexdigest()}))
    # decoded frames: version, kind, key, shape, dtype, bytes (no hash, no checksum)
    ac = ArrayCache(tmp_path / "ucf")
    p = ac.path("frames", "abc")
    p.parent.mkdir(parents=True)
    p.write_bytes(data)
    (p.parent / "abc.npy.manifest.json").write_text(json.dumps(
        {"version": 1, "kind": "frames", "key": "abc", "shape": [3, 4], "dtype": "float32", "bytes": len(data)}))
    # a generated directory without a version field
    gen = tmp_path / "gen" / "set"
    gen.mkdir(parents=True)
    (gen / "data.json").write_text("[1, 2]")
    (gen / "manifest.json").write_text(json.dumps({"params": {"seed": 1}, "files": {"data.json": 6}, "videos": 2}))
    # R-CNN's pool5 manifest and a progress file of a killed extraction ("images")
    pool = ArtifactCache(tmp_path / "pool", version=1, checksum=False, record_key=True, manifest_name="{stem}.json")
    dat = pool.path_for(KEY, prefix="pool5-train-", suffix=".dat")
    dat.parent.mkdir(parents=True)
    arr.tofile(dat)
    (dat.parent / f"{dat.stem}.json").write_text(json.dumps({"version": 1, "key": KEY, "key_hash": key_hash(KEY),
                                                             "shape": [3, 4], "dtype": "float32", "bytes": 48}))
    with _no_cache_warnings():
        assert np.array_equal(fc.load("fc6", KEY), arr) and fc.rebuilt == 0
        assert np.array_equal(ac.get("frames", "abc"), arr) and ac.rebuilt == 0
        build = Builds()
        assert ArtifactCache(tmp_path / "gen").get_or_build({"seed": 1}, build, kind="dir", name="set") == gen
        assert build.calls == 0
        assert np.array_equal(pool.open_memmap(dat, KEY, (3, 4), np.float32), arr)
    other = pool.path_for({"other": 1}, prefix="pool5-train-", suffix=".dat")
    np.zeros((3, 4), np.float32).tofile(other.with_name(f".{other.stem}.partial"))
    other.with_name(f".{other.stem}.progress.json").write_text(json.dumps({"key_hash": key_hash({"other": 1}),
                                                                           "images": 2}))
    with pool.memmap_writer(other, {"other": 1}, (3, 4), np.float32) as w:
        assert w.start == 2


# -- single files ----------------------------------------------------------------------------------------
def test_file_entry_is_built_once_then_reused(tmp_path):
    cache = ArtifactCache(tmp_path, "weights", version=3, what="test entry")
    build = Builds()
    got = cache.get_or_build(KEY, build, suffix=".bin", load=_read)
    assert got == build.payload and build.calls == 1
    path = cache.path_for(KEY, suffix=".bin")
    m = json.loads(cache.manifest_path(path).read_text())
    assert path.name == f"{key_hash(KEY)[:16]}.bin" and cache.manifest_path(path).name == f"{path.name}.manifest.json"
    assert m == {"version": 3, "key_hash": key_hash(KEY), "bytes": len(build.payload),
                 "sha256": file_sha256(path), "note": "extra field"}
    with _no_cache_warnings():
        assert cache.get_or_build(KEY, build, suffix=".bin", load=_read) == build.payload
    assert build.calls == 1 and cache.stats["hits"] == 1 and cache.stats["misses"] == 1
    assert sorted(p.name for p in path.parent.iterdir()) == sorted([path.name, f"{path.name}.manifest.json"])


def test_a_build_that_raises_leaves_no_entry(tmp_path):
    cache = ArtifactCache(tmp_path)
    path = cache.path_for(KEY, suffix=".bin")

    def half_then_fail(tmp: Path):
        tmp.write_bytes(b"half of it")
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        cache.get_or_build(KEY, half_then_fail, suffix=".bin")
    assert list(tmp_path.iterdir()) == []
    # a failed rewrite of an existing entry leaves the old one whole and vouched for
    cache.get_or_build(KEY, Builds(), suffix=".bin")
    with pytest.raises(KeyboardInterrupt), cache.writer(path, KEY) as w:
        w.path.write_bytes(b"half")
        raise KeyboardInterrupt
    assert cache.check(path, KEY) is None and path.read_bytes() == Builds().payload
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, f"{path.name}.manifest.json"])


_KILLED_BUILD = """
import os, signal, sys
sys.path.insert(0, {root!r})
from pathlib import Path
from transferrable.core.artifact_cache import ArtifactCache

def build(tmp):
    if {kind!r} == "dir":
        (tmp / "a.txt").write_text("half of the set")
    else:
        tmp.write_bytes(b"half of it")
    os.kill(os.getpid(), signal.SIGKILL)

ArtifactCache({dir!r}).get_or_build({{"k": 1}}, build, kind={kind!r}, name="entry")
"""


@pytest.mark.parametrize("kind", ["file", "dir"])
def test_a_sigkilled_build_leaves_no_entry_and_its_temporaries_are_cleaned(kind, tmp_path):
    code = _KILLED_BUILD.format(root=str(ROOT), kind=kind, dir=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    left = sorted(p.name for p in tmp_path.iterdir())
    assert "entry" not in left and "entry.manifest.json" not in left
    # the dead build's hidden temporary, and its lock file (the kernel released the lock; the next holder unlinks it)
    temporaries = [name for name in left if name != ".entry.lock"]
    assert ".entry.lock" in left and len(temporaries) == 1 and temporaries[0].startswith(".entry.")
    cache = ArtifactCache(tmp_path)
    build = Builds() if kind == "file" else (lambda tmp: (tmp / "a.txt").write_text("the whole set") and None)
    with _no_cache_warnings():
        path = cache.get_or_build({"k": 1}, build, kind=kind, name="entry")
    assert path == tmp_path / "entry" and cache.stats["misses"] == 1
    assert all(not p.name.startswith(".") for p in tmp_path.iterdir())  # the orphan is gone


# -- damage ----------------------------------------------------------------------------------------------
def _truncate(p: Path) -> None:
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _flip_last_byte(p: Path) -> None:
    raw = bytearray(p.read_bytes())
    raw[-1] ^= 0xFF
    p.write_bytes(bytes(raw))


def _garble(p: Path) -> None:
    p.write_text(p.read_text()[:-7] + "garbage")


def _other_key(p: Path) -> None:
    m = json.loads(p.read_text())
    m["key_hash"] = key_hash({"other": "key"})
    p.write_text(json.dumps(m))


@pytest.mark.parametrize("damage, target, why", [
    (_truncate, "artefact", "truncated"), (_flip_last_byte, "artefact", "checksum"),
    (_garble, "manifest", "unreadable manifest"), (_other_key, "manifest", "another key"),
])
def test_damaged_file_entry_warns_and_is_rebuilt(damage, target, why, tmp_path):
    cache = ArtifactCache(tmp_path, what="test entry")
    build = Builds()
    cache.get_or_build(KEY, build, suffix=".bin")
    path = cache.path_for(KEY, suffix=".bin")
    damage(path if target == "artefact" else cache.manifest_path(path))
    with pytest.warns(CacheWarning, match=f"test entry .* is unusable: .*{why}.*; rebuilding it"):
        assert cache.get_or_build(KEY, build, suffix=".bin", load=_read) == build.payload
    assert build.calls == 2 and cache.stats["rebuilt"] == 1
    with _no_cache_warnings():
        assert cache.get_or_build(KEY, build, suffix=".bin", load=_read) == build.payload
    assert build.calls == 2


def test_load_hook_rejects_and_adopt_hook_vouches(tmp_path):
    cache = ArtifactCache(tmp_path)
    path = cache.path_for(KEY, name="legacy.bin")
    path.write_bytes(b"cached before manifests")
    assert cache.check(path, KEY) == NO_MANIFEST and cache.check(tmp_path / "nothing", KEY) == ABSENT
    with _no_cache_warnings():  # no manifest, no adopt hook: a silent miss
        assert cache.read(path, KEY) == (None, NO_MANIFEST)
        got, why = cache.read(path, KEY, _read, adopt=lambda p: {"adopted": True})
    assert why is None and got == b"cached before manifests" and cache.stats["adopted"] == 1
    assert json.loads(cache.manifest_path(path).read_text())["adopted"] is True

    def picky(p: Path, m: dict):
        raise Unusable("it is not what the loader wants")

    with pytest.warns(CacheWarning, match="it is not what the loader wants"):
        assert cache.read(path, KEY, picky)[0] is None
    other = cache.path_for(KEY, name="broken.bin")
    other.write_bytes(b"garbage")
    with pytest.warns(CacheWarning, match=r"it does not load \(EOFError"):
        assert cache.read(other, KEY, adopt=lambda p: (_ for _ in ()).throw(EOFError()))[0] is None


def test_version_bump_invalidates_every_kind(tmp_path):
    v1, v2 = ArtifactCache(tmp_path, version=1), ArtifactCache(tmp_path, version=2)
    build = Builds()
    arrays = {"calls": 0}

    def make_arrays():
        arrays["calls"] += 1
        return {"boxes": np.ones((2, 4), np.float32)}

    def make_dir(tmp: Path):
        (tmp / "x.txt").write_text("x")

    def use(cache: ArtifactCache) -> None:
        cache.get_or_build(KEY, build, suffix=".bin")
        cache.get_or_build(KEY, make_arrays, kind="arrays", suffix=".npz")
        cache.get_or_build(KEY, make_dir, kind="dir", name="set")

    use(v1)
    with pytest.warns(CacheWarning, match="manifest version 1 != 2"):
        use(v2)
    with _no_cache_warnings():
        use(v2)
    assert build.calls == 2 and arrays["calls"] == 2 and v2.stats["rebuilt"] == 3 and v2.stats["hits"] == 3
    assert json.loads((tmp_path / "set" / "manifest.json").read_text())["version"] == 2
    with pytest.warns(CacheWarning, match="manifest version 2 != 1"):
        v1.get_or_build(KEY, build, suffix=".bin")


# -- arrays, directories, memmaps -----------------------------------------------------------------------
def test_arrays_entry_carries_its_manifest_and_adopts_legacy_files(tmp_path):
    cache = ArtifactCache(tmp_path, "proposals", what="proposal cache")
    boxes = np.arange(8, dtype=np.float32).reshape(2, 4)
    got = cache.get_or_build(KEY, lambda: {"boxes": boxes}, kind="arrays", suffix=".npz")
    path = cache.path_for(KEY, suffix=".npz")
    assert np.array_equal(got["boxes"], boxes) and sorted(p.name for p in path.parent.iterdir()) == [path.name]
    _truncate(path)
    with pytest.warns(CacheWarning, match="proposal cache .* unreadable"):
        assert cache.read_arrays(path, KEY)[0] is None
    with open(path, "wb") as f:
        np.savez(f, boxes=boxes)  # as cached before manifests
    with _no_cache_warnings():
        arrays, why = cache.read_arrays(path, KEY)
    assert why is None and np.array_equal(arrays["boxes"], boxes)
    assert cache.read_arrays(path, KEY, adopt=False)[1] is None  # it now carries its manifest


def _edit_params(manifest: Path, **changes) -> None:
    m = json.loads(manifest.read_text())
    m["params"].update(changes)
    manifest.write_text(json.dumps(m))


def test_directory_entry_is_published_whole_validated_and_rebuilt(tmp_path):
    cache = ArtifactCache(tmp_path, version=1, what="generated set")
    params = {"seed": 3, "n": 2}
    calls = []

    def write(tmp: Path) -> dict:
        calls.append(tmp)
        assert tmp.parent == tmp_path and tmp.name.startswith(".set.tmp-")  # a hidden sibling, renamed later
        (tmp / "JPEGImages").mkdir()
        for i in range(params["n"]):
            (tmp / "JPEGImages" / f"{i:06d}.jpg").write_bytes(b"jpeg" * (i + 1))
        return {"counts": {"images": params["n"]}}

    def layout(root: Path) -> str | None:
        return None if (root / "JPEGImages").is_dir() else "JPEGImages is missing"

    root = cache.get_or_build(params, write, kind="dir", name="set", validate=layout)
    m = json.loads((root / "manifest.json").read_text())
    assert root == tmp_path / "set" and len(calls) == 1
    assert m == {"version": 1, "params": params, "counts": {"images": 2},
                 "files": {"JPEGImages/000000.jpg": 4, "JPEGImages/000001.jpg": 8}}
    (root / "marker").write_text("kept while the set is reused")  # files the manifest does not list are allowed
    with _no_cache_warnings():
        assert cache.get_or_build(params, write, kind="dir", name="set", validate=layout) == root
    assert len(calls) == 1 and (root / "marker").exists()
    for damage, why in ((lambda: _truncate(root / "JPEGImages" / "000001.jpg"), "truncated"),
                        (lambda: (root / "JPEGImages" / "000000.jpg").unlink(), "000000.jpg is missing"),
                        (lambda: _garble(root / "manifest.json"), "unreadable manifest"),
                        (lambda: _edit_params(root / "manifest.json", seed=4), "other parameters")):
        damage()
        with pytest.warns(CacheWarning, match=f"generated set .* is unusable: .*{why}"):
            cache.get_or_build(params, write, kind="dir", name="set", validate=layout)
        assert cache.dir_problem(root, params, layout) is None and not (root / "marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # no temporaries left behind
    # a layout check that fails under a manifest that vouches for every file it lists is damage too
    (root / "flagged").write_text("")

    def flagged(r: Path) -> str | None:
        return "it is flagged" if (r / "flagged").exists() else None

    with pytest.warns(CacheWarning, match="it is flagged"):
        cache.get_or_build(params, write, kind="dir", name="set", validate=flagged)
    assert cache.dir_problem(root, params, flagged) is None and len(calls) == 6


def test_memmap_written_in_chunks_resumes_after_a_kill(tmp_path):
    cache = ArtifactCache(tmp_path, version=1, what="pool5 cache", checksum=False, record_key=True,
                          manifest_name="{stem}.json")
    path = cache.path_for(KEY, prefix="pool5-train-", suffix=".dat")
    shape, rows = (6, 3), np.arange(18, dtype=np.float16).reshape(6, 3)
    assert cache.open_memmap(path, KEY, shape, np.float16) is None
    with pytest.raises(RuntimeError), cache.memmap_writer(path, KEY, shape, np.float16) as w:
        assert w.start == 0
        for i in range(w.start, 6):
            if i == 4:
                raise RuntimeError("killed")
            w.array[i] = rows[i]
            if (i + 1) % 2 == 0:
                w.checkpoint(i + 1)
    assert not path.exists() and not cache.manifest_path(path).exists()
    assert (tmp_path / f".{path.stem}.partial").is_file() and (tmp_path / f".{path.stem}.progress.json").is_file()
    with cache.memmap_writer(path, KEY, shape, np.float16) as w:
        assert w.start == 4  # rows 0-3 were checkpointed
        for i in range(w.start, 6):
            w.array[i] = rows[i]
    assert np.array_equal(w.result, rows) and not w.result.flags.writeable
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, f"{path.stem}.json"])
    m = json.loads(cache.manifest_path(path).read_text())
    assert m == {"version": 1, "key": KEY, "key_hash": key_hash(KEY), "shape": [6, 3], "dtype": "float16",
                 "bytes": 36}
    with _no_cache_warnings():
        assert np.array_equal(cache.open_memmap(path, KEY, shape, np.float16), rows)
    with pytest.warns(CacheWarning, match=r"shape \[6, 3\] != \[6, 4\]"):
        assert cache.open_memmap(path, KEY, (6, 4), np.float16) is None
    _truncate(path)
    with pytest.warns(CacheWarning, match="truncated"):
        assert cache.open_memmap(path, KEY, shape, np.float16) is None


# -- concurrency -----------------------------------------------------------------------------------------
_WRITER = """
import sys, time
sys.path.insert(0, {root!r})
from transferrable.core.artifact_cache import ArtifactCache
cache = ArtifactCache({dir!r}, what="torn-file test")
payloads = [b"a" * {n}, b"b" * {n}]
path = cache.path_for("k", name="blob.bin")
end, i = time.time() + {seconds}, 0
while time.time() < end:
    cache.write_bytes(path, "k", payloads[i % 2])
    i += 1
print(i)
"""


def test_concurrent_readers_never_see_a_torn_file(tmp_path):
    n = 1 << 21
    payloads = (b"a" * n, b"b" * n)
    cache = ArtifactCache(tmp_path, what="torn-file test")
    path = cache.path_for("k", name="blob.bin")
    cache.write_bytes(path, "k", payloads[1])
    writer = subprocess.Popen([sys.executable, "-c", _WRITER.format(root=str(ROOT), dir=str(tmp_path), n=n,
                                                                    seconds=1.5)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    raw = vouched = 0
    deadline = time.time() + 60
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", CacheWarning)  # a reader between a file and its new manifest may say so
        while writer.poll() is None and time.time() < deadline:
            assert path.read_bytes() in payloads  # the final name always holds a whole file
            raw += 1
            value, _ = cache.read(path, "k", _read)
            assert value is None or value in payloads
            vouched += value is not None
    out, err = writer.communicate(timeout=60)
    assert writer.returncode == 0, err
    print(f"{int(out)} rewrites, {raw} reads of the file, {vouched} vouched for by its manifest")
    assert int(out) >= 2 and raw >= 2
    assert cache.check(path, "k") is None and path.read_bytes() in payloads
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin", "blob.bin.manifest.json"]
