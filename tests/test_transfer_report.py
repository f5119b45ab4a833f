"""``eval.py report=<bigan_transfer sweep>`` pivots the freeze-transfer runs into the Table 5.2 layout."""

from __future__ import annotations

import json

import pytest
import yaml

from engine.bigan.transfer_report import source_label, table_5_2
from transferrable.run.report import collect_runs, write_report

SOURCES = ["bigan:fashion_mnist", "null", "source:fashion_mnist"]  # the sweep's order in conf/experiment
LAYERS = ["conv1", "conv2", "conv3", "conv4", "conv5"]


def _write_run(job_dir, overrides: list[str], acc: float) -> None:
    (job_dir / ".hydra").mkdir(parents=True)
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job_dir / "metrics.json").write_text(json.dumps({"test/acc": acc, "test/loss": 1.0 - acc, "epoch": 2}))


def _acc(i: int, j: int) -> float:
    return 0.5 + 0.1 * i - 0.02 * j  # distinct per cell: source i, frozen up to conv(j+1)


def _fake_sweep(root, extra_seed: bool = False):
    job = 0
    for i, weights in enumerate(SOURCES):  # Hydra's job order: the last sweep parameter varies fastest
        for j, freeze in enumerate(LAYERS):
            # as Hydra writes a swept value into overrides.yaml: its ':' escaped
            _write_run(root / str(job), ["experiment=bigan_transfer", "backbone.weights=" + weights.replace(":", "\\:"),
                                         f"backbone.freeze={freeze}"], _acc(i, j))
            job += 1
    if extra_seed:  # a second seed of one cell: that cell becomes mean ± std
        _write_run(root / str(job), ["experiment=bigan_transfer", "backbone.weights=null", "backbone.freeze=conv3",
                                     "seed=1"], _acc(1, 2) + 0.04)
    return root


def test_table_5_2_pivot_rows_sources_columns_frozen_layers(tmp_path):
    report = write_report(_fake_sweep(tmp_path))
    lines = report.splitlines()
    start = lines.index("| frozen up to | conv1 | conv2 | conv3 | conv4 | conv5 |")
    rows = lines[start + 2:start + 5]
    labels = [r.split("|")[1].strip() for r in rows]
    assert labels == ["BiGAN (ours)", "Random", "Supervised (Fashion-MNIST)"]
    for i, row in enumerate(rows):
        cells = [float(c) for c in row.split("|")[2:7]]
        assert cells == pytest.approx([100 * _acc(i, j) for j in range(5)], abs=0.005)
    assert "Table 5.2" in report and (tmp_path / "report.md").read_text() == report
    assert report.count("| bigan\\:fashion_mnist |") == 5  # the per-run table is still there above it


def test_repeated_cells_average_and_missing_cells_dash(tmp_path):
    root = _fake_sweep(tmp_path / "a", extra_seed=True)
    (root / "14" / "metrics.json").unlink()  # supervised, conv5 never finished
    table = table_5_2(collect_runs(root))
    random = table["rows"][1]
    assert random["label"] == "Random"
    assert random["cells"][2] == pytest.approx([100 * (_acc(1, 2) + 0.02), 2.0])
    assert random["cells"][0] == pytest.approx([100 * _acc(1, 0)])  # one run: no std
    assert table["rows"][2]["cells"][4] is None and "mean ± std" in table["title"]
    assert "| Supervised (Fashion-MNIST) |" in write_report(root)


def test_no_pivot_for_sweeps_without_frozen_layers(tmp_path):
    for k, lr in enumerate(["0.1", "0.01"]):
        _write_run(tmp_path / str(k), [f"model.optimizer.lr={lr}"], 0.5 + k / 10)
    assert "Table 5.2" not in write_report(tmp_path)
    assert source_label("hub") == source_label("hub:imagenet") == "Supervised (ImageNet)"
    assert source_label("source:mnist") == "Supervised (MNIST)" and source_label("/x/bigan.ckpt") == "/x/bigan.ckpt"
