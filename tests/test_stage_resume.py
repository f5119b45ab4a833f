"""Resume of the stages that are not a Lightning fit: an R-CNN run interrupted while extracting pool5 features, and
again while training its per-class SVMs, picks up from what is on disk (proposals, the fine-tuned weights, the
partial pool5 file, the finished classes' SVMs) and ends with exactly the metrics of an uninterrupted run; a GAN run SIGKILLed mid-epoch
and resumed with ``ckpt_path=last`` ends with the metrics of an uninterrupted one."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import pytest
import torch
from conftest import compose_train, point_paths_at
from kill_switch import run_train
from test_determinism import QUIET, TASKS, _comparable

import transferrable.run.runner as runner
from lightning_modules.rcnn import RCNNModule
from transferrable.core.feature_cache import FeatureCache


class _Killed(Exception):
    """Stands in for a kill at a chosen point (the files on disk are what a SIGKILL would leave)."""


def _rcnn(fmnist_dir, out: Path, cache: Path, monkeypatch, built: list):
    real = runner.build_model
    monkeypatch.setattr(runner, "build_model", lambda cfg, n: built.append(real(cfg, n)) or built[-1])
    cfg = point_paths_at(compose_train([*QUIET, f"dataset.source_dir={fmnist_dir}", *TASKS["rcnn"]]), out, cache)
    return runner.train(cfg)


def _same(a: dict, b: dict) -> None:
    a, b = _comparable(a), _comparable(b)
    assert a.keys() == b.keys() and {k: a[k] for k in a if a[k] != b[k]} == {}


def test_rcnn_resumes_proposals_pool5_and_finished_svm_classes(fmnist_dir, tmp_path, monkeypatch):
    built: list = []
    whole = _rcnn(fmnist_dir, tmp_path / "whole", tmp_path / "whole_cache", monkeypatch, built)
    run, cache = tmp_path / "run", tmp_path / "cache"

    # 1. killed while extracting the training regions' pool5 (after 3 of the 6 images)
    real_pool5 = RCNNModule.image_pool5
    calls = {"n": 0}

    def pool5_then_kill(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise _Killed
        return real_pool5(self, *a, **k)

    monkeypatch.setattr(RCNNModule, "image_pool5", pool5_then_kill)
    with pytest.raises(_Killed):
        _rcnn(fmnist_dir, run, cache, monkeypatch, built)
    assert list((cache / "rcnn_features").glob(".pool5-train-*.partial")) and not (run / "metrics.json").exists()
    monkeypatch.setattr(RCNNModule, "image_pool5", real_pool5)

    # 2. killed while training the SVMs, after two classes of the first layer (pool5) were saved
    real_save = FeatureCache.save
    saved = {"n": 0}

    def save_then_kill(self, name, key, array):
        out = real_save(self, name, key, array)
        saved["n"] += name.endswith("-stats")
        if saved["n"] == 2:
            raise _Killed
        return out

    monkeypatch.setattr(FeatureCache, "save", save_then_kill)
    with pytest.raises(_Killed):
        _rcnn(fmnist_dir, run, cache, monkeypatch, built)
    second = built[-1]
    assert built[1].stats["finetune"] == "trained" and second.stats["finetune"] == "reused"  # finetuned.pt
    assert second.stats["feature_cache_train"] == "resumed" and second.stats["pool5_images_computed_train"] == 3
    assert len(list((run / "svms").glob("svm-pool5-class*-stats-*.json"))) == 2
    monkeypatch.setattr(FeatureCache, "save", real_save)

    # 3. half the proposal files lost as well; the rerun recomputes only what is missing
    proposal_files = sorted((cache / "proposals").rglob("*.npz"))
    for p in proposal_files[::2]:
        p.unlink()
    resumed = _rcnn(fmnist_dir, run, cache, monkeypatch, built)
    third = built[-1]
    assert third.stats["svm_classes_reused"] == 2
    info = json.loads((run / "rcnn_results.json").read_text())["info"]
    assert info["svm/pool5"]["restored_classes"] == 2 and info["svm/fc7"]["restored_classes"] == 0
    with_model = sum(p > 0 for p in info["svm/pool5"]["positives"])
    assert with_model >= 3 and third.stats["svm_classes_trained"] == (with_model - 2) + with_model
    assert info["proposal_cache"]["misses"] == len(proposal_files[::2])
    assert third.stats["feature_cache_train"] == "hit" and third.stats["feature_cache_test"] == "hit"
    assert third.stats["finetune"] == "reused"
    _same(whole, resumed)

    # 4. the same command once more: nothing left to compute
    again = _rcnn(fmnist_dir, run, cache, monkeypatch, built)
    assert built[-1].stats.get("svm_classes_trained", 0) == 0 and built[-1].stats["svm_classes_reused"] == 2 * with_model
    _same(whole, again)


# -- LRCN: decoded frames and optical flow, one cache entry per video ---------------------------------------------
def test_lrcn_frames_and_flow_recompute_only_the_missing_videos(fmnist_dir, tmp_path, monkeypatch):
    import numpy as np

    import datamodules.ucf101 as ucf
    from datamodules.moving_objects import MovingObjectsDataModule

    calls = {"decode": 0, "flow": 0}
    real_decode, real_flow = ucf.decode_video, ucf.compute_flow

    def decode(*a, **k):
        calls["decode"] += 1
        return real_decode(*a, **k)

    def flow(*a, **k):
        calls["flow"] += 1
        return real_flow(*a, **k)

    monkeypatch.setattr(ucf, "decode_video", decode)
    monkeypatch.setattr(ucf, "compute_flow", flow)

    def build():
        dm = MovingObjectsDataModule(root=tmp_path / "videos", actions=["MoveLeft", "MoveRight"], n_groups=22,
                                     clips_per_group=1, num_frames=4, video_size=16, source_dir=fmnist_dir,
                                     modality="flow", cache_dir=tmp_path / "cache", frame_size=[16, 16],
                                     input_size=16, clip_length=2, val_groups=0, progress=False)
        dm.setup()
        return {n: np.load(p) for ds in dm.splits.values() for n, p in zip(ds.names, ds.arrays, strict=True)}

    first = build()
    videos = calls["decode"]
    assert videos == calls["flow"] == len(first) == 44
    frames = sorted((tmp_path / "cache" / "frames").glob("*.npy"))
    flows = sorted((tmp_path / "cache" / "flow").glob("*.npy"))
    for p in frames[::4]:  # a quarter of the decoded videos and half of the flow fields are lost
        p.unlink()
    for p in flows[::2]:
        p.unlink()
    calls.update(decode=0, flow=0)
    again = build()
    assert calls == {"decode": len(frames[::4]), "flow": len(flows[::2])}
    assert again.keys() == first.keys() and all(np.array_equal(first[k], again[k]) for k in first)


# -- a GAN run with three optimisers, SIGKILLed mid-epoch --------------------------------------------------------
BIGAN = ["task=bigan", "logger=none", "hardware=cpu", "trainer.precision=32-true", "trainer.deterministic=true",
         "bigan.hidden=[32,32]", "bigan.latent_dim=8", "bigan.bn_batches=2", "bigan.probe_max_train=200",
         "bigan.decay_start=0.25", "dataset.batch_size=32", "dataset.eval_batch_size=100", "trainer.max_epochs=3",
         "++trainer.limit_train_batches=4", "++trainer.limit_val_batches=null", "callbacks.progress_bar.refresh_rate=0",
         "trainer.enable_model_summary=false", "~callbacks.model_summary", "seed=3"]


def _bigan(run_dir, *extra: str):
    return run_train(BIGAN, run_dir, *extra)


@pytest.mark.slow
def test_bigan_sigkilled_mid_epoch_resumes_to_the_uninterrupted_metrics(fmnist_dir, tmp_path):
    data = f"dataset.data_dir={fmnist_dir}"
    whole = _bigan(tmp_path / "whole", data)
    assert whole.returncode == 0, whole.stderr[-3000:]
    run_dir = tmp_path / "killed"
    # manual optimisation: each of the three optimisers' steps counts, 3 x 4 = 12 per epoch; 18 is mid-epoch 1
    killed = _bigan(run_dir, data, "+callbacks.kill._target_=tests.kill_switch.KillAtStep", "+callbacks.kill.step=18")
    assert killed.returncode == -signal.SIGKILL
    assert not (run_dir / "metrics.json").exists()
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 0 and last["global_step"] == 12 and len(last["optimizer_states"]) == 3
    assert [s["last_epoch"] for s in last["lr_schedulers"]] == [4, 4, 4]  # the schedule is part of what resumes
    resumed = _bigan(run_dir, data, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = json.loads((tmp_path / "whole" / "metrics.json").read_text())
    b = json.loads((run_dir / "metrics.json").read_text())
    print("BiGAN uninterrupted vs killed+resumed:", {k: (a[k], b[k]) for k in sorted(a) if k.startswith(("test/", "train/"))})
    _same(a, b)
    assert "test/knn1_acc" in a
