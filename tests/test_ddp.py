"""Two DDP processes on CPU (``hardware=ddp_cpu``, gloo): the run's outputs are written once, by rank 0, after the
metrics are reduced over both processes, so they equal what one process computes on the whole split."""

from __future__ import annotations

import json

import pytest
from kill_switch import run_train
from omegaconf import OmegaConf

from transferrable.run.runner import evaluate_checkpoint

DDP = ["hardware=ddp_cpu", "trainer.devices=2", "logger=csv", "trainer.precision=32-true", "dataset.batch_size=32",
       "dataset.eval_batch_size=50", "trainer.max_epochs=4", "trainer.enable_model_summary=false",
       "callbacks.progress_bar.refresh_rate=0", "backbone.widths=[8,16,16,16,16]", "backbone.fc_dim=32", "seed=0"]


@pytest.mark.slow
def test_two_processes_write_once_and_reduce_over_the_whole_split(fmnist_dir, tmp_path):
    run_dir = tmp_path / "ddp"
    done = run_train(DDP, run_dir, f"dataset.data_dir={fmnist_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run directory :") == 1  # one summary, not one per rank
    assert [p.name for p in (run_dir / "csv").iterdir()] == ["version_0"]  # one logger run
    metrics = json.loads((run_dir / "metrics.json").read_text())
    # the checkpoint the DDP run tested, tested again by one process over the same 200 images: the same numbers,
    # so the test loss was reduced over both ranks (each saw 100), not taken from whichever rank wrote last
    one = evaluate_checkpoint(OmegaConf.create({"ckpt_path": metrics["test_checkpoint"],
                                                "trainer": {"devices": 1, "strategy": "auto"}}))
    print("2 processes vs 1:", {k: (metrics[k], one[k]) for k in ("test/acc", "test/loss")})
    assert metrics["test/acc"] == pytest.approx(one["test/acc"], abs=1e-6)
    assert metrics["test/loss"] == pytest.approx(one["test/loss"], abs=1e-5)


@pytest.mark.slow
def test_a_two_job_sweep_through_submitit_local(fmnist_dir, tmp_path):
    """``hydra/launcher=submitit_local``, the launcher family of ``hardware=slurm``: both jobs run and write their
    own metrics.json under the sweep directory."""
    import sys

    from kill_switch import ROOT
    from zygote import run_script

    tiny = [x for x in DDP if not x.startswith(("hardware=", "trainer.devices=", "trainer.max_epochs=", "seed="))]
    tiny.append("trainer.max_epochs=1")
    cmd = [sys.executable, "train.py", "-m", "hydra/launcher=submitit_local", "hydra.launcher.timeout_min=5",
           f"hydra.sweep.dir={tmp_path / 'sweep'}", f"dataset.data_dir={fmnist_dir}", "seed=0,1", *tiny]
    done = run_script(cmd[1:], cwd=ROOT, timeout=600)  # the sweep's controller forked from the zygote
    assert done.returncode == 0, done.stderr[-3000:]
    found = sorted(tmp_path.glob("sweep/*/metrics.json"))
    assert [p.parent.name for p in found] == ["0", "1"], done.stdout[-2000:]
    accs = [json.loads(p.read_text())["test/acc"] for p in found]
    assert all(0.0 <= a <= 1.0 for a in accs)


DECAF = ["task=decaf", "dataset=fashion_mnist", "logger=csv", "trainer.precision=32-true", "backbone.weights=null",
         "backbone.widths=[8,16,16,16,16]", "backbone.fc_dim=32", "decaf.splits=2", "decaf.max_images=120",
         "decaf.train_per_class=4", "decaf.C_grid=[0.1,10]", "decaf.dropout_copies=2", "decaf.tsne.enabled=false",
         "decaf.features=[fc6,raw,random:fc6]", "decaf.classifiers=[logreg,svm_dropout]", "dataset.eval_batch_size=25",
         "callbacks.progress_bar.refresh_rate=0", "trainer.enable_model_summary=false", "seed=0"]


DECAF_DOMAIN = ["task=decaf_domain", "dataset=mnist", "logger=csv", "trainer.precision=32-true",
                "backbone.weights=null", "backbone.widths=[8,16,16,16,16]", "backbone.fc_dim=32", "decaf.splits=2",
                "decaf.features=[fc6,raw]", "decaf.classifiers=[logreg]", "decaf.C_grid=[1]", "decaf.tsne.enabled=false",
                "dataset.eval_batch_size=100", "callbacks.progress_bar.refresh_rate=0",
                "trainer.enable_model_summary=false", "seed=0"]


@pytest.mark.slow
@pytest.mark.parametrize("task", ["decaf", "decaf_domain"])
def test_decaf_features_sharded_over_two_processes_give_the_one_process_results(fmnist_dir, tmp_path, task):
    """task=decaf on 2 processes: each rank predicts its unpadded shard, the rows are gathered back in pool order,
    and every classifier result equals the 1-process run. Tolerance: raw pixels are identical; fc6 rows differ by
    float rounding (~1e-6: oneDNN picks kernels by batch size), which changed no accuracy here."""
    import numpy as np

    runs = {}
    base, data = (DECAF, [f"dataset.data_dir={fmnist_dir}"]) if task == "decaf" else (DECAF_DOMAIN, [])
    for n in (1, 2):
        extra = ["hardware=ddp_cpu", "trainer.devices=2"] if n == 2 else []
        done = run_train(base, tmp_path / f"p{n}", *data, f"paths.cache_dir={tmp_path / f'cache{n}'}", *extra)
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("run directory :") == 1
        runs[n] = json.loads((tmp_path / f"p{n}" / "metrics.json").read_text())
    accs = [k for k, v in runs[1].items() if k.startswith("test/") and isinstance(v, float)]
    assert len(accs) >= 6
    for k in accs:
        assert runs[2][k] == pytest.approx(runs[1][k], abs=1e-6), k
    for name, tol in (("raw", 0.0), ("fc6", 1e-5)):
        files = sorted((tmp_path / "cache1" / "features").glob(f"{name}-*.npy"))
        assert files, name
        for one_file in files:
            one, two = np.load(one_file), np.load(tmp_path / "cache2" / "features" / one_file.name)
            np.testing.assert_allclose(two, one, rtol=0, atol=tol)  # same key, same rows in pool order


def test_a_pipeline_not_written_for_ddp_is_refused_in_one_line(tmp_path, fmnist_dir):
    """Every task's pipeline runs under DDP; one not marked ``rank_aware`` (here a pipeline ``_target_`` that
    is not rank-aware) stops before any work, naming the override."""
    from conftest import compose_train, point_paths_at, tiny_overrides

    from transferrable.core.errors import ConfigError
    from transferrable.run.runner import train

    overrides = [o for o in tiny_overrides(fmnist_dir) if not o.startswith(("dataset.data_dir", "dataset.augment"))]
    cfg = point_paths_at(compose_train([*overrides, "task=classify", "pipeline._target_=engine.single_fit.plain_metrics",
                                        "hardware=ddp_cpu", "trainer.precision=32-true"]), tmp_path)
    with pytest.raises(ConfigError, match=r"trainer.devices=2 .*\(engine.single_fit.plain_metrics\) runs on one process"):
        train(cfg)
    assert not (tmp_path / "metrics.json").exists()


LRCN = ["task=lrcn_activity", "logger=csv", "trainer.precision=32-true", "seed=0", "backbone.weights=null",
        "backbone.input_size=16",
        "backbone.widths=[8,16,16,16,16]", "backbone.fc_dim=32", "backbone.pool5_size=2", "lrcn.hidden_rgb=32",
        "trainer.max_epochs=2", "dataset.actions=[MoveLeft,MoveRight]", "dataset.clips_per_group=1",
        "dataset.n_groups=22", "dataset.num_frames=16", "dataset.video_size=20", "dataset.frame_size=[20,20]",
        "dataset.batch_size=2", "dataset.val_groups=1", "dataset.progress=false",
        "callbacks.progress_bar.refresh_rate=0", "trainer.enable_model_summary=false"]


@pytest.mark.slow
def test_lrcn_on_two_processes_scores_every_video_once(fmnist_dir, tmp_path):
    """lrcn_activity on 2 processes: the frames cache is built once (prepare_data, before the ranks start), each
    rank scores its shard of the test videos, and the video accuracy is over every video, once: the 2-process run's
    test numbers equal its checkpoint tested by one process, and video_scores.npz holds each test video once."""
    from engine.lrcn.scores import load_video_scores

    run_dir = tmp_path / "ddp"
    done = run_train(LRCN, run_dir, f"dataset.source_dir={fmnist_dir}", f"paths.cache_dir={tmp_path / 'cache'}",
                     "hardware=ddp_cpu", "trainer.devices=2")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run directory :") == 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    saved = load_video_scores(run_dir / "video_scores.npz")
    test_list = next((tmp_path / "cache").rglob("testlist01.txt")).read_text().split()
    assert len(test_list) >= 4  # every test video of the split, each once (a rank alone has about half)
    assert len(saved["videos"]) == len(set(saved["videos"])) == len(test_list), (saved["videos"], test_list)
    one = evaluate_checkpoint(OmegaConf.create({"ckpt_path": metrics["test_checkpoint"],
                                                "trainer": {"devices": 1, "strategy": "auto"}}))
    print("2 processes vs 1:", {k: (metrics[k], one[k]) for k in ("test/acc", "test/mean_class_acc")})
    for key in ("test/acc", "test/mean_class_acc"):
        assert metrics[key] == pytest.approx(one[key], abs=1e-6), key
    assert float((saved["scores"].argmax(1) == saved["labels"]).mean()) == pytest.approx(metrics["test/acc"])
