"""Progress bars (transferrable/core/progress.py): one tqdm style on stderr, shown only when enabled, on a terminal
and on rank 0; a pipeline stage shows its bar when the trainer's bar is on and none under refresh_rate=0."""

from __future__ import annotations

import pytest
import torch
from conftest import compose_train, point_paths_at

from transferrable.core.progress import assume_tty, progress, trainer_bars


def _count(n: int, **kw) -> int:
    return sum(1 for _ in progress(range(n), "counting things", **kw))


def test_bar_only_when_enabled_on_a_terminal_and_rank_zero(capsys, monkeypatch):
    assert _count(7) == 7  # not a terminal (captured): silent
    assert capsys.readouterr().err == ""
    with assume_tty():
        assert _count(7) == 7
        err = capsys.readouterr().err
        assert "counting things" in err and "/7 [" in err
        _count(7, leave=True)  # a kept bar ends at its total
        assert "7/7" in capsys.readouterr().err
        _count(7, enabled=False)
        assert capsys.readouterr().err == ""
        monkeypatch.setenv("LOCAL_RANK", "1")  # a DDP child before the process group exists
        _count(7)
        assert capsys.readouterr().err == ""


def test_trainer_bars_follow_lightnings_bar():
    from lightning.pytorch import Trainer
    from lightning.pytorch.callbacks import TQDMProgressBar

    def trainer(**kw):
        return Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_model_summary=False, **kw)

    assert trainer_bars(trainer(callbacks=[TQDMProgressBar(refresh_rate=20)]))
    assert not trainer_bars(trainer(callbacks=[TQDMProgressBar(refresh_rate=0)]))
    assert not trainer_bars(trainer(enable_progress_bar=False))


RCNN_TINY = ["task=rcnn", "logger=none", "hardware=cpu", "trainer.precision=32-true", "backbone.weights=null",
             "dataset.n_train=10", "dataset.n_val=2", "dataset.n_test=6", "rcnn.proposals.mode=single",
             "rcnn.proposals.width=200", "rcnn.proposals.max_proposals=80", "rcnn.finetune.iterations=4",
             "trainer.max_epochs=1", "rcnn.layers=[fc7]", "rcnn.scoring=[svm]", "rcnn.draw_images=0",
             "rcnn.analysis=false", "~callbacks.model_summary", "~callbacks.lr_monitor",
             "trainer.enable_model_summary=false", "seed=0"]


def rcnn_run(fmnist_dir, out, cache, *overrides):
    """A tiny task=rcnn run (generated scenes from the IDX fixture); returns its metrics."""
    from engine.rcnn.pipeline import run as rcnn_pipeline
    from transferrable.run.runner import build_datamodule, build_model, build_trainer

    cfg = point_paths_at(compose_train([*RCNN_TINY, f"dataset.source_dir={fmnist_dir}", *overrides]), out, cache)
    torch.manual_seed(0)
    dm = build_datamodule(cfg)
    model = build_model(cfg, dm.num_classes)
    return rcnn_pipeline(cfg, build_trainer(cfg, []), dm, model)


@pytest.mark.slow
def test_rcnn_stages_show_their_bars_and_a_disabled_run_none(fmnist_dir, tmp_path, capfd):
    with assume_tty():
        rcnn_run(fmnist_dir, tmp_path / "on", tmp_path / "cache", "dataset.progress=true")
        err = capfd.readouterr().err
        for bar in ("generating scenes", "rcnn: proposals (train)", "rcnn: proposals (test)", "rcnn: pool5 (train)",
                    "rcnn: pool5 (test)", "rcnn: fc7 SVM hard negatives"):
            assert bar in err, bar
        # the same stages again (new caches: every stage computes) with Lightning's bar off
        rcnn_run(fmnist_dir, tmp_path / "off", tmp_path / "cache2", "dataset.progress=false",
                 "callbacks.progress_bar.refresh_rate=0")
        err = capfd.readouterr().err
        assert "rcnn:" not in err and "generating" not in err and "it/s" not in err, err[-2000:]
