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

# The entries that time whole train.py commands (subprocesses, DDP ranks): tests/test_bench_heavy.py runs them with
# one repeat, in a module of its own, so that pytest-xdist runs them beside the others instead of after them.
HEAVY = ("ddp_scaling", "ddp_rcnn", "source_pretraining", "main_job", "memory")
# the targets issue by issue, per benchmark
ISSUE_TARGETS = {("training_loop", ">=", 0.95), ("input_pipeline", ">=", 1.0),
                 ("efficientnet", ">=", 0.9),  # issue 27: Lite0 features through the suite vs bare timm
                 ("decaf", ">=", 0.9),
                 ("decaf_fits", ">=", 6.0),  # torch fits vs scikit-learn: the 101-class table in <= 10 min
                 ("voc_ap", ">=", 1.0),  # every class's AP identical to the reference implementation
                 ("memory", "<=", 1.1)}  # same peak at twice the cache


def run_quick(tmp_path_factory, names: list[str], repeats: int):
    """``python -m bench --quick --only <names> --repeats <repeats>`` in-process: (rc, out dir, record, names)."""
    out = tmp_path_factory.mktemp("bench")
    # the entries that start train.py (ddp_rcnn: generated scenes) write their caches here, not in <repo>/.cache,
    # which parallel test workers would share
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRANSFERRABLE_CACHE", str(tmp_path_factory.mktemp("bench_cache")))
        rc = main(["--quick", "--only", ",".join(names), "--repeats", str(repeats), "--out", str(out)])
    return rc, out, json.loads((out / "latest.json").read_text()), list(names)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    # one repeat: each entry's code runs the same way for any count; aggregating several samples (median, min/max,
    # ratio of medians) is checked on hand-made Stats below
    return run_quick(tmp_path_factory, [n for n in registry.load_all() if n not in HEAVY], repeats=1)


def _positive(x) -> bool:
    return isinstance(x, int | float) and math.isfinite(x) and x > 0


def test_quick_run_writes_json(quick_run):
    rc, out, result, _ = quick_run
    assert rc == 0, result["benchmarks"]
    stamped = [p for p in out.glob("*.json") if p.name != "latest.json"]
    assert len(stamped) == 1 and json.loads(stamped[0].read_text()) == result
    m = result["machine"]
    assert m["cpu_model"] and m["cores"] >= 1 and m["torch_threads"] >= 1
    assert all(m["versions"][k] for k in ("torch", "lightning", "timm"))
    assert result["quick"] is True and result["repeats"] in (1, 2)


def test_every_benchmark_ran(quick_run):
    _, _, result, names = quick_run
    expected = {"training_loop", "cpu_efficiency", "input_pipeline", "startup", "decaf", "voc_ap", "caption_metrics",
                "memory", "scaling", "efficientnet"}
    assert expected <= set(registry.load_all()) and set(HEAVY) <= set(registry.load_all())
    assert set(result["benchmarks"]) == set(names)
    assert all(b["error"] is None for b in result["benchmarks"].values()), result["benchmarks"]
    assert set(names) == {f["benchmark"] for f in result["figures"]}  # every entry gave figures


def test_records_are_well_formed(quick_run):
    _, _, result, _ = quick_run
    for f in result["figures"]:
        v = f["value"]
        assert f["figure"] and f["unit"], f
        # peak RSS is measured once per size (one process each); timings once per repeat
        assert len(v["samples"]) == (1 if f["benchmark"] == "memory" else result["repeats"]), f
        if f["unit"] == "exponent":  # a fitted growth exponent may be <= 0 at tiny, noisy sizes
            assert all(math.isfinite(s) for s in v["samples"]), f
        else:
            assert all(_positive(s) for s in v["samples"]), f
        assert v["min"] <= v["median"] <= v["max"], f
        ref = f["reference"]
        if ref is None:
            assert f["ratio"] is None and f["met"] is None
            continue
        assert ref["name"] and all(_positive(s) for s in ref["samples"]), f
        ratio_ok = math.isfinite(f["ratio"]) if f["unit"] == "exponent" else _positive(f["ratio"])
        assert ratio_ok and f["ratio"] == pytest.approx(v["median"] / ref["median"]), f
        if f["target"] is not None:
            t = f["target"]
            assert f["met"] == (f["ratio"] >= t["value"] if t["op"] == ">=" else f["ratio"] <= t["value"])


def test_targets_from_the_issue(quick_run):
    _, _, result, names = quick_run
    targets = {(f["benchmark"], f["target"]["op"], f["target"]["value"]) for f in result["figures"] if f["target"]}
    assert {t[0] for t in ISSUE_TARGETS} <= set(registry.load_all())
    assert {t for t in ISSUE_TARGETS if t[0] in names} <= targets


def test_evaluator_entries_agree_with_their_references(quick_run):
    _, _, result, _ = quick_run
    figs = {f["figure"]: f for f in result["figures"] if f["benchmark"] in ("voc_ap", "memory", "scaling")}
    identical = next(f for name, f in figs.items() if name.startswith("VOC AP classes identical"))
    assert identical["met"] is True and identical["value"]["median"] == identical["reference"]["median"]
    captions = [f for f in result["figures"] if f["benchmark"] == "caption_metrics"]
    assert {"BLEU-1..4", "ROUGE-L", "CIDEr"} <= {f["figure"].rsplit(": ", 1)[1] for f in captions}
    growth = [f for f in figs.values() if f["unit"] == "exponent"]
    assert len(growth) == 4 and all(f["reference"]["median"] == 1.0 for f in growth)


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
    assert list(registry.select(entries, ["evaluators"])) == ["caption_metrics", "voc_ap"]  # a module's entries
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


def test_loglog_slope_recovers_exponents():
    from bench.growth import growth_figure, loglog_slope, measure_growth

    sizes = [10, 20, 40, 80]
    assert loglog_slope(sizes, [3 * s for s in sizes]) == pytest.approx(1.0)
    assert loglog_slope(sizes, [0.5 * s**2 for s in sizes]) == pytest.approx(2.0)
    assert loglog_slope(sizes, [7.0] * 4) == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(ValueError):
        loglog_slope([5, 5], [1.0, 2.0])
    calls = []
    slopes, costs = measure_growth({n: (lambda n=n: calls.append(n) or n**1.5) for n in (4, 16)}, repeats=3)
    assert slopes == pytest.approx([1.5] * 3) and costs == {4: [8.0] * 3, 16: [64.0] * 3}
    assert calls.count(4) == 4  # one untimed warm-up call at the smallest size
    fig = growth_figure("demo", costs, slopes, "items")
    assert fig.unit == "exponent" and fig.ratio == pytest.approx(1.5) and fig.met is False


def test_reference_voc_eval_on_a_hand_computed_case():
    from bench.evaluators import reference_voc_eval
    from transferrable.metrics.voc_eval import evaluate_detections

    gt = [{"boxes": np.array([[0, 0, 10, 10], [20, 20, 30, 30], [40, 40, 50, 50]], np.float32),
           "labels": np.array([0, 0, 0]), "difficult": np.array([False, False, True])}]
    # scores: TP, FP (duplicate of box 0), ignored (on the difficult box), TP, FP (nothing there)
    det = [{"boxes": np.array([[0, 0, 10, 10], [0, 0, 10, 9], [40, 40, 50, 50], [20, 20, 30, 31], [60, 60, 70, 70]],
                              np.float32), "labels": np.zeros(5, int), "scores": np.array([0.9, 0.8, 0.7, 0.6, 0.5])}]
    ap, ap07 = reference_voc_eval(det, gt, 1)
    # precision/recall after each counted detection: (1, 0.5), (0.5, 0.5), (2/3, 1), (0.5, 1)
    assert ap[0] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert ap07[0] == pytest.approx((6 * 1 + 5 * 2 / 3) / 11)
    suite = evaluate_detections(det, gt, 1)
    assert suite["ap"][0] == ap[0] and suite["ap07"][0] == ap07[0]


def test_bigan_time_to_accuracy_entry(quick_run, tmp_path):
    """The entry runs at a tiny size (one figure, a sample per repeat, reached by every seed), and the milestone
    callback stops a fit at its first evaluation that reaches the threshold, or runs to the cap."""
    from bench.bigan import _fashion_mnist, time_to_accuracy

    _, _, result, _ = quick_run
    fig, acc = [f for f in result["figures"] if f["benchmark"] == "bigan_time_to_accuracy"]
    assert fig["unit"] == "s" and "1-NN acc >= 5%" in fig["figure"] and "NOT reached" not in fig["figure"]
    n = result["repeats"]
    assert f"reached by {n}/{n} seeds after {[2] * n} batches" in fig["note"]
    assert acc["unit"] == "%" and all(5 <= a <= 100 for a in acc["value"]["samples"]) and acc["ratio"] > 0
    data, _ = _fashion_mnist(True, tmp_path)
    tiny = {"every": 2, "max_batches": 6, "epochs": 1, "batch": 8, "hidden": [16, 16], "n_eval": 40,
            "precision": "32-true", "seed": 0, "bn_batches": 2}
    first = time_to_accuracy(data, threshold=0.0, **tiny)
    assert first.reached_step == 2 and [s for s, _ in first.curve] == [0, 2] and first.train_seconds > 0
    never = time_to_accuracy(data, threshold=1.01, **tiny)
    assert never.reached_step is None and [s for s, _ in never.curve] == [0, 2, 4, 6]
    assert all(0.0 <= a <= 1.0 for _, a in never.curve)


def test_param_overrides_reach_the_entries(tmp_path, capsys):
    ctx = registry.Context(params={"threshold": "0.75", "hidden": "32x32", "every": "10"})
    assert ctx.param("threshold", 0.7) == 0.75 and ctx.param("every", 50) == 10 and ctx.param("hidden", "1x1") == "32x32"
    assert ctx.param("max_steps", 2000) == 2000
    with pytest.raises(ValueError, match="--param every=ten"):
        registry.Context(params={"every": "ten"}).param("every", 50)
    with pytest.raises(SystemExit):
        main(["--only", "startup", "--param", "threshold", "--out", str(tmp_path)])
    assert "NAME=VALUE" in capsys.readouterr().err
