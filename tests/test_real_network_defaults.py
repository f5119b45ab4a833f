"""Issue 27: a transfer command on the real network starts its own work at once on a fresh clone.

- Every task whose default representation is a self-trained source (``backbone.weights: source:...``) uses the ImageNet
  weights of ``backbone=efficientnet_lite0`` / ``efficientnet_lite2`` instead (conf/task_backbone), with the weights'
  own statistics on every dataset node the task reads; ``backbone.weights=source:<dataset>`` still opts back in.
- End to end: ``train.py task=decaf backbone=efficientnet_lite0`` pretrains no source.
"""

from __future__ import annotations

import json
import os

import pytest
from conftest import CONF_DIR, ROOT, compose_train
from hydra.core.global_hydra import GlobalHydra
from zygote import run_script

from transferrable.run.runner import _statistics_nodes, apply_hub_normalisation

BACKBONES = ("efficientnet_lite0", "efficientnet_lite2")


def compose(overrides: list[str]):
    try:
        return compose_train(overrides)
    finally:
        GlobalHydra.instance().clear()


def source_tasks() -> list[str]:
    """Every conf/task option whose composed default weights are a self-trained source."""
    tasks = []
    for path in sorted((CONF_DIR / "task").glob("*.yaml")):
        weights = (compose([f"task={path.stem}"]).get("backbone") or {}).get("weights")
        if isinstance(weights, str) and weights.startswith("source:"):
            tasks.append(path.stem)
    return tasks


SOURCE_TASKS = source_tasks()


def test_the_source_tasks_are_found():
    # the enumeration itself: the transfer tasks of chapters 2-4, and not the ones that train their own network
    assert {"decaf", "decaf_domain", "rcnn", "rcnn_segmentation", "lrcn_caption", "lrcn_activity"} <= set(SOURCE_TASKS)
    assert not {"classify", "bigan", "lrcn_video_description"} & set(SOURCE_TASKS)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("task", SOURCE_TASKS)
def test_the_real_network_is_the_default(task, backbone):
    cfg = compose([f"task={task}", f"backbone={backbone}"])
    assert cfg.backbone.weights == "hub", (task, backbone)
    # the hub weights' statistics reach the task's dataset and every other node a backbone reads (decaf_domain.target)
    apply_hub_normalisation(cfg)
    nodes = dict(_statistics_nodes(cfg))
    assert "dataset" in nodes and (task != "decaf_domain" or "decaf_domain.target" in nodes)
    for where, node in nodes.items():
        assert (list(node.mean), list(node.std)) == ([0.5] * 3, [0.5] * 3), (task, backbone, where)
    # a tap the task reads is a pretrained one (EfficientNet's fc6/fc7 are added at random) unless the task trains it
    reads = {"decaf": cfg.get("decaf", {}).get("features"), "lrcn": [cfg.get("lrcn", {}).get("tap")],
             "rcnn_segmentation": cfg.get("rcnn_segmentation", {}).get("layers")}
    for what, taps in reads.items():
        if what in cfg and taps:
            assert not {"fc6", "fc7"} & set(taps), (task, backbone, what, taps)


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("task", SOURCE_TASKS)
def test_a_source_on_the_command_line_still_wins(task, backbone):
    cfg = compose([f"task={task}", f"backbone={backbone}", "backbone.weights=source:fashion_mnist"])
    assert cfg.backbone.weights == "source:fashion_mnist"


def test_decaf_on_lite0_starts_without_pretraining_a_source(tmp_path):
    """The issue's command, tiny: the ImageNet weights load offline and DeCAF runs on their pool5; no source is
    pretrained (nor looked up), and the inputs get the weights' own statistics."""
    run_dir = tmp_path / "run"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFERRABLE_CACHE": str(tmp_path / "cache")}
    env.pop("TRANSFERRABLE_TRACEBACK", None)
    p = run_script(["train.py", "task=decaf", "backbone=efficientnet_lite0", "dataset=digits", "logger=none",
                    "hardware=cpu", "trainer.precision=32-true", "backbone.input_size=32", "decaf.max_images=100",
                    "decaf.train_per_class=3", "decaf.splits=1", "decaf.C_grid=[1.0]", "decaf.classifiers=[logreg]",
                    "decaf.bf16=false", "decaf.tsne.enabled=false", "decaf.plot=false",
                    f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={run_dir}"],
                   cwd=ROOT, env=env, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    log = p.stdout + p.stderr + (run_dir / "decaf.log").read_text()
    assert "pretraining" not in log and "source representation" not in log, log[-3000:]
    assert "backbone.weights=hub: dataset.mean" in log, log[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert 0.0 <= metrics["test/mean_class_acc"] <= 1.0
    assert not (tmp_path / "cache" / "source").exists()  # source_cache: nothing written, nothing looked up
