"""``python -m bench --quick`` in-process: every registered benchmark runs and writes well-formed records.

No timing assertions: the machine is shared, so only the shape and arithmetic of the records are checked.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from bench import registry
from bench.__main__ import main
from bench.registry import Figure, Stats, Target
from bench.report import COLUMNS, table


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    rc = main(["--quick", "--repeats", "2", "--out", str(out)])
    return rc, out, json.loads((out / "latest.json").read_text())


def _positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_quick_run_writes_json(quick_run):
    rc, out, result = quick_run
    assert rc == 0, result["benchmarks"]
    stamped = [p for p in out.glob("*.json") if p.name != "latest.json"]
    assert len(stamped) == 1 and json.loads(stamped[0].read_text()) == result
    m = result["machine"]
    assert m["cpu_model"] and m["cores"] >= 1 and m["torch_threads"] >= 1
    assert all(m["versions"][k] for k in ("torch", "lightning", "timm"))
    assert result["quick"] is True and result["repeats"] == 2


def test_every_benchmark_ran(quick_run):
    _, _, result = quick_run
    expected = {"training_loop", "cpu_efficiency", "input_pipeline", "startup", "decaf"}
    assert expected <= set(registry.load_all())
    assert set(result["benchmarks"]) == set(registry.load_all())
    assert all(b["error"] is None for b in result["benchmarks"].values())
    assert expected <= {f["benchmark"] for f in result["figures"]}


def test_records_are_well_formed(quick_run):
    _, _, result = quick_run
    for f in result["figures"]:
        v = f["value"]
        assert f["figure"] and f["unit"], f
        assert len(v["samples"]) == result["repeats"], f
        assert all(_positive(s) for s in v["samples"]), f
        assert v["min"] <= v["median"] <= v["max"], f
        ref = f["reference"]
        if ref is None:
            assert f["ratio"] is None and f["met"] is None
            continue
        assert ref["name"] and all(_positive(s) for s in ref["samples"]), f
        assert _positive(f["ratio"]) and f["ratio"] == pytest.approx(v["median"] / ref["median"]), f
        if f["target"] is not None:
            t = f["target"]
            assert f["met"] == (f["ratio"] >= t["value"] if t["op"] == ">=" else f["ratio"] <= t["value"])


def test_targets_from_the_issue(quick_run):
    _, _, result = quick_run
    targets = {(f["benchmark"], f["target"]["op"], f["target"]["value"]) for f in result["figures"] if f["target"]}
    assert ("training_loop", ">=", 0.95) in targets
    assert ("input_pipeline", ">=", 1.0) in targets
    assert ("decaf", ">=", 0.9) in targets


def test_markdown_table():
    fig = Figure("x/s", Stats([1.0, 3.0, 2.0]), "1/s", reference=Stats([4.0]), reference_name="ref")
    fig.target = Target(">=", 1)
    fig.benchmark = "demo"
    header, _, row, err = table([fig], {"broken": "RuntimeError: boom"}).splitlines()
    assert header == "| " + " | ".join(COLUMNS) + " |"
    assert row == "| demo | x/s | 2 [1–3] | 1/s | ref: 4 | 0.5 | >= 1 | **no** |"
    assert err.startswith("| broken | **error** |")


def test_only_selects_and_rejects_unknown_names(tmp_path, capsys):
    entries = registry.load_all()
    assert list(registry.select(entries, ["startup", "training_loop"])) == ["startup", "training_loop"]
    assert registry.select(entries, []) == entries
    assert main(["--only", "startup,no_such_bench", "--out", str(tmp_path)]) == 2
    assert "no_such_bench" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_registry_rejects_duplicates():
    @registry.benchmark("_test_dup")
    def a(ctx):
        return []

    try:
        with pytest.raises(ValueError, match="registered twice"):
            registry.benchmark("_test_dup")(lambda ctx: [])
    finally:
        registry.REGISTRY.pop("_test_dup")


def test_figure_ratio_and_met():
    f = Figure("f", Stats([2.0, 4.0, 100.0]), "s", reference=Stats([8.0]), target=Target("<=", 0.5))
    assert f.ratio == 0.5 and f.met is True
    assert Figure("g", Stats([1.0]), "s").ratio is None
    with pytest.raises(ValueError):
        Stats([])


def test_fashion_mnist_fixture_reads_back(tmp_path):
    from bench.suite import fashion_mnist_fixture
    from datamodules.idx import load_idx_split

    fashion_mnist_fixture(tmp_path, n_train=30, n_test=20)
    images, labels = load_idx_split(tmp_path, "train", "fixture", "")
    assert images.shape == (30, 28, 28) and images.dtype == np.uint8
    assert sorted(set(labels.tolist())) == list(range(10))
    assert load_idx_split(tmp_path, "t10k", "fixture", "")[0].shape == (20, 28, 28)
