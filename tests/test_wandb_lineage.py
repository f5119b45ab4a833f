"""W&B lineage and ``logger=many`` (issue 28), offline only: a run logs the weights it starts from and its config
as W&B artifacts, and ``logger=many`` writes TensorBoard curves beside the W&B run."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import torch

from transferrable.run import runner


def _wandb_records(run_dir: Path, until: bytes = b"", wait_s: float = 30.0) -> bytes:
    """The offline run's record log (protobuf records: names and types appear verbatim). wandb's service process
    writes it after ``wandb.finish`` returns, so wait (at most ``wait_s``) until it holds ``until``."""
    t0 = time.monotonic()
    while True:
        (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
        data = path.read_bytes()
        if until in data or time.monotonic() - t0 > wait_s:
            return data
        time.sleep(0.2)


def _source_file(tmp_path: Path, make_cfg) -> Path:
    """A backbone state dict of the tiny config's architecture, as a cached source representation holds it."""
    from hydra.utils import instantiate

    cfg = make_cfg(out="make_weights")
    backbone = instantiate(cfg.backbone)
    path = tmp_path / "caffenetmini-fashion_mnist-28px-0123456789.pt"
    torch.save({"state_dict": backbone.state_dict()}, path)
    return path


def test_a_run_logs_its_starting_weights_and_config_as_artifacts(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    weights = _source_file(tmp_path, make_cfg)
    cfg = make_cfg("logger=wandb", f"backbone.weights={weights}", "task_name=lineage_test", out="run")
    runner.train(cfg)
    records = _wandb_records(tmp_path / "run", until=b"config.yaml")
    assert b"caffenetmini-fashion_mnist-28px-0123456789" in records and b"weights" in records  # the weights artifact
    assert b"config-lineage_test" in records and b"config.yaml" in records  # the config artifact
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    assert sha.encode() in records  # the weights' sha256 (artifact metadata and run config)


def test_lineage_can_be_switched_off(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_cfg("logger=wandb", "logger.wandb.lineage=false", "task_name=no_lineage", out="run")
    runner.train(cfg)
    records = _wandb_records(tmp_path / "run", until=b"val/loss")  # the run's history, flushed
    assert b"val/loss" in records and b"config-no_lineage" not in records


def test_logger_many_writes_tensorboard_curves_and_the_wandb_run(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = make_cfg("logger=many", "trainer.max_epochs=2", "++trainer.log_every_n_steps=1", out="run")
    assert sorted(cfg.logger) == ["tensorboard", "wandb"]
    metrics = runner.train(cfg)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    val_loss = []
    for events in sorted((tmp_path / "run" / "tensorboard").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if "val/loss" in acc.Tags()["scalars"]:
            val_loss += [e.value for e in acc.Scalars("val/loss")]
    assert len(val_loss) == 2  # one point per epoch: a curve
    assert abs(val_loss[-1] - metrics["val/loss"]) < 1e-5  # the same numbers as metrics.json
    assert b"val/loss" in _wandb_records(tmp_path / "run", until=b"val/loss")  # and the offline W&B run beside it
