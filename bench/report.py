"""Where results go: machine description, the Markdown table, and the JSON files."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import datetime
from importlib import metadata
from pathlib import Path

from bench import ROOT
from bench.registry import Figure

RESULTS_DIR = ROOT / "bench" / "results"
COLUMNS = ("benchmark", "figure", "value", "unit", "reference", "ratio", "target", "met?")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def _git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty"], cwd=ROOT, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def machine_info() -> dict:
    import torch

    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "cores_available": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {d: _version(d) for d in ("torch", "torchvision", "lightning", "timm", "hydra-core")},
        "git": _git_commit(),
    }


def fmt(x: float | None) -> str:
    if x is None:
        return "—"
    if x == 0 or 0.01 <= abs(x) < 1e5:
        return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"
    return f"{x:.2e}"


def table(figures: list[Figure], errors: dict[str, str]) -> str:
    """Markdown: value = median [min–max] over repeats; ratio = value median / reference median."""
    rows = []
    for f in figures:
        v = f.value
        value = fmt(v.median) if len(v.samples) == 1 else f"{fmt(v.median)} [{fmt(v.min)}–{fmt(v.max)}]"
        ref = "—"
        if f.reference is not None:
            unit = f.reference_unit or f.unit
            ref = f"{f.reference_name}: {fmt(f.reference.median)}" + ("" if unit == f.unit else f" {unit}")
        met = {True: "yes", False: "**no**", None: "—"}[f.met]
        rows.append((f.benchmark, f.figure, value, f.unit, ref, fmt(f.ratio), str(f.target or "—"), met))
    for name, err in errors.items():
        rows.append((name, "**error**", err.replace("|", "\\|"), "", "", "", "", "**no**"))
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def write_json(payload: dict, out: Path | None) -> list[Path]:
    """``out``: a directory (default ``bench/results``) gets ``<timestamp>.json`` + ``latest.json``;
    a path ending in ``.json`` is written as is."""
    out = Path(out) if out is not None else RESULTS_DIR
    text = json.dumps(payload, indent=2, allow_nan=True) + "\n"
    if out.suffix == ".json":
        paths = [out]
    else:
        stamp = datetime.fromisoformat(payload["started"]).strftime("%Y%m%d-%H%M%S")
        paths = [out / f"{stamp}.json", out / "latest.json"]
    for path in paths:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return paths
