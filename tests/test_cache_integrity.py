"""Every on-disk cache is validated against its manifest: for each kind, built tiny, then (a) its artefact
truncated and (b) separately its manifest corrupted; the next use warns (``CacheWarning``), rebuilds the entry
and returns exactly the original content -- a damaged entry is never used -- and the rebuilt entry is then
reused without a warning."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from transferrable.core.manifest import CacheWarning


def _photo(w=64, h=48) -> np.ndarray:
    rng = np.random.default_rng(0)
    img = np.full((h, w, 3), 40, np.uint8)
    for _ in range(3):
        x, y = rng.integers(0, w - 16), rng.integers(0, h - 16)
        img[y:y + 14, x:x + 12] = rng.integers(0, 255, 3)
    return img


def _tree(root: Path, skip: str = "manifest.json") -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != skip}


# -- one entry per cache kind: use(root) builds or reuses it and returns its content; artefact/manifest locate files
class Kind:
    def __init__(self, use: Callable[[Path], Any], artefact: Callable[[Path], Path], manifest: Callable[[Path], Path]):
        self.use, self.artefact, self.manifest = use, artefact, manifest


def _features(root: Path):
    from transferrable.core.feature_cache import FeatureCache

    key = {"version": 1, "tap": "fc6", "weights": "sha256:abc"}
    arr, _ = FeatureCache(root).get_or_compute("fc6", key, lambda: np.arange(600, dtype=np.float32).reshape(20, 30))
    return arr


def _proposals(root: Path):
    from models.rcnn.proposals import ProposalCache

    return ProposalCache(root, method="selective_search", mode="single", width=96, max_proposals=80).get("im", _photo())


def _segments(root: Path):
    from models.rcnn.segments import SegmentCache, SegmentProposals

    sp = SegmentProposals(colour_spaces=["hsv"], scales=[50], min_size=10, max_regions=20)
    return SegmentCache(root, sp).get("im", _photo())


def _pool5(root: Path):
    from engine.rcnn.features import pool5_features
    from lightning_modules.rcnn import RCNNModule
    from models.backbones import CaffeNetMini
    from models.rcnn.windows import ImageSet

    torch.manual_seed(0)
    model = RCNNModule(CaffeNetMini(widths=[8, 16, 16, 16, 16], fc_dim=32), num_classes=2, bf16=False,
                       channels_last=False)
    boxes = np.array([[0, 0, 30, 30], [10, 5, 60, 40], [20, 20, 50, 45]], np.float32)
    items = [{"image_id": f"im{i}", "image": np.roll(_photo(), 7 * i, 1), "boxes": np.zeros((0, 4), np.float32),
              "labels": np.zeros(0, np.int64), "difficult": np.zeros(0, bool)} for i in range(2)]
    data = ImageSet("train", items, [boxes, boxes[:2]], with_gt=False)
    return np.array(pool5_features(model, data, (0.5,) * 3, (0.25,) * 3, root, weights="weights", proposals="proposals"))


def _frames(root: Path):
    from datamodules.ucf101 import ArrayCache

    cache = ArrayCache(root)
    got = cache.get("flow", "video0")
    if got is None:  # what the data module does: compute, then put
        got = np.arange(2 * 8 * 8 * 2, dtype=np.float32).reshape(2, 8, 8, 2)
        cache.put("flow", "video0", got)
    return np.array(got)


def _source_like(root: Path, module: str, prefix: str, backbone: list[str], monkeypatch, made: list):
    """``backbone.weights=<prefix><dataset>`` resolved through the real code, the pretraining itself replaced by a
    fixed tiny checkpoint (the validation and the rebuild are what is under test, not the training)."""
    import importlib

    from conftest import compose_train, point_paths_at

    import transferrable.run.runner as runner

    def fake_train(pre):
        out = Path(pre.paths.output_dir)
        out.mkdir(parents=True, exist_ok=True)
        made.append(out)
        state = {"backbone.fc.weight": torch.arange(12.0).reshape(3, 4)}
        torch.save({"state_dict": state}, out / "best.ckpt")
        torch.save({"state_dict": {"fc.weight": state["backbone.fc.weight"]}, "arch": {}}, out / "encoder.pt")
        return {"test_checkpoint": str(out / "best.ckpt"), "encoder_checkpoint": str(out / "encoder.pt")}

    monkeypatch.setattr(runner, "train", fake_train)
    cfg = point_paths_at(compose_train([*backbone, f"backbone.weights={prefix}fashion_mnist"]), root / "run", root)
    importlib.import_module(module)
    from transferrable.run.source import resolve_source_weights

    resolve_source_weights(cfg)
    return torch.load(cfg.backbone.weights, map_location="cpu", weights_only=True)["state_dict"]


def _generated_scenes(root: Path, fmnist_dir):
    from datamodules.scene_generator import generate_scenes

    return _tree(generate_scenes(root, n_train=2, n_val=1, n_test=1, image_size=(64, 48), max_objects=2,
                                 data_dir=fmnist_dir, progress=False))


def _generated_videos(root: Path, fmnist_dir):
    from datamodules.motion_generator import generate_motions

    return _tree(generate_motions(root, progress=False, classes=["MoveLeft", "MoveRight"], n_groups=22,
                                  clips_per_group=1, num_frames=2, frame_size=16, data_dir=fmnist_dir))


def _generated_captions(root: Path, fmnist_dir):
    from datamodules.caption_generator import caption_params, write_caption_dataset
    from datamodules.scene_generator import generate_scenes, scene_params

    gen = {"n_train": 2, "n_val": 1, "n_test": 1, "image_size": (64, 48), "max_objects": 2}
    voc = generate_scenes(root / "scenes", data_dir=fmnist_dir, progress=False, **gen)
    params = caption_params(scene_params(**gen, data_dir=fmnist_dir), seed=0, captions_per_image=5)
    return _tree(write_caption_dataset(root / "coco", voc, params, progress=False))


def _video_tuples(root: Path):
    from datamodules.video_tuples import VideoTuplesDataModule

    dm = VideoTuplesDataModule(root=root, n_train=6, n_val=0, n_test=2, vocab_min_count=1)
    dm.setup()
    return json.dumps(dm.splits, sort_keys=True)


def _only(root: Path, pattern: str, recursive: bool = True) -> Path:
    (path,) = sorted(p for p in (root.rglob(pattern) if recursive else root.glob(pattern)) if p.is_file())
    return path


def _kinds(fmnist_dir, monkeypatch, made) -> dict[str, Kind]:
    return {
        "features": Kind(_features, lambda r: _only(r, "fc6-*.npy"), lambda r: _only(r, "fc6-*.json")),
        "proposals": Kind(_proposals, lambda r: _only(r, "im.*.npz"), lambda r: _only(r, "im.*.npz")),
        "segments": Kind(_segments, lambda r: _only(r, "im.*.npz"), lambda r: _only(r, "im.*.npz")),
        "rcnn_pool5": Kind(_pool5, lambda r: _only(r, "pool5-*.dat"), lambda r: _only(r, "pool5-*.json")),
        "flow_frames": Kind(_frames, lambda r: _only(r, "video0.npy"), lambda r: _only(r, "video0.npy.manifest.json")),
        "source_representation": Kind(
            lambda r: _source_like(r, "transferrable.run.source", "source:", ["backbone.widths=[8,16,16,16,16]"],
                                   monkeypatch, made),
            lambda r: _only(r / "source", "*.pt", False), lambda r: _only(r / "source", "*.pt.manifest.json")),
        "bigan_source": Kind(
            lambda r: _source_like(r, "transferrable.run.bigan_source", "bigan:", ["backbone=bigan_alexnet"],
                                   monkeypatch, made),
            lambda r: _only(r / "bigan", "*.pt", False), lambda r: _only(r / "bigan", "*.pt.manifest.json")),
        "generated_scenes": Kind(lambda r: _generated_scenes(r, fmnist_dir), lambda r: _only(r, "000000.jpg"),
                                 lambda r: _only(r, "manifest.json")),
        "generated_videos": Kind(lambda r: _generated_videos(r, fmnist_dir), lambda r: sorted(r.rglob("*.avi"))[0],
                                 lambda r: _only(r, "manifest.json")),
        "generated_captions": Kind(lambda r: _generated_captions(r, fmnist_dir),
                                   lambda r: _only(r / "coco", "dataset_coco.json"),
                                   lambda r: _only(r / "coco", "manifest.json")),
        "video_tuples": Kind(_video_tuples, lambda r: _only(r, "video_tuples.json"), lambda r: _only(r, "manifest.json")),
    }


KINDS = ["features", "proposals", "segments", "rcnn_pool5", "flow_frames", "source_representation", "bigan_source",
         "generated_scenes", "generated_videos", "generated_captions", "video_tuples"]


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _corrupt_manifest(path: Path) -> None:
    if path.suffix == ".npz":  # the manifest travels inside the file: keep the arrays, garble the manifest
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["__manifest__"] = np.array('{"version": 1, "key_hash": "not this one"')
        with open(path, "wb") as f:
            np.savez(f, **arrays)
    else:
        path.write_text(path.read_text()[:-7] + "garbage")


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, tuple | list):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return torch.equal(a, b)
    if isinstance(a, np.ndarray):
        return a.dtype == b.dtype and np.array_equal(a, b)
    return a == b


@pytest.mark.parametrize("damage", ["truncate", "corrupt_manifest"])
@pytest.mark.parametrize("kind", KINDS)
def test_damaged_cache_warns_and_is_rebuilt_identically(kind, damage, fmnist_dir, tmp_path, monkeypatch):
    made: list = []
    k = _kinds(fmnist_dir, monkeypatch, made)[kind]
    original = k.use(tmp_path)
    target = k.artefact(tmp_path) if damage == "truncate" else k.manifest(tmp_path)
    size = target.stat().st_size
    (_truncate if damage == "truncate" else _corrupt_manifest)(target)
    with pytest.warns(CacheWarning, match="rebuilding"):
        rebuilt = k.use(tmp_path)
    assert _equal(original, rebuilt)
    if damage == "truncate":
        assert k.artefact(tmp_path).stat().st_size == size  # written again, whole
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        assert _equal(original, k.use(tmp_path))  # the rebuilt entry is valid and reused
    if kind in ("source_representation", "bigan_source"):
        assert len(made) == 2  # built once, rebuilt once, then reused


def test_entries_cached_before_manifests_are_adopted_not_recomputed(tmp_path):
    """A whole file from before manifests is used and given a manifest (no warning); a damaged one is not."""
    from models.rcnn.proposals import ProposalCache
    from transferrable.core.manifest import load_npz

    cache = ProposalCache(tmp_path, method="selective_search", mode="single", width=96, max_proposals=80)
    img = _photo()
    legacy = np.array([[0, 0, 10, 10], [5, 5, 30, 20]], np.float32)
    with open(cache.path("old"), "wb") as f:
        np.savez(f, boxes=legacy, image_size=np.array([img.shape[1], img.shape[0]]))
    with warnings.catch_warnings():
        warnings.simplefilter("error", CacheWarning)
        assert np.array_equal(cache.get("old", img), legacy)
    assert cache.stats["hits"] == 1 and cache.stats["misses"] == 0
    arrays, why = load_npz(cache.path("old"), cache.key("old", img.shape[1], img.shape[0]), adopt=False)
    assert why is None and np.array_equal(arrays["boxes"], legacy)  # it now carries its manifest
