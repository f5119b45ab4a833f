"""A results page's intro, generated from its tables: which source representation, CPU kind and command each
table was measured with (``measured.source_dataset``, ``measured.cpu_kind``, ``command``, and per run ``runs``)."""

from __future__ import annotations

from collections.abc import Sequence

NOT_RECORDED = "not recorded"


def _first_line(command: str | list[str]) -> str:
    return command if isinstance(command, str) else command[0]


def _group(tables: Sequence[dict], key: str) -> dict[str, list[str]]:
    """``{value: [table ids]}`` in first-seen order, for a ``measured`` key."""
    out: dict[str, list[str]] = {}
    for t in tables:
        out.setdefault(str(t["measured"].get(key) or NOT_RECORDED), []).append(t["id"])
    return out


def _links(ids: list[str]) -> str:
    return ", ".join(f"[{i}](#{i})" for i in ids)


def intro(data: dict) -> list[str]:
    """Markdown lines: source representations, CPU kinds, commands, each with the tables it applies to."""
    tables = data["tables"]
    out = ["Generated from the tables below:", ""]
    out.append("- Source representation (`source_dataset`): " + "; ".join(
        f"{value} ({_links(ids)})" for value, ids in _group(tables, "source_dataset").items()) + ".")
    out.append("- CPU kind: " + "; ".join(
        f"{value} ({_links(ids)})" for value, ids in _group(tables, "cpu_kind").items()) + ".")
    out.append("- Commands (each table lists all of its lines):")
    for t in tables:
        out.append(f"  - [{t['id']}](#{t['id']}): `{_first_line(t['command'])}`")
        for run_id, run in (t.get("runs") or {}).items():
            if run.get("command"):
                out.append(f"    - run {run_id}: `{_first_line(run['command'])}`")
    return out + [""]


def runs_lines(table: dict) -> list[str]:
    """A table's runs, when it holds several: which rows or columns each one measured, with which source."""
    runs = table.get("runs") or {}
    if not runs:
        return []
    out = ["Runs in this table (cells of different runs are never compared):", ""]
    for run_id, run in runs.items():
        where = (f"rows {', '.join(str(r + 1) for r in run['rows'])}" if run.get("rows")
                 else f"columns {', '.join(run.get('columns', []))}")
        source = f", source {run['source_dataset']}" if run.get("source_dataset") else ""
        command = f": `{_first_line(run['command'])}`" if run.get("command") else ""
        out.append(f"- {run_id}: {where}{source}{command}")
    return out + [""]
