"""Kill and resume: a run SIGKILLed mid-epoch and resumed with ``ckpt_path=last`` in the same run directory ends
with exactly the metrics of an uninterrupted run with the same seed (deterministic CPU mode)."""

from __future__ import annotations

import json
import signal

import pytest
import torch
from kill_switch import run_train

TINY = ["logger=none", "hardware=cpu", "trainer.precision=32-true", "trainer.deterministic=true",
        "dataset.batch_size=32", "dataset.eval_batch_size=100", "trainer.max_epochs=3",
        "++trainer.limit_train_batches=5", "++trainer.limit_val_batches=1", "++trainer.limit_test_batches=2",
        "backbone.widths=[8,16,16,16,16]", "backbone.fc_dim=32", "callbacks.progress_bar.refresh_rate=0",
        "trainer.enable_model_summary=false", "~callbacks.model_summary", "seed=3"]


def _train(run_dir, *extra: str):
    return run_train(TINY, run_dir, *extra)


@pytest.fixture(scope="module")
def uninterrupted(fmnist_dir, tmp_path_factory) -> dict:
    """metrics.json of the uninterrupted run every kill/signal test compares against (run once)."""
    run_dir = tmp_path_factory.mktemp("whole")
    whole = _train(run_dir, f"dataset.data_dir={fmnist_dir}")
    assert whole.returncode == 0, whole.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text())


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(fmnist_dir, tmp_path, uninterrupted):
    data = f"dataset.data_dir={fmnist_dir}"
    run_dir = tmp_path / "killed"
    killed = _train(run_dir, data, "+callbacks.kill._target_=tests.kill_switch.KillAtStep", "+callbacks.kill.step=7")
    assert killed.returncode == -signal.SIGKILL  # a hard kill in epoch 1 (steps 5..9), after epoch 0's checkpoint
    assert not (run_dir / "metrics.json").exists()
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 0 and last["global_step"] == 5 and "rng_states" in last

    resumed = _train(run_dir, data, "ckpt_path=last")  # the same command again, plus ckpt_path=last
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = uninterrupted
    b = json.loads((run_dir / "metrics.json").read_text())
    print("uninterrupted vs killed+resumed:", {k: (a[k], b[k]) for k in ("test/acc", "test/loss", "val/loss", "train/loss_epoch")})
    for key in ("test/acc", "test/loss", "val/loss", "train/loss_epoch"):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key


@pytest.mark.slow
def test_ckpt_path_last_without_a_checkpoint_starts_fresh(fmnist_dir, tmp_path):
    """Auto-resume: the same command with ``ckpt_path=last`` is safe to use for the first launch too."""
    p = _train(tmp_path / "fresh", f"dataset.data_dir={fmnist_dir}", "ckpt_path=last", "trainer.max_epochs=1")
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((tmp_path / "fresh" / "metrics.json").read_text())["test/acc"] >= 0.0


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_mid_epoch_exits_non_zero_and_resumes_exactly(fmnist_dir, tmp_path, signum, uninterrupted):
    """SIGTERM/SIGINT mid-epoch: exit 143/130 (never 0), no metrics.json, epoch 0's last.ckpt kept; the same
    command with ckpt_path=last then ends with the metrics of an uninterrupted run."""
    data = f"dataset.data_dir={fmnist_dir}"
    run_dir = tmp_path / "signalled"
    stopped = _train(run_dir, data, "+callbacks.stop._target_=tests.kill_switch.SignalAtStep",
                     "+callbacks.stop.step=7", f"+callbacks.stop.signum={int(signum)}")
    print(f"{signum.name}: exit status {stopped.returncode}")
    assert stopped.returncode == 128 + signum, stopped.stderr[-3000:]
    assert not (run_dir / "metrics.json").exists()
    assert f"received {signum.name}" in stopped.stderr + stopped.stdout
    last = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["epoch"] == 0 and last["global_step"] == 5

    resumed = _train(run_dir, data, "ckpt_path=last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a = uninterrupted
    b = json.loads((run_dir / "metrics.json").read_text())
    for key in ("test/acc", "test/loss", "val/loss"):
        assert b[key] == pytest.approx(a[key], abs=1e-6), key


# -- the pieces that make it exact, in-process ---------------------------------------------------------------
def test_epoch_seeded_sampler_is_a_function_of_seed_and_epoch():
    from datamodules.base import EpochSeededSampler

    def order(seed, epoch):
        s = EpochSeededSampler(50, seed)
        s.set_epoch(epoch)
        torch.manual_seed(epoch * 7 + 1)  # the global RNG must not matter
        return list(s)

    assert order(0, 3) == order(0, 3)
    assert sorted(i for i, _ in order(0, 3)) == list(range(50))
    assert len({seed for _, seed in order(0, 3)}) == 1  # one seed per epoch, carried with every index
    assert order(0, 3) != order(0, 4) and order(0, 3) != order(1, 3)


def _first_batch(data_dir, seed: int, epoch: int):
    from datamodules.fashion_mnist import FashionMNISTDataModule

    dm = FashionMNISTDataModule(data_dir=str(data_dir), batch_size=16, augment="flip_crop", input_size=32, seed=seed)
    loader = dm.train_dataloader()
    loader.sampler.set_epoch(epoch)
    return next(iter(loader))


def test_augmented_batches_repeat_exactly_with_the_same_seed(fmnist_dir):
    """albumentations transforms own their RNG: without reseeding, two runs with one seed augment differently."""
    x0, y0 = _first_batch(fmnist_dir, seed=5, epoch=2)
    x1, y1 = _first_batch(fmnist_dir, seed=5, epoch=2)
    assert torch.equal(y0, y1) and torch.equal(x0, x1)
    x2, _ = _first_batch(fmnist_dir, seed=6, epoch=2)
    assert not torch.equal(x0, x2)


def test_rng_states_round_trip_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np

    from callbacks.rng_state import collect_rng_states, set_rng_states

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    torch.save({"rng_states": collect_rng_states()}, tmp_path / "c.ckpt")
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_states(torch.load(tmp_path / "c.ckpt", weights_only=True)["rng_states"])
    again = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], again[0]) and np.array_equal(expected[1], again[1]) and expected[2] == again[2]
