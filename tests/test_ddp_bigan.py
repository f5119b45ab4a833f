"""task=bigan on two DDP processes (``hardware=ddp_cpu``, gloo): the three optimisers' gradients averaged over the
ranks, each rank training on its shard of every epoch, and the 1-NN evaluation over the whole splits, written once."""

from __future__ import annotations

import json

import pytest
import torch
from kill_switch import run_train

TINY = ["task=bigan", "bigan.hidden=[32,32]", "bigan.latent_dim=8", "bigan.bn_batches=2", "bigan.probe_max_train=200",
        "logger=csv", "trainer.precision=32-true", "dataset.batch_size=32", "dataset.eval_batch_size=50",
        "trainer.max_epochs=2", "callbacks.progress_bar.refresh_rate=0", "trainer.enable_model_summary=false",
        "seed=0"]


@pytest.mark.slow
def test_bigan_on_two_processes_evaluates_the_whole_split_once(fmnist_dir, tmp_path):
    """2 processes train; their last checkpoint, evaluated again by one process (``train=false``), gives the same
    test numbers exactly: every rank embeds the same evaluation batches one process would (its share of them, then
    gathered in order), BN is re-estimated from the same training batches on every rank, and the 1-NN / linear
    probe see the whole train+val gallery and test split. Tolerance 0: nothing in the evaluation is reduced in
    another order."""
    run_dir = tmp_path / "ddp"
    done = run_train(TINY, run_dir, f"dataset.data_dir={fmnist_dir}", f"paths.cache_dir={tmp_path / 'cache2'}",
                     "hardware=ddp_cpu", "trainer.devices=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run directory :") == 1  # one summary, not one per rank
    assert [p.name for p in (run_dir / "csv").iterdir()] == ["version_0"]  # one logger run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"final_samples.png", "final_data.png", "final_reconstructions.png"} <= {
        p.name for p in (run_dir / "samples").iterdir()}
    assert len(list((tmp_path / "cache2" / "bigan").glob("raw_knn1_*.json"))) == 1  # written once, by rank 0
    assert not list((tmp_path / "cache2" / "bigan").glob("*.tmp*"))

    # each rank stepped through its half of every epoch: the fixture's 400 training images less the 10% val split,
    # 180 per rank, 5 batches of 32 (one process: 11); 2 epochs
    last = run_dir / "checkpoints" / "last.ckpt"
    blob = torch.load(last, map_location="cpu", weights_only=True)
    assert [s["last_epoch"] for s in blob["lr_schedulers"]] == [2 * (180 // 32)] * 3

    one_dir = tmp_path / "one"
    again = run_train(TINY, one_dir, f"dataset.data_dir={fmnist_dir}", f"paths.cache_dir={tmp_path / 'cache1'}",
                      "hardware=cpu", "train=false", f"ckpt_path={last}")
    assert again.returncode == 0, again.stderr[-3000:]
    one = json.loads((one_dir / "metrics.json").read_text())
    keys = ("test/knn1_acc", "test/knn1_raw_acc", "test/linear_probe_acc", "test/feature_dim")
    print("2 processes vs its checkpoint on 1:", {k: (metrics[k], one[k]) for k in keys})
    for key in keys:
        assert metrics[key] == one[key], key
    assert 0.0 <= metrics["val/knn1_acc"] <= 1.0
