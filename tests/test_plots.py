"""The plots (transferrable/viz/): each file exists and its numbers (the JSON written beside every PNG) are the
table's -- the sweep report's knob plots, R-CNN's precision-recall curves, task=classify's confusion matrix."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest
import torch
import yaml
from conftest import compose_train, point_paths_at

import transferrable.run.runner as runner
from transferrable.viz.plot_files import data_path

MINI = ["backbone.widths=[16,32,32,32,32]", "backbone.fc_dim=64"]


# -- eval.py report=: each swept knob against the metric --------------------------------------------------
FREEZES = ["none", "conv3", "conv5", "fc7"]  # categorical: kept in this order
PER_CLASS = [10, 1, 5]  # numeric: sorted on the axis


def _fake_sweep(root):
    job = 0
    for freeze in FREEZES:
        for n in PER_CLASS:
            for seed in (0, 1):
                d = root / str(job)
                (d / ".hydra").mkdir(parents=True)
                (d / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(
                    [f"backbone.freeze={freeze}", f"dataset.train_per_class={n}", f"seed={seed}"]))
                acc = 0.3 + 0.05 * FREEZES.index(freeze) + 0.02 * math.log(n) + 0.01 * seed
                (d / "metrics.json").write_text(json.dumps({"test/acc": acc, "test/loss": 2 - acc, "note": "x"}))
                job += 1


def _table(markdown: str) -> tuple[list[str], list[list[str]]]:
    lines = markdown.split("\n\n")[0].strip().splitlines()
    return [c.strip() for c in lines[0].strip("|").split("|")], [[c.strip() for c in ln.strip("|").split("|")]
                                                                 for ln in lines[2:]]


def test_sweep_report_plots_each_knob_against_the_metric(tmp_path):
    from transferrable.run.report import write_report

    sweep = tmp_path / "multirun"
    _fake_sweep(sweep)
    report = write_report(sweep)
    header, rows = _table(report)
    col = {name: header.index(name) for name in ("backbone.freeze", "dataset.train_per_class", "seed", "test/acc")}
    assert not (sweep / "knob_seed.png").exists()  # seeds are averaged over, not plotted
    for knob, other in (("backbone.freeze", "dataset.train_per_class"), ("dataset.train_per_class", "backbone.freeze")):
        png = sweep / f"knob_{knob}.png"
        assert png.stat().st_size > 5000 and f"![knob_{knob}](knob_{knob}.png)" in report
        (panel,) = json.loads(data_path(png).read_text())["panels"]  # the headline metric only
        assert panel["metric"] == "test/acc"
        assert panel["numeric"] == (knob == "dataset.train_per_class")
        assert panel["ticks"] == (["1", "5", "10"] if panel["numeric"] else FREEZES)
        assert len(panel["series"]) == (4 if knob == "dataset.train_per_class" else 3)  # one per other value
        for s in panel["series"]:
            other_value = s["label"].split("=", 1)[1]
            for x, y, std, n in zip(s["x"], s["y"], s["std"], s["n"], strict=True):
                cells = [float(r[col["test/acc"]]) for r in rows
                         if r[col[knob]] == (str(int(x)) if panel["numeric"] else x) and r[col[other]] == other_value]
                assert n == len(cells) == 2
                assert y == pytest.approx(np.mean(cells), abs=1e-4)  # the table prints 4 decimals
                assert std == pytest.approx(np.std(cells, ddof=1), abs=1e-4)
    # named metrics: one panel each, the same points as the table
    write_report(sweep, ["test/acc", "test/loss"])
    panels = json.loads(data_path(sweep / "knob_backbone.freeze.png").read_text())["panels"]
    assert [p["metric"] for p in panels] == ["test/acc", "test/loss"]
    assert [a + b for a, b in zip(panels[0]["series"][0]["y"], panels[1]["series"][0]["y"], strict=True)] == \
        pytest.approx([2.0] * 4)


# -- R-CNN: per-class precision-recall curves ---------------------------------------------------------------
@pytest.mark.slow
def test_rcnn_pr_curves_are_the_tables_ap(fmnist_dir, tmp_path):
    from engine.rcnn.pipeline import run as rcnn_pipeline
    from transferrable.run.runner import build_datamodule, build_model, build_trainer

    cfg = point_paths_at(compose_train([
        "task=rcnn", "logger=none", "hardware=cpu", "trainer.precision=32-true", "backbone.weights=null",
        f"dataset.source_dir={fmnist_dir}", "dataset.n_train=10", "dataset.n_val=2", "dataset.n_test=8",
        "dataset.progress=false", "rcnn.proposals.mode=single", "rcnn.proposals.width=200",
        "rcnn.proposals.max_proposals=80", "rcnn.finetune.iterations=6", "trainer.max_epochs=1", "rcnn.layers=[fc7]",
        "rcnn.scoring=[svm]", "rcnn.draw_images=0", "rcnn.analysis=false", "++trainer.enable_progress_bar=false",
        "~callbacks.progress_bar", "~callbacks.model_summary", "~callbacks.lr_monitor",
        "trainer.enable_model_summary=false", "seed=0"]), tmp_path / "run", tmp_path / "cache")
    torch.manual_seed(0)
    dm = build_datamodule(cfg)
    rcnn_pipeline(cfg, build_trainer(cfg, []), dm, build_model(cfg, dm.num_classes))
    out = tmp_path / "run"
    record = json.loads((out / "rcnn_results.json").read_text())
    (table,) = json.loads((out / "tables.json").read_text())
    main = record["main"]
    row = next(r for r in table["rows"] if r["label"].endswith(main.replace("svm/", "").replace("+bb", " BB")))
    assert (out / "pr_curves.png").stat().st_size > 10000
    plotted = json.loads((out / "pr_curves.json").read_text())["classes"]
    assert [c["name"] for c in plotted] == record["classes"]
    for c, ap, cell in zip(plotted, record["results"][main]["ap"], row["cells"], strict=False):
        if c["ap"] is None:
            assert math.isnan(ap) and cell is None
            continue
        r, p = np.array(c["recall"]), np.array(c["precision"])
        assert (np.diff(r) > 0).all() and (np.diff(p) <= 1e-12).all()  # the monotone envelope
        assert float(np.sum(np.diff(np.concatenate([[0.0], r])) * p)) == pytest.approx(ap, abs=1e-9)  # its area
        assert c["ap"] == pytest.approx(ap) and 100 * ap == pytest.approx(cell[0])
    assert any(c["ap"] for c in plotted)  # some class was found at all


# -- task=classify: the test split's confusion matrix ---------------------------------------------------
def test_classify_writes_the_test_confusion_matrix(make_cfg, tmp_path):
    metrics = runner.train(make_cfg(*MINI))
    png = tmp_path / "run" / "confusion.png"
    assert png.stat().st_size > 5000
    data = json.loads(data_path(png).read_text())
    counts = np.array(data["counts"])
    assert counts.shape == (10, 10) and counts.sum() == 100  # limit_test_batches=1 of eval_batch_size 100
    assert np.trace(counts) / counts.sum() == pytest.approx(metrics["test/acc"], abs=1e-6)
    per_class = np.diag(counts) / np.maximum(counts.sum(1), 1)
    assert per_class[counts.sum(1) > 0].mean() == pytest.approx(metrics["test/mean_class_acc"], abs=1e-6)
    assert data["accuracy"] == pytest.approx(metrics["test/acc"], abs=1e-6)
    assert re.search(r"test split", data["title"])


def test_confusion_drawer_checks_its_input(tmp_path):
    from transferrable.metrics.classification import confusion_counts
    from transferrable.viz.confusion import plot_confusion

    counts = confusion_counts(np.array([0, 0, 1, 2, 2, 2]), np.array([0, 1, 1, 2, 2, 0]), 3)
    assert counts.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]
    plot_confusion(tmp_path / "c.png", counts, ["a", "b", "c"], "three classes")
    data = json.loads((tmp_path / "c.json").read_text())
    assert data["counts"] == counts.tolist() and data["accuracy"] == pytest.approx(4 / 6)
    assert data["rates"][2] == pytest.approx([1 / 3, 0, 2 / 3])
    with pytest.raises(ValueError, match="for 2 classes"):
        plot_confusion(tmp_path / "d.png", counts, ["a", "b"], "x")
