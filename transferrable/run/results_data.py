"""The results data files (``docs/results/data/<method>.json``): loading, canonical JSON, and the format check that
``make docs`` runs before rendering (see ``transferrable/run/results_docs.py`` for the format).
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transferrable.run import verdicts

ROOT = Path(__file__).resolve().parents[2]


RESULTS_DIR = ROOT / "docs" / "results"


DATA_DIR = RESULTS_DIR / "data"


VERDICTS = verdicts.VERDICTS


# page order: the thesis's chapters, then the suite's own figures
ORDER = ("classify", "decaf", "rcnn", "rcnn_segmentation", "lrcn_activity", "lrcn_caption",
         "video_description", "bigan", "benchmarks")


_ID = re.compile(r"^[a-z0-9_]+$")


def methods(data_dir: Path = DATA_DIR) -> list[str]:
    names = sorted(p.stem for p in data_dir.glob("*.json"))
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def load(method: str, data_dir: Path = DATA_DIR) -> dict:
    return json.loads((data_dir / f"{method}.json").read_text(encoding="utf-8"))


def dump_json(obj: Any) -> str:
    """JSON with two-space indentation, but a list of plain values (a table row) on one line."""

    def enc(o: Any, level: int) -> str:
        pad, inner = "  " * level, "  " * (level + 1)
        if isinstance(o, dict):
            if not o:
                return "{}"
            items = [f"{inner}{json.dumps(k, ensure_ascii=False)}: {enc(v, level + 1)}" for k, v in o.items()]
            return "{\n" + ",\n".join(items) + "\n" + pad + "}"
        if isinstance(o, list):
            if all(not isinstance(v, dict | list) for v in o):
                return "[" + ", ".join(json.dumps(v, ensure_ascii=False) for v in o) + "]"
            return "[\n" + ",\n".join(inner + enc(v, level + 1) for v in o) + "\n" + pad + "]"
        return json.dumps(o, ensure_ascii=False)

    return enc(obj, 0) + "\n"


def _check_grid(where: str, columns: Sequence, rows: Sequence, decimals: Any, bold: Any) -> list[str]:
    problems = []
    for i, row in enumerate(rows):
        if not isinstance(row, list) or len(row) != len(columns):
            problems.append(f"{where}: row {i} has {len(row) if isinstance(row, list) else '?'} cells, "
                            f"expected {len(columns)}")
            continue
        for cell in row:
            if cell is not None and not isinstance(cell, str | int | float):
                problems.append(f"{where}: row {i}: cell {cell!r} is not a number, string or null")
    if isinstance(decimals, list) and len(decimals) != len(columns):
        problems.append(f"{where}: decimals has {len(decimals)} entries for {len(columns)} columns")
    for pair in bold or []:
        if (not isinstance(pair, list) or len(pair) != 2 or not 0 <= pair[0] < len(rows)
                or not 0 <= pair[1] < len(columns)):
            problems.append(f"{where}: bold {pair!r} is outside the table")
    return problems


def validate(data: dict, method: str | None = None) -> list[str]:
    """Everything a page needs, as a list of problems (empty: fine)."""
    problems: list[str] = []
    name = data.get("method", "?")
    if method is not None and name != method:
        problems.append(f"{method}.json: method is {name!r}, expected {method!r}")
    for key in ("title", "tables"):
        if not data.get(key):
            problems.append(f"{name}: missing {key!r}")
    seen: set[str] = set()
    for t in data.get("tables") or []:
        tid = t.get("id", "?")
        where = f"{name}/{tid}"
        if not isinstance(tid, str) or not _ID.match(tid):
            problems.append(f"{where}: id must match {_ID.pattern}")
        if tid in seen:
            problems.append(f"{where}: duplicate id")
        seen.add(tid)
        for key in ("title", "command", "measured", "columns", "claims"):
            if not t.get(key):
                problems.append(f"{where}: missing {key!r}")
        command = t.get("command")
        if isinstance(command, list) and not all(isinstance(c, str) and c for c in command):
            problems.append(f"{where}: command lines must be non-empty strings")
        columns = t.get("columns") or []
        rows = t.get("rows")
        if not isinstance(rows, list):
            problems.append(f"{where}: missing 'rows'")
            rows = []
        if not rows and not t.get("not_measured"):
            problems.append(f"{where}: no rows and no 'not_measured' reason")
        problems += _check_grid(where, columns, rows, t.get("decimals"), t.get("bold"))
        thesis, no_thesis = t.get("thesis"), t.get("no_thesis")
        if bool(thesis) == bool(no_thesis):
            problems.append(f"{where}: needs exactly one of 'thesis' and 'no_thesis'")
        if thesis:
            if not thesis.get("source"):
                problems.append(f"{where}: thesis without 'source'")
            if not thesis.get("rows"):
                problems.append(f"{where}: thesis without 'rows'")
            problems += _check_grid(f"{where}/thesis", thesis.get("columns") or columns, thesis.get("rows") or [],
                                    thesis.get("decimals"), thesis.get("bold"))
        if not problems:
            problems += verdicts.problems(t, where)
    if "intro" in data:
        problems.append(f"{name}: 'intro' is generated from the tables; put prose in 'context'")
    return problems
