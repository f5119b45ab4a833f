"""task=rcnn on two DDP processes (``hardware=ddp_cpu``, gloo): proposals and pool5 sharded by image through
``trainer.predict``, the pool5 memmaps committed once by rank 0, SVMs/box regression/NMS/AP computed from them, the
outputs written once. Compared with one process on the same config."""

from __future__ import annotations

import json

import numpy as np
import pytest
from kill_switch import run_train

# tests/test_determinism.py's tiny rcnn run on generated scenes, quiet
RCNN = ["task=rcnn", "backbone.weights=null", "dataset.n_train=6", "dataset.n_val=2", "dataset.n_test=4",
        "dataset.progress=false", "rcnn.proposals.mode=single", "rcnn.proposals.width=160",
        "rcnn.proposals.max_proposals=60", "rcnn.finetune.iterations=4", "rcnn.finetune.positives=8",
        "rcnn.finetune.background=24", "trainer.max_epochs=1", "rcnn.draw_images=0", "rcnn.analysis=false",
        "rcnn.finetune_eval_batches=1", "rcnn.grayscale_source=false", "logger=csv", "trainer.precision=32-true",
        "seed=0", "trainer.enable_model_summary=false", "callbacks.progress_bar.refresh_rate=0"]
# no fine-tuning (frozen backbone, SVM scoring only): both runs score the same network
FROZEN = ["backbone.freeze=all", "rcnn.scoring=[svm]", "rcnn.layers=[pool5,fc7]"]
TWO = ["hardware=ddp_cpu", "trainer.devices=2"]


@pytest.mark.slow
def test_rcnn_on_two_processes_gives_the_one_process_detections(fmnist_dir, tmp_path):
    """Without fine-tuning both runs use the same network: each image's pool5 rows are computed the same way
    whichever rank takes it, so the pool5 memmaps are byte-identical and every AP is the same. Tolerance: exact
    (1e-9 for the float round trip through metrics.json)."""
    runs = {}
    for n in (1, 2):
        run_dir = tmp_path / f"p{n}"
        done = run_train([*RCNN, *FROZEN], run_dir, f"dataset.source_dir={fmnist_dir}",
                         f"paths.cache_dir={tmp_path / f'cache{n}'}", *(TWO if n == 2 else []))
        assert done.returncode == 0, done.stderr[-3000:]
        assert done.stdout.count("run directory :") == 1
        assert [p.name for p in (run_dir / "csv").iterdir()] == ["version_0"]
        runs[n] = json.loads((run_dir / "metrics.json").read_text())
        assert (run_dir / "tables.json").is_file() and (run_dir / "rcnn_results.json").is_file()
    info = json.loads((tmp_path / "p2" / "rcnn_results.json").read_text())["info"]
    assert info["pool5_images_by_rank_test"] == [2, 2] and sum(info["pool5_images_by_rank_train"]) == 6, info
    aps = [k for k in runs[1] if k.startswith("test/") and k.endswith("mAP")]
    assert "test/mAP" in aps and len(aps) >= 3, aps
    print("2 processes vs 1:", {k: (runs[2][k], runs[1][k]) for k in aps})
    for k in aps + ["rcnn/proposal_recall"]:
        assert runs[2][k] == pytest.approx(runs[1][k], abs=1e-9), k
    # one committed entry per split, no partial or progress file left, the same rows as one process wrote
    one = sorted(p.name for p in (tmp_path / "cache1" / "rcnn_features").iterdir())
    two = sorted(p.name for p in (tmp_path / "cache2" / "rcnn_features").iterdir())
    assert one == two and not [n for n in two if n.startswith(".")], (one, two)
    for name in (n for n in one if n.endswith(".dat")):
        a = np.fromfile(tmp_path / "cache1" / "rcnn_features" / name, np.uint8)
        b = np.fromfile(tmp_path / "cache2" / "rcnn_features" / name, np.uint8)
        assert np.array_equal(a, b), name


@pytest.mark.slow
def test_rcnn_fine_tunes_on_two_processes(fmnist_dir, tmp_path):
    """Fine-tuning (svm + softmax) on 2 processes: Lightning's DDP fit (each rank its share of the minibatches,
    gradients averaged: another network than one process trains, so no comparison of the numbers), the fine-tuned
    network cached once, by rank 0, and one metrics.json."""
    run_dir = tmp_path / "ddp"
    done = run_train(RCNN, run_dir, f"dataset.source_dir={fmnist_dir}", f"paths.cache_dir={tmp_path / 'cache'}",
                     "rcnn.layers=[fc7]", "rcnn.scoring=[svm,softmax]", *TWO)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run directory :") == 1
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["rcnn/finetuned"] is True
    assert 0.0 <= metrics["test/mAP"] <= 1.0 and 0.0 <= metrics["test/softmax/fc7/mAP"] <= 1.0
    assert len(list((tmp_path / "cache" / "rcnn_finetune").glob("*.pt"))) == 1
