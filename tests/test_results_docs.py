"""docs/results/ is generated from docs/results/data/*.json: the two must agree, and every table must say how to
reproduce it, what the thesis measured (or that it has no counterpart) and a verdict per claim."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from transferrable.run import results_docs as rd

ROOT = Path(__file__).resolve().parents[1]
METHODS = rd.methods()
REQUIRED = ("id", "title", "command", "measured", "columns", "rows", "verdicts")


def test_every_method_has_data():
    for name in ("decaf", "rcnn", "rcnn_segmentation", "lrcn_activity", "lrcn_caption", "video_description", "bigan"):
        assert name in METHODS, f"docs/results/data/{name}.json is missing"


def test_generated_pages_match_the_committed_json():
    """Regenerating from the committed JSON gives exactly the committed Markdown (run `make docs` if not)."""
    pages = rd.render_all()
    for name, text in pages.items():
        path = rd.RESULTS_DIR / name
        assert path.is_file(), f"{path} is missing: run `make docs`"
        assert path.read_text(encoding="utf-8") == text, f"{path} is stale: run `make docs`"
    extra = {p.name for p in rd.RESULTS_DIR.glob("*.md")} - set(pages)
    assert not extra, f"pages without JSON in docs/results/: {sorted(extra)}"
    assert rd.write_all(check=True) == []


@pytest.mark.parametrize("method", METHODS)
def test_every_table_has_the_required_fields(method):
    data = rd.load(method)
    assert rd.validate(data, method) == []
    for t in data["tables"]:
        where = f"{method}/{t.get('id')}"
        for key in REQUIRED:
            assert key in t, f"{where}: no {key!r}"
        assert t["command"], where
        assert t["rows"] or t.get("not_measured"), f"{where}: no rows and no reason"
        assert bool(t.get("thesis")) != bool(t.get("no_thesis")), f"{where}: thesis numbers or 'no_thesis' reason"
        if t.get("thesis"):
            assert t["thesis"]["source"] and t["thesis"]["rows"], where
        assert t["verdicts"], where
        for v in t["verdicts"]:
            assert v["verdict"] in rd.VERDICTS, where
            assert v["claim"] and v["evidence"], where


@pytest.mark.parametrize("method", METHODS)
def test_json_is_in_the_canonical_layout(method):
    path = rd.DATA_DIR / f"{method}.json"
    assert path.read_text(encoding="utf-8") == rd.dump_json(json.loads(path.read_text(encoding="utf-8")))


def test_validate_names_what_is_missing():
    table = {"id": "t", "title": "T", "command": "python train.py", "measured": {"when": "now"},
             "columns": ["", "a"], "rows": [["x", 1.0, 2.0]], "verdicts": [{"claim": "c", "verdict": "maybe",
                                                                          "evidence": "e"}]}
    problems = rd.validate({"method": "m", "title": "M", "tables": [table]}, "m")
    assert any("row 0 has 3 cells" in p for p in problems)
    assert any("exactly one of 'thesis' and 'no_thesis'" in p for p in problems)
    assert any("'maybe'" in p for p in problems)


def test_links_into_the_results_pages_resolve():
    """Links to a results table (docs/results/<page>.md#<id> from README.md and docs/, <page>.md#<id> or #<id>
    inside docs/results/) name a table that exists."""
    ids = {m: {t["id"] for t in rd.load(m)["tables"]} for m in METHODS}
    checked = 0
    for src in [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]:
        for target in re.findall(r"\]\(([^)\s]*#[^)\s]+)\)", src.read_text(encoding="utf-8")):
            path, anchor = target.split("#", 1)
            resolved = (src.parent / path).resolve() if path else src.resolve()
            if resolved.parent != rd.RESULTS_DIR.resolve() or resolved.stem not in ids:
                continue
            assert anchor in ids[resolved.stem], f"{src.relative_to(ROOT)}: {target} does not exist"
            checked += 1
    assert checked


def test_fold_report_takes_a_sweeps_tables(tmp_path):
    """--from-report: the runs' tables.json rows replace the table's, marked for review; nothing else changes."""
    for job, (label, cells) in enumerate([("frozen", [[11.0, None], [5.0]]), ("fine-tuned", [[17.0, 0.5], None])]):
        run = tmp_path / str(job)
        run.mkdir()
        (run / "tables.json").write_text(json.dumps(
            [{"title": "Table 3.2", "corner": "", "columns": ["pool5", "fc6"], "rows": [{"label": label, "cells": cells}]}]))
        (run / "metrics.json").write_text(json.dumps({"test/mAP": 0.1, "precision": "32-true"}))
    data = rd.load("rcnn")
    folded = rd.fold_report(data, "rcnn_layers", tmp_path, today="2030-01-01")
    table = next(t for t in folded["tables"] if t["id"] == "rcnn_layers")
    assert table["columns"] == ["", "pool5", "fc6"]
    assert table["rows"] == [["frozen", 11.0, 5.0], ["fine-tuned", "17.00 ± 0.50", None]]
    assert table["measured"]["date"] == "2030-01-01" and table["measured"]["precision"] == "32-true"
    assert "re-check" in table["review"] and table["verdicts"]
    assert rd.validate(folded, "rcnn") == []
    assert "Needs review" in rd.render_method(folded)
    assert data == rd.load("rcnn")  # the input is not modified
    others = [t for t in folded["tables"] if t["id"] != "rcnn_layers"]
    assert others == [t for t in data["tables"] if t["id"] != "rcnn_layers"]


def test_command_line_check_and_from_report(tmp_path, capsys):
    data_dir, out_dir = tmp_path / "data", tmp_path / "out"
    data_dir.mkdir()
    (data_dir / "video_description.json").write_text(
        (rd.DATA_DIR / "video_description.json").read_text(encoding="utf-8"))
    args = ["--data-dir", str(data_dir), "--out-dir", str(out_dir)]
    assert rd.main([*args, "--check"]) == 1
    assert rd.main(args) == 0
    assert rd.main([*args, "--check"]) == 0
    sweep = tmp_path / "sweep" / "0"
    sweep.mkdir(parents=True)
    (sweep / "tables.json").write_text(json.dumps(
        [{"title": "Table 4.9", "columns": ["BLEU-4"], "rows": [{"label": "(b)", "cells": [[30.0]]}]}]))
    assert rd.main([*args, "--from-report", str(sweep.parent), "--method", "video_description",
                    "--table", "table49"]) == 0
    assert "30.00" in (out_dir / "video_description.md").read_text(encoding="utf-8")
    assert "re-check" in capsys.readouterr().out
