"""Verdicts computed from measured cells: a claim is a list of comparisons between named cells of ONE table.

A table of ``docs/results/data/<method>.json`` declares

* ``cells``: ``{name: {"row": label | index, "column": name | index}}`` (``"block": "thesis"`` for a cell of our
  own that the table lists in its thesis block), optionally with its own ``n``, ``k``, ``sd`` or per-seed ``values``;
* ``noise``: how its cells vary: ``metric`` (one of ``METRICS``), ``n`` (test items: images, videos, captions; for
  ``map`` the ground-truth objects), ``k`` (splits or seeds behind a ``mean ± std`` cell), ``scale`` (100 for %);
* ``runs`` (optional, when a table holds rows or columns of several runs): ``{id: {"rows" | "columns", ...}}``;
* ``claims``: ``[{"id"?, "text", "compare": [...], "note"?}]`` or ``[{"id"?, "text", "not_measured": why}]``.

A comparison is ``{"better": a, "worse": b}``, ``{"cell": a, "above": x}``, ``{"cell": a, "below": x}``,
``{"same": [a, b]}`` (the claim says they are about equal) or ``{"equal": [a, b], "tolerance": t}`` (an exact check).
No verdict is written by hand: ``judge`` computes it with the rules in ``RULES``.
"""

from __future__ import annotations

import math
import re
from typing import Any

VERDICTS = ("held", "partly", "within noise", "reversed", "differs", "not measured")
METRICS = ("accuracy", "map", "score", "time", "exact")
SPREAD_FACTOR = 2.0
RULES = [
    "A claim is one or more comparisons between named cells of one table, from one run with one source "
    "representation; a comparison between cells of different runs is *not measured*.",
    "Standard error (SE) of a cell: from its spread over k splits or seeds, std / sqrt(k - 1) for a `mean ± std` "
    "cell (the suite's std is numpy's, ddof 0) or the sample std of per-seed values / sqrt(k); for an accuracy or "
    "recall p on n test items at least the binomial floor sqrt(p(1 - p) / n), n being one split's test items "
    "(splits redraw the same images); the larger of the two. mAP uses the same floor over n ground-truth "
    "objects, a crude lower bound. A single run of any other score (BLEU, CIDEr-D, IoU, a timing) has no SE.",
    "SE of a difference: sqrt(SE_a^2 + SE_b^2) (the cells are treated as independent; on a shared test set "
    "this overstates the SE, so the verdicts err towards *within noise*).",
    "A comparison `a > b` (or `a` above a bound) is **held** when a - b > 2 SE, **reversed** when a - b < -2 SE, "
    "**within noise** otherwise, **not measured** when a cell has no SE or the cells are of different runs. "
    "A comparison `a ≈ b` is **within noise** when |a - b| <= 2 SE and **differs** otherwise; an exact check "
    "`a = b ± t` is **held** or **differs**.",
    "A claim is **held** when every comparison is held; **partly** when some but not all are held; otherwise "
    "**reversed** if any comparison is reversed, **differs** if any differs, **within noise** if any is within "
    "noise, and **not measured** when none could be computed.",
]
_NUMBER = re.compile(r"^\s*(-?\d[\d,]*(?:\.\d+)?)\s*(?:±\s*(\d+(?:\.\d+)?))?")


# -- reading cells -----------------------------------------------------------------------------------------------

def parse(value: Any) -> tuple[float | None, float | None]:
    """``(mean, std)`` of a table cell: a number, ``"mean ± std"``, or a string that starts with a number."""
    if isinstance(value, bool) or value is None:
        return None, None
    if isinstance(value, int | float):
        return float(value), None
    m = _NUMBER.match(str(value))
    if not m:
        return None, None
    return float(m.group(1).replace(",", "")), (float(m.group(2)) if m.group(2) else None)


def _index(names: list, key: Any, what: str) -> int:
    if isinstance(key, int):
        if not 0 <= key < len(names):
            raise KeyError(f"{what} {key} is outside the table")
        return key
    hits = [i for i, n in enumerate(names) if n == key]
    if len(hits) != 1:
        raise KeyError(f"{what} {key!r} matches {len(hits)} entries (use an index)")
    return hits[0]


def locate(table: dict, spec: dict) -> tuple[int, int, list]:
    """``(row index, column index, rows)`` of a cell spec."""
    block = table["thesis"] if spec.get("block") == "thesis" else table
    rows = block.get("rows") or []
    columns = block.get("columns") or table["columns"]
    return _index([r[0] for r in rows], spec["row"], "row"), _index(columns, spec["column"], "column"), rows


def label(table: dict, name: str) -> str:
    spec = table["cells"][name]
    if spec.get("label"):
        return spec["label"]
    try:
        i, j, rows = locate(table, spec)
    except (KeyError, IndexError):  # a table refreshed by --from-report whose cells are to be re-declared
        return name
    columns = (table["thesis"] if spec.get("block") == "thesis" else table).get("columns") or table["columns"]
    return f"{rows[i][0]} / {columns[j]}"


def run_of(table: dict, name: str) -> str:
    spec = table["cells"][name]
    i, j, _ = locate(table, spec)
    for run_id, run in (table.get("runs") or {}).items():
        if i in run.get("rows", []) or table["columns"][j] in run.get("columns", []):
            return run_id
    return "main"


def cell(table: dict, name: str) -> dict:
    """``{"value", "se", "why"}``: the cell's value and its standard error by ``RULES`` (``se`` None: ``why``)."""
    spec = table["cells"][name]
    noise = {**(table.get("noise") or {}), **{k: v for k, v in spec.items() if k in ("metric", "n", "k", "sd", "values")}}
    i, j, rows = locate(table, spec)
    value, std = parse(rows[i][j])
    if value is None:
        raise ValueError(f"cell {name!r} ({rows[i][j]!r}) is not a number")
    metric, scale, k = noise.get("metric", "score"), float(noise.get("scale", 100)), noise.get("k")
    spread = None
    if noise.get("values"):
        vals = [float(v) for v in noise["values"]]
        mean = sum(vals) / len(vals)
        spread = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) / math.sqrt(len(vals))
    else:
        std = noise.get("sd", std)
        if std is not None and k and k > 1:
            spread = std / math.sqrt(k - 1)
    floor = None
    if metric in ("accuracy", "map") and noise.get("n"):
        p = min(max(value / scale, 0.0), 1.0)
        floor = scale * math.sqrt(p * (1 - p) / noise["n"])
    candidates = [s for s in (spread, floor) if s is not None]
    if candidates:
        return {"value": value, "se": max(candidates), "why": ""}
    why = (f"one run of a {metric} without seeds or splits" if metric not in ("accuracy", "map")
           else "no test size n and no spread over seeds or splits")
    return {"value": value, "se": None, "why": why}


# -- judging -------------------------------------------------------------------------------------------------------

def _names(comp: dict) -> list[str]:
    if "better" in comp:
        return [comp["better"], comp["worse"]]
    if "cell" in comp:
        return [comp["cell"]]
    return list(comp.get("same") or comp.get("equal") or [])


def compare(table: dict, comp: dict) -> dict:
    """One comparison's numbers and verdict."""
    names = _names(comp)
    try:
        cells = [cell(table, n) for n in names]
    except (KeyError, ValueError, IndexError, TypeError) as e:  # a table refreshed by --from-report, under review
        return {"names": names, "values": [None] * len(names), "ses": [None] * len(names), "diff": None,
                "se": None, "verdict": "not measured", "why": f"a cell does not resolve: {e}"}
    out = {"names": names, "values": [c["value"] for c in cells], "ses": [c["se"] for c in cells]}
    if "equal" in comp:
        diff = cells[0]["value"] - cells[1]["value"]
        return {**out, "diff": diff, "se": None, "verdict": "held" if abs(diff) <= comp["tolerance"] else "differs"}
    runs = {run_of(table, n) for n in names}
    if len(runs) > 1:
        return {**out, "diff": None, "se": None, "verdict": "not measured",
                "why": f"the cells are of different runs ({', '.join(sorted(runs))})"}
    if "above" in comp or "below" in comp:
        bound = comp.get("above", comp.get("below"))
        diff = cells[0]["value"] - bound if "above" in comp else bound - cells[0]["value"]
        out["bound"] = bound
    else:
        diff = cells[0]["value"] - cells[1]["value"]
    missing = [f"{n}: {c['why']}" for n, c in zip(names, cells, strict=True) if c["se"] is None]
    if missing:
        return {**out, "diff": diff, "se": None, "verdict": "not measured", "why": "no SE (" + "; ".join(missing) + ")"}
    se = math.sqrt(sum(c["se"] ** 2 for c in cells))
    if "same" in comp:
        verdict = "within noise" if abs(diff) <= SPREAD_FACTOR * se else "differs"
    else:
        verdict = ("held" if diff > SPREAD_FACTOR * se else "reversed" if diff < -SPREAD_FACTOR * se
                   else "within noise")
    return {**out, "diff": diff, "se": se, "verdict": verdict}


def roll_up(verdicts: list[str]) -> str:
    measured = [v for v in verdicts if v != "not measured"]
    if not measured:
        return "not measured"
    if len(measured) == len(verdicts) and all(v == "held" for v in measured):
        return "held"
    if "held" in measured:
        return "partly"
    for v in ("reversed", "differs", "within noise"):
        if v in measured:
            return v
    return "not measured"  # unreachable: every measured verdict is one of the above


def judge(table: dict, claim: dict) -> tuple[str, list[dict]]:
    """A claim's verdict and the comparisons behind it."""
    if claim.get("not_measured"):
        return "not measured", []
    results = [compare(table, c) for c in claim["compare"]]
    return roll_up([r["verdict"] for r in results]), results


def table_verdicts(table: dict) -> list[str]:
    return [judge(table, c)[0] for c in table.get("claims") or []]


# -- checking and rendering ----------------------------------------------------------------------------------------

def problems(table: dict, where: str) -> list[str]:
    """What is wrong with a table's cells, runs and claims (empty: fine)."""
    out = []
    if "verdicts" in table or any("verdict" in c for c in table.get("claims") or []):
        out.append(f"{where}: a verdict is written by hand; declare comparisons in 'claims' instead")
    if table.get("noise", {}).get("metric", "score") not in METRICS:
        out.append(f"{where}: noise.metric must be one of {METRICS}")
    for name in table.get("cells") or {} if not table.get("review") else ():
        try:
            cell(table, name)
        except (KeyError, ValueError, IndexError, TypeError) as e:
            out.append(f"{where}: cell {name!r}: {e}")
    if not table.get("claims"):
        out.append(f"{where}: no claims")
    for n, claim in enumerate(table.get("claims") or []):
        if not claim.get("text"):
            out.append(f"{where}: claim {n} has no text")
        if bool(claim.get("compare")) == bool(claim.get("not_measured")):
            out.append(f"{where}: claim {n} needs exactly one of 'compare' and 'not_measured'")
        for comp in claim.get("compare") or []:
            unknown = [x for x in _names(comp) if x not in (table.get("cells") or {})]
            if unknown or not _names(comp) or ("equal" in comp and "tolerance" not in comp):
                out.append(f"{where}: claim {n}: comparison {comp} names no declared cells {unknown}")
    return out


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _line(table: dict, r: dict, comp: dict) -> str:
    a = f"{label(table, r['names'][0])} {_num(r['values'][0])}" + (
        f" ± {_num(r['ses'][0])}" if r["ses"][0] is not None else "")
    if len(r["names"]) > 1:
        b = f"{label(table, r['names'][1])} {_num(r['values'][1])}" + (
            f" ± {_num(r['ses'][1])}" if r["ses"][1] is not None else "")
        sign = {"same": "≈", "equal": "="}.get(next(iter(comp)), ">")
        text = f"{a} {sign} {b}"
    else:
        text = f"{a} {'>' if 'above' in comp else '<'} {r['bound']:g}"
    if "equal" in comp:
        text += f" (tolerance {comp['tolerance']:g}): difference {r['diff']:.3g}"
    elif r["se"] is not None:
        text += f": difference {r['diff']:+.2f}, 2 SE {SPREAD_FACTOR * r['se']:.2f}"
    if r.get("why"):
        text += f" ({r['why']})"
    return f"  - {text}: *{r['verdict']}*"


def render(table: dict) -> list[str]:
    """The 'Verdicts' section of a table (computed)."""
    out = ["Verdicts (computed by `make docs` from the cells below; [rules](README.md#verdict-rules)):", ""]
    for claim in table["claims"]:
        verdict, results = judge(table, claim)
        tag = f"{claim['id']}: " if claim.get("id") else ""
        out.append(f"- **{verdict}**: {tag}{claim['text']}")
        if claim.get("not_measured"):
            out.append(f"  - {claim['not_measured']}")
        out += [_line(table, r, c) for r, c in zip(results, claim.get("compare") or [], strict=True)]
        if claim.get("note"):
            out.append(f"  - *Note:* {claim['note']}")
    return out + [""]
