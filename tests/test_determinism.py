"""Determinism: every task, run twice in-process from the same composed config and seed, gives the same metrics
on CPU. The two runs use separate output *and* cache directories, so the second one rebuilds every cache
(generated scenes, videos, proposals, segments, features, vocabularies) and the cache building is checked too."""

from __future__ import annotations

import math

import pytest
from conftest import compose_train, point_paths_at, tiny_overrides

MINI = ["backbone.widths=[8,16,16,16,16]", "backbone.fc_dim=32"]
QUIET = ["logger=none", "hardware=cpu", "trainer.precision=32-true", "seed=0", "trainer.enable_model_summary=false",
         "++trainer.enable_progress_bar=false", "~callbacks.progress_bar", "~callbacks.model_summary",
         "~callbacks.lr_monitor"]

# one tiny run per task; sizes as small as the other tests' (tests/test_<task>.py) or smaller
TASKS: dict[str, list[str]] = {
    "classify": [*MINI, "trainer.deterministic=true"],
    "decaf": ["task=decaf", "dataset=fashion_mnist", *MINI, "backbone.weights=null", "decaf.splits=2",
              "decaf.max_images=120", "decaf.train_per_class=4", "decaf.C_grid=[0.1,10]", "decaf.dropout_copies=2",
              "decaf.bf16=false", "decaf.tsne.enabled=false", "decaf.features=[fc6,raw]",
              "decaf.classifiers=[logreg,svm_dropout]"],
    "rcnn": ["task=rcnn", "backbone.weights=null", "dataset.n_train=6", "dataset.n_val=2", "dataset.n_test=4",
             "dataset.progress=false", "rcnn.proposals.mode=single", "rcnn.proposals.width=160",
             "rcnn.proposals.max_proposals=60", "rcnn.finetune.iterations=3", "rcnn.finetune.positives=8",
             "rcnn.finetune.background=24", "trainer.max_epochs=1", "rcnn.layers=[pool5,fc7]",
             "rcnn.scoring=[svm,softmax]", "rcnn.draw_images=0", "rcnn.analysis=false",
             "rcnn.finetune_eval_batches=1", "rcnn.grayscale_source=false"],
    "rcnn_segmentation": ["task=rcnn_segmentation", "backbone.weights=null", "dataset.n_train=6", "dataset.n_val=3",
                          "dataset.n_test=3", "dataset.progress=false", "rcnn_segmentation.segments.max_regions=30",
                          "rcnn_segmentation.segments.scales=[150]", "rcnn_segmentation.layers=[fc6]",
                          "rcnn_segmentation.draw_images=0"],
    "lrcn_activity": ["task=lrcn_activity", "backbone.weights=null", "backbone.input_size=16", *MINI,
                      "backbone.pool5_size=2", "lrcn.hidden_rgb=16", "trainer.max_epochs=1",
                      "dataset.actions=[MoveLeft,MoveRight]", "dataset.clips_per_group=2", "dataset.num_frames=8",
                      "dataset.video_size=20", "dataset.frame_size=[20,20]", "dataset.batch_size=4",
                      "dataset.val_groups=0", "dataset.progress=false", "~callbacks.model_checkpoint",
                      "++trainer.enable_checkpointing=false"],
    "lrcn_caption": ["task=lrcn_caption", "backbone.weights=null", "dataset.n_train=12", "dataset.n_val=4",
                     "dataset.n_test=6", "dataset.image_size=[96,72]", "dataset.max_objects=2",
                     "dataset.progress=false", "dataset.vocab_min_count=2", "dataset.batch_size=8", "lrcn.hidden=32",
                     "lrcn.embed=16", "trainer.max_epochs=1", "lrcn.metrics.meteor=none", "lrcn.metrics.java=false",
                     "lrcn.decoders=[greedy]", "lrcn.retrieval.images=6", "lrcn.show_images=0"],
    "lrcn_video_description": ["task=lrcn_video_description", "dataset.n_train=30", "dataset.n_val=6",
                               "dataset.n_test=8", "dataset.vocab_min_count=2", "video.hidden=16", "video.embed=8",
                               "trainer.max_epochs=1", "video.java=false"],
    "bigan": ["task=bigan", "bigan.hidden=[32,32]", "bigan.latent_dim=8", "bigan.bn_batches=2",
              "bigan.probe_max_train=200", "++trainer.limit_val_batches=null", "trainer.max_epochs=1"],
}
# wall-clock timings and file locations differ between two identical runs by nature
NOT_COMPARED = ("time", "seconds", "per_s", "checkpoint", "_path")


def _run(task: str, data_dir, where):
    from transferrable.run.runner import train

    if task in ("classify", "decaf", "bigan", "lrcn_video_description"):  # the IDX fixture (or no images at all)
        base = tiny_overrides(data_dir)
        overrides = base + [o for o in QUIET if o not in base]
    else:  # generated scenes and videos, built from the fixture's item images
        overrides = [*QUIET, f"dataset.source_dir={data_dir}"]
    cfg = point_paths_at(compose_train([*overrides, *TASKS[task]]), where / "run", where / "cache")
    return train(cfg)


def _comparable(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items()
            if isinstance(v, int | float) and not any(s in k for s in NOT_COMPARED)}


@pytest.mark.parametrize("task", list(TASKS))
def test_same_config_and_seed_twice_gives_the_same_metrics(task, fmnist_dir, tmp_path, recwarn):
    first = _comparable(_run(task, fmnist_dir, tmp_path / "a"))
    second = _comparable(_run(task, fmnist_dir, tmp_path / "b"))
    assert first and first.keys() == second.keys()
    different = {k: (first[k], second[k]) for k in first
                 if not (first[k] == second[k] or (math.isnan(first[k]) and math.isnan(second[k]))
                         or abs(first[k] - second[k]) <= 1e-6)}
    assert not different, different
