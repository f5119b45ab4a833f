"""SLURM jobs that survive their time limit (issue 28): ``hardware=slurm`` lets submitit requeue a timed-out job
(``max_num_timeout``) and resumes it from ``last.ckpt`` (``ckpt_path: last``). The test drives the same path locally
with Hydra's ``submitit_local`` launcher: USR2 -- what SLURM sends ``signal_delay_s`` before the time limit (with a
limit of 10 min or less submitit counts any USR2 as a time-out) -- arrives mid-epoch, submitit checkpoints the job (Hydra's launcher re-submits itself: same overrides, same sweep
subdirectory) and requeues it, and the requeued job ends with the metrics of an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from conftest import compose_train
from omegaconf import OmegaConf
from zygote import popen_script

ROOT = Path(__file__).resolve().parents[1]
TINY = ["logger=none", "hardware=cpu", "trainer.precision=32-true", "trainer.deterministic=true",
        "dataset.batch_size=32", "dataset.eval_batch_size=100", "trainer.max_epochs=3",
        "++trainer.limit_train_batches=5", "++trainer.limit_val_batches=1", "++trainer.limit_test_batches=2",
        "backbone.widths=[8,16,16,16,16]", "backbone.fc_dim=32", "callbacks.progress_bar.refresh_rate=0",
        "trainer.enable_model_summary=false", "~callbacks.model_summary", "seed=3"]


def test_hardware_slurm_requeues_on_time_out_and_resumes_from_last():
    cfg = compose_train(["hardware=slurm"])
    assert cfg.ckpt_path == "last"
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("SlurmLauncher") and launcher.max_num_timeout >= 1
    assert 0 < launcher.signal_delay_s < launcher.timeout_min * 60
    (plugin,) = OmegaConf.to_container(cfg.trainer.plugins)
    from hydra.utils import instantiate
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    env = instantiate(plugin)
    assert isinstance(env, SLURMEnvironment) and env.auto_requeue is False  # submitit alone requeues


def _sweep(sweep_dir: Path, fmnist_dir: Path, *extra: str):
    """The sweep's controller, started (forked from the test zygote); ``communicate()`` gives its output."""
    env = {**os.environ, "TRANSFERRABLE_CACHE": "/nonexistent-cache-should-not-be-used"}
    cmd = ["train.py", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=10",
           "ckpt_path=last", *TINY, f"dataset.data_dir={fmnist_dir}", f"hydra.sweep.dir={sweep_dir}", *extra]
    return popen_script(cmd, ROOT, env)


@pytest.mark.slow
def test_a_job_signalled_before_its_time_limit_is_requeued_and_ends_as_an_uninterrupted_run(fmnist_dir, tmp_path):
    marker = tmp_path / "signalled"
    whole = _sweep(tmp_path / "whole", fmnist_dir)  # the two sweeps overlap: most of a sweep is submitit's polling
    requeued = _sweep(tmp_path / "requeued", fmnist_dir, "+callbacks.usr2._target_=tests.kill_switch.SignalOnceAtStep",
                      "+callbacks.usr2.step=7", f"+callbacks.usr2.signum={int(signal.SIGUSR2)}",
                      f"+callbacks.usr2.marker={marker}")
    for sweep in (whole, requeued):
        output = sweep.communicate(timeout=400)[0]
        assert sweep.returncode == 0, output[-3000:]
    assert marker.exists()  # the signal did arrive, in epoch 1 (steps 5..9), after epoch 0's last.ckpt
    logs = "".join(p.read_text() for p in (tmp_path / "requeued" / ".submitit").rglob("*_log.*"))
    assert "this job is timed-out" in logs and "Requeued job" in logs  # submitit's time-out path, not a crash
    assert "resuming from" in logs and "last.ckpt" in logs  # the requeued job continued from epoch 0's checkpoint
    a = json.loads((tmp_path / "whole" / "0" / "metrics.json").read_text())
    b = json.loads((tmp_path / "requeued" / "0" / "metrics.json").read_text())
    print("uninterrupted vs requeued:", {k: (a[k], b[k]) for k in ("test/acc", "test/loss", "val/loss")})
    for key in ("test/acc", "test/loss", "val/loss", "train/loss_epoch"):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key
