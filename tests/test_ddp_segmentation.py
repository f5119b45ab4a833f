"""task=rcnn_segmentation on two DDP processes (``hardware=ddp_cpu``, gloo): segment proposals and region features
sharded by image through ``trainer.predict``, the feature cache entries saved once by rank 0, the regressors,
thresholds and IoU computed from the same rows, the outputs written once. Compared with one process."""

from __future__ import annotations

import json

import numpy as np
import pytest
from kill_switch import run_train

# tests/test_determinism.py's tiny rcnn_segmentation run (fine-tuning off: the thesis's frozen source network), quiet
SEG = ["task=rcnn_segmentation", "backbone.weights=null", "dataset.n_train=6", "dataset.n_val=3", "dataset.n_test=3",
       "dataset.progress=false", "rcnn_segmentation.segments.max_regions=30", "rcnn_segmentation.segments.scales=[150]",
       "rcnn_segmentation.layers=[fc6]", "rcnn_segmentation.draw_images=0", "rcnn_segmentation.finetune=none",
       "logger=csv", "trainer.precision=32-true", "seed=0", "trainer.enable_model_summary=false",
       "callbacks.progress_bar.refresh_rate=0"]
TWO = ["hardware=ddp_cpu", "trainer.devices=2"]


@pytest.mark.slow
def test_rcnn_segmentation_on_two_processes_gives_the_one_process_iou(fmnist_dir, tmp_path):
    """Each image's segments and feature rows are computed the same way whichever rank takes it. The fc6 rows are
    not byte-identical: Lightning's CPU DDP gives each process cores // processes torch threads, so the matmuls sum
    in another order; the float16 entries differ by at most one rounding step (tolerance 2e-3 x the largest value,
    float16's relative step is 2^-10). Those differences did not move a regressor's thresholded labels here: every
    IoU (and the chosen variant) is the same, checked exactly (1e-9, the float round trip through metrics.json)."""
    runs = {}
    for n in (1, 2):
        run_dir = tmp_path / f"p{n}"
        done = run_train(SEG, run_dir, f"dataset.source_dir={fmnist_dir}", f"paths.cache_dir={tmp_path / f'cache{n}'}",
                         *(TWO if n == 2 else []))
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("run directory :") == 1
        assert [p.name for p in (run_dir / "csv").iterdir()] == ["version_0"]
        runs[n] = json.loads((run_dir / "metrics.json").read_text())
        assert (run_dir / "tables.json").is_file() and (run_dir / "segmentation_results.json").is_file()
    info = json.loads((tmp_path / "p2" / "segmentation_results.json").read_text())["info"]
    assert info["feature_cache"]["feature_images_by_rank_test"] == [2, 1], info["feature_cache"]
    assert sum(info["feature_cache"]["feature_images_by_rank_train"]) == info["images"]["train"]
    ious = [k for k in runs[1] if k.endswith("mean_iou") or k.endswith("best_region_overlap")]
    assert "test/mean_iou" in ious and "test/full/fc6/mean_iou" in ious, ious
    print("2 processes vs 1:", {k: (runs[2][k], runs[1][k]) for k in ious})
    for k in ious:
        assert runs[2][k] == pytest.approx(runs[1][k], abs=1e-9), k
    assert runs[2]["rcnn_segmentation/main"] == runs[1]["rcnn_segmentation/main"]
    # one committed entry per (split, kind, layer), no scratch file left, the same rows as one process wrote
    one = sorted(p.name for p in (tmp_path / "cache1" / "features").iterdir())
    two = sorted(p.name for p in (tmp_path / "cache2" / "features").iterdir())
    assert one == two and not [n for n in two if n.startswith(".")], (one, two)
    for name in (n for n in one if n.endswith(".npy")):
        a = np.load(tmp_path / "cache1" / "features" / name)
        b = np.load(tmp_path / "cache2" / "features" / name)
        diff = float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max())
        print(name, "max |2 - 1|", diff, "max |1|", float(np.abs(a.astype(np.float32)).max()))
        assert diff <= 2e-3 * max(1.0, float(np.abs(a.astype(np.float32)).max())), (name, diff)
