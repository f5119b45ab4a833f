"""Measured results as data: ``docs/results/data/<method>.json`` -> ``docs/results/<method>.md``.

Every measured table of the suite lives in one JSON file per method, next to the thesis's numbers for the same
table and the thesis's claims as comparisons between named cells; the verdicts are computed
(transferrable/run/verdicts.py), never written. The Markdown pages are generated from it, never edited by hand:

    python -m transferrable.run.results_docs            # regenerate docs/results/*.md (what `make docs` runs)
    python -m transferrable.run.results_docs --check    # exit 1 if a page is not what its JSON renders to
    python -m transferrable.run.results_docs --from-report <sweep dir> --method rcnn --table rcnn_layers         [--report-title "<title of the run's tables.json table>"]

``--from-report`` folds a fresh sweep into a table: it reads the ``tables.json`` that the sweep's runs wrote
(the tables ``python eval.py report=<sweep dir>`` prints after its run table), replaces that table's columns and
rows with them, records where and when they came from, marks the table for review (its cells may have moved), and
regenerates the page.

A table (one entry of ``tables``) holds:

* ``id``, ``title``, ``command`` (a string or a list of command lines that reproduce it);
* ``measured``: what the README said about the measurement (``when``, ``date``, ``machine``, ``cpu_kind``,
  ``precision``, ``source_dataset``, ``recorded_in`` -- the README commit that recorded it); values not known are
  said so; the page's intro is generated from them (transferrable/run/page_intro.py);
* ``columns`` (the first one heads the row labels), ``rows`` (our numbers; cells are numbers, strings or null),
  optional ``decimals`` (an int, or one per column) and ``bold`` (``[row, column]`` pairs);
  ``rows`` may be empty only with ``not_measured`` saying why;
* ``thesis`` (``source``, ``rows``, optional ``columns``/``decimals``/``bold``: without ``columns`` its rows
  share our columns and are shown in our table) or ``no_thesis`` (why there is no thesis counterpart);
* ``cells``, ``noise``, optional ``runs`` and ``claims``: see transferrable/run/verdicts.py;
* optional ``setup``, ``unit``, ``notes`` and ``review`` (set by ``--from-report``).

Standard library only (plus ``transferrable.core.atomic``), so the docs build needs no torch.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from transferrable.core.atomic import atomic_write_text
from transferrable.run import page_intro, verdicts
from transferrable.run.results_data import DATA_DIR, RESULTS_DIR, VERDICTS, dump_json, load, methods, validate

COMMAND = "make docs"


MODULE_COMMAND = "python -m transferrable.run.results_docs"


_REPORT_TABLES = "tables.json"


def _cell(value: Any, decimals: int | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and decimals is not None:
        text = f"{value:.{decimals}f}"
    elif isinstance(value, int | float):
        text = str(value)
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def _decimals(spec: Any, column: int) -> int | None:
    if isinstance(spec, list):
        return spec[column]
    return spec


def _table(columns: Sequence[str], blocks: Sequence[tuple[Sequence[list], Any, Any, str]]) -> list[str]:
    """A Markdown table; each block is (rows, decimals, bold, label prefix)."""
    lines = ["| " + " | ".join(_cell(c, None) for c in columns) + " |", "|" + "---|" * len(columns)]
    for rows, decimals, bold, prefix in blocks:
        bold_cells = {tuple(p) for p in bold or []}
        for i, row in enumerate(rows):
            cells = []
            for j, value in enumerate(row):
                text = _cell(value, _decimals(decimals, j))
                if j == 0 and prefix:
                    text = prefix + text
                if (i, j) in bold_cells and value is not None:
                    text = f"**{text}**"
                cells.append(text)
            lines.append("| " + " | ".join(cells) + " |")
    return lines


def _measured_line(m: dict) -> str:
    parts = []
    for key, label in (("when", None), ("date", "date"), ("machine", None), ("cpu_kind", "CPU kind"),
                       ("source_dataset", "source representation"),
                       ("precision", "precision"), ("source", "from"), ("recorded_in", "recorded in README commit")):
        value = m.get(key)
        if value:
            parts.append(f"{label} {value}" if label else str(value))
    return "; ".join(parts)


def _command_lines(command: str | list[str]) -> list[str]:
    return command if isinstance(command, list) else [command]


def _command_block(command: str | list[str]) -> list[str]:
    return ["```bash", *_command_lines(command), "```"]


def render_table(t: dict) -> list[str]:
    out = [f'<a id="{t["id"]}"></a>', "", f"## {t['title']}", ""]
    runs = [f"{run['command']}   # run {run_id}" for run_id, run in (t.get("runs") or {}).items() if run.get("command")]
    out += ["Reproduce:", "", *_command_block([*_command_lines(t["command"]), *runs]), ""]
    out += [f"Measured: {_measured_line(t['measured'])}.", ""]
    out += page_intro.runs_lines(t)
    if t.get("review"):
        out += [f"> **Needs review:** {t['review']}", ""]
    if t.get("setup"):
        out += [t["setup"], ""]
    if t.get("unit"):
        out += [f"Unit: {t['unit']}.", ""]
    thesis = t.get("thesis")
    shared = bool(thesis) and not thesis.get("columns")
    if t.get("not_measured"):
        out += [f"*Not measured yet:* {t['not_measured']}", ""]
    blocks = [(t.get("rows") or [], t.get("decimals"), t.get("bold"), "")]
    if shared:
        blocks.append((thesis["rows"], thesis.get("decimals", t.get("decimals")), thesis.get("bold"), "*thesis:* "))
    if any(rows for rows, *_ in blocks):
        out += _table(t["columns"], blocks) + [""]
    if thesis:
        where = "the *thesis:* rows above" if shared else "the table below"
        out += [f"Thesis ({where}): {thesis['source']}", ""]
        if not shared:
            out += _table(thesis["columns"], [(thesis["rows"], thesis.get("decimals"), thesis.get("bold"), "")])
            out += [""]
    else:
        out += [f"Thesis: no counterpart. {t['no_thesis']}", ""]
    out += verdicts.render(t)
    if t.get("notes"):
        out += ["Notes:", ""] + [f"- {n}" for n in t["notes"]] + [""]
    return out


def _tally(tables: Sequence[dict]) -> str:
    counts = {v: 0 for v in VERDICTS}
    for t in tables:
        for v in verdicts.table_verdicts(t):
            counts[v] += 1
    return ", ".join(f"{n} {v}" for v, n in counts.items() if n)


def header(source: str) -> str:
    return (f"<!-- Generated by `{COMMAND}` ({MODULE_COMMAND}) from {source}. Do not edit: change the JSON and "
            f"run `{COMMAND}`; tests/test_results_docs.py fails when the two disagree. -->")


def render_method(data: dict) -> str:
    problems = validate(data)
    if problems:
        raise ValueError("; ".join(problems))
    method = data["method"]
    out = [header(f"docs/results/data/{method}.json"), "", f"# {data['title']}", ""]
    for para in data.get("context") or []:
        out += [para, ""]
    out += page_intro.intro(data)
    if data.get("usage"):
        out += [f"How to run it: [{data['usage']}](../../{data['usage']}). All results: [index](README.md).", ""]
    out += ["| table | verdicts |", "|---|---|"]
    out += [f"| [{_cell(t['title'], None)}](#{t['id']}) | {_tally([t])} |" for t in data["tables"]]
    out += [""]
    for t in data["tables"]:
        out += render_table(t)
    return "\n".join(out).rstrip("\n") + "\n"


def render_index(all_data: Sequence[dict]) -> str:
    out = [header("docs/results/data/*.json"), "", "# Measured results", "",
           "Every measured table of the suite, the thesis's numbers beside ours, and a verdict per thesis claim.",
           "The numbers are data in [data/](data/); these pages are generated from it.", "",
           '<a id="verdict-rules"></a>', "", "## How the verdicts are computed", "",
           *[f"- {rule}" for rule in verdicts.RULES], "",
           "| method | tables | verdicts |", "|---|---|---|"]
    for d in all_data:
        out.append(f"| [{d['title']}]({d['method']}.md) | {len(d['tables'])} | {_tally(d['tables'])} |")
    out += [""]
    for d in all_data:
        out += [f"## [{d['title']}]({d['method']}.md)", ""]
        for t in d["tables"]:
            command = t["command"] if isinstance(t["command"], str) else t["command"][0]
            out.append(f"- [{_cell(t['title'], None)}]({d['method']}.md#{t['id']}): `{command}`")
        out += [""]
    return "\n".join(out).rstrip("\n") + "\n"


def render_all(data_dir: Path = DATA_DIR) -> dict[str, str]:
    """``{file name: Markdown}`` for every page under ``docs/results/``."""
    all_data = [load(m, data_dir) for m in methods(data_dir)]
    pages = {f"{d['method']}.md": render_method(d) for d in all_data}
    pages["README.md"] = render_index(all_data)
    return pages


def write_all(data_dir: Path = DATA_DIR, out_dir: Path = RESULTS_DIR, check: bool = False) -> list[Path]:
    """Write (or with ``check`` only compare) every page; returns the pages that were (or would be) changed."""
    changed = []
    for name, text in render_all(data_dir).items():
        path = out_dir / name
        if not path.is_file() or path.read_text(encoding="utf-8") != text:
            changed.append(path)
            if not check:
                atomic_write_text(path, text)
    return changed


def _report_cell(cell: Any) -> Any:
    if cell is None:
        return None
    if len(cell) < 2 or cell[1] is None:
        return float(cell[0])
    return f"{cell[0]:.2f} ± {cell[1]:.2f}"


def fold_report(data: dict, table_id: str, sweep_dir: str | Path, report_title: str | None = None,
                today: str | None = None) -> dict:
    """A copy of ``data`` whose table ``table_id`` holds the numbers of a sweep's ``tables.json`` files.

    The run tables with the title ``report_title`` (default: the table's ``report_title``, else the only title
    there is) are merged in run order, as ``eval.py report=`` merges them; cells ``[mean, std]`` become
    ``"mean ± std"``, single values stay numbers.
    """
    sweep = Path(sweep_dir)
    files = sorted(sweep.rglob(_REPORT_TABLES), key=lambda p: [(0, int(s)) if s.isdigit() else (1, s)
                                                              for s in p.relative_to(sweep).parts])
    if not files:
        raise FileNotFoundError(f"--from-report {sweep}: no {_REPORT_TABLES} below it")
    data = json.loads(json.dumps(data))
    table = next((t for t in data["tables"] if t["id"] == table_id), None)
    if table is None:
        raise KeyError(f"{data['method']}: no table {table_id!r} (have {[t['id'] for t in data['tables']]})")
    found = [t for f in files for t in json.loads(f.read_text(encoding="utf-8"))]
    titles = list(dict.fromkeys(t["title"] for t in found))
    title = report_title or table.get("report_title") or (titles[0] if len(titles) == 1 else None)
    picked = [t for t in found if t["title"] == title]
    if not picked:
        raise KeyError(f"--from-report {sweep}: say which table with --report-title, one of {titles}")
    table["report_title"] = title
    columns = [picked[0].get("corner", ""), *picked[0]["columns"]]
    if table.get("thesis") and not table["thesis"].get("columns") and columns != table["columns"]:
        table["thesis"]["columns"] = table["columns"]  # the thesis rows keep the columns they were written for
    table["columns"] = columns
    table["rows"] = [[row["label"], *(_report_cell(c) for c in row["cells"])] for t in picked for row in t["rows"]]
    table["decimals"] = 2
    table.pop("bold", None)
    table.pop("not_measured", None)
    precisions = sorted({str(json.loads(m.read_text()).get("precision")) for m in sweep.rglob("metrics.json")}
                        - {"None"})
    date = today or _dt.date.today().isoformat()
    table["measured"] = {"date": date, "machine": "see the runs' logs", "source": f"eval.py report={sweep}",
                         **({"precision": ", ".join(precisions)} if precisions else {})}
    table["review"] = (f"numbers refreshed from {sweep} on {date}; the cells, noise and notes were declared for "
                       "the previous rows: re-check them, then delete 'review' from the JSON")
    return data


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog=MODULE_COMMAND, description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only compare; exit 1 if a page is stale")
    parser.add_argument("--from-report", metavar="SWEEP_DIR", help="fold a sweep's tables.json into a table")
    parser.add_argument("--method", help="with --from-report: the JSON file (e.g. rcnn)")
    parser.add_argument("--table", help="with --from-report: the table id (e.g. rcnn_layers)")
    parser.add_argument("--report-title", help="with --from-report: the run table's title to take")
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help=argparse.SUPPRESS)
    parser.add_argument("--out-dir", type=Path, default=RESULTS_DIR, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    problems = [p for m in methods(args.data_dir) for p in validate(load(m, args.data_dir), m)]
    if problems:
        print("\n".join(f"error: {p}" for p in problems), file=sys.stderr)
        return 2
    if args.from_report:
        if not (args.method and args.table):
            parser.error("--from-report needs --method and --table")
        data = fold_report(load(args.method, args.data_dir), args.table, args.from_report, args.report_title)
        atomic_write_text(args.data_dir / f"{args.method}.json", dump_json(data))
        print(f"{args.method}.json: table {args.table} now holds the numbers of {args.from_report}; "
              "re-check its cells and claims")
    changed = write_all(args.data_dir, args.out_dir, check=args.check)
    for path in changed:
        print(f"{'stale' if args.check else 'wrote'}: {path}")
    if args.check and changed:
        print(f"run `{COMMAND}` to regenerate", file=sys.stderr)
        return 1
    if not changed:
        print(f"docs/results: {len(methods(args.data_dir))} method pages and the index are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
