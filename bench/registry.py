"""The benchmark registry and the figure records every entry returns.

An entry is a function ``fn(ctx: Context) -> list[Figure]`` in its own module ``bench/<topic>.py``::

    from bench.registry import Context, Figure, Stats, benchmark

    @benchmark("my_topic")
    def my_topic(ctx: Context) -> list[Figure]:
        ...
        return [Figure("thing/s", Stats(samples), "1/s", reference=Stats(ref), reference_name="...",
                       target=Target(">=", 1.0))]

A figure's ``ratio`` is ``value.median / reference.median`` (both measured in the same run), and
``met`` compares that ratio with the figure's target.
"""

from __future__ import annotations

import importlib
import math
import pkgutil
import statistics
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

REGISTRY: dict[str, Callable[[Context], list[Figure]]] = {}


def benchmark(name: str):
    """Register ``fn(ctx) -> list[Figure]`` under ``name`` (unique across the package)."""

    def register(fn):
        if name in REGISTRY and REGISTRY[name] is not fn:
            where = f"{REGISTRY[name].__module__}, {fn.__module__}"
            raise ValueError(f"benchmark {name!r} is registered twice ({where})")
        REGISTRY[name] = fn
        return fn

    return register


def load_all() -> dict[str, Callable[[Context], list[Figure]]]:
    """Import every public module of the ``bench`` package so that its entries register themselves."""
    import bench

    for mod in pkgutil.iter_modules(bench.__path__):
        if not mod.name.startswith("_"):
            importlib.import_module(f"bench.{mod.name}")
    return dict(sorted(REGISTRY.items()))


@dataclass
class Context:
    """What an entry is told: ``quick`` (tiny sizes, for tests), how many timed ``repeats``, and the
    ``--param NAME=VALUE`` settings an entry reads with ``param``."""

    quick: bool = False
    repeats: int = 5
    params: dict[str, str] = field(default_factory=dict)

    def param(self, name: str, default):
        """``--param name=...`` converted to ``default``'s type, else ``default``."""
        if name not in self.params:
            return default
        try:
            return type(default)(self.params[name])
        except ValueError:
            raise ValueError(f"--param {name}={self.params[name]}: expected a {type(default).__name__}") from None

    def log(self, msg: str) -> None:
        print(f"  {msg}", file=sys.stderr, flush=True)


@dataclass
class Stats:
    """One quantity measured ``len(samples)`` times."""

    samples: list[float]

    def __post_init__(self):
        self.samples = [float(s) for s in self.samples]
        if not self.samples:
            raise ValueError("Stats needs at least one sample")

    @property
    def min(self) -> float:
        return min(self.samples)

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def max(self) -> float:
        return max(self.samples)

    def as_dict(self) -> dict:
        return {"min": self.min, "median": self.median, "max": self.max, "samples": self.samples}


@dataclass(frozen=True)
class Target:
    """``ratio <op> value``, e.g. ``Target(">=", 0.95)``."""

    op: str
    value: float

    def __post_init__(self):
        if self.op not in (">=", "<="):
            raise ValueError(f"target op must be '>=' or '<=', not {self.op!r}")

    def met(self, ratio: float) -> bool:
        return ratio >= self.value if self.op == ">=" else ratio <= self.value

    def __str__(self) -> str:
        return f"{self.op} {self.value:g}"


@dataclass
class Figure:
    """One measured figure, optionally against a reference measured (or documented) alongside it."""

    figure: str
    value: Stats
    unit: str
    reference: Stats | None = None
    reference_name: str | None = None
    reference_unit: str | None = None
    target: Target | None = None
    note: str = ""
    benchmark: str = field(default="", init=False)  # set by the runner

    @property
    def ratio(self) -> float | None:
        if self.reference is None:
            return None
        return self.value.median / self.reference.median

    @property
    def met(self) -> bool | None:
        ratio = self.ratio
        if self.target is None or ratio is None or not math.isfinite(ratio):
            return None
        return self.target.met(ratio)

    def as_dict(self) -> dict:
        ref = None
        if self.reference is not None:
            unit = self.reference_unit or self.unit
            ref = {"name": self.reference_name, "unit": unit, **self.reference.as_dict()}
        return {
            "benchmark": self.benchmark,
            "figure": self.figure,
            "unit": self.unit,
            "value": self.value.as_dict(),
            "reference": ref,
            "ratio": self.ratio,
            "target": None if self.target is None else {"op": self.target.op, "value": self.target.value},
            "met": self.met,
            "note": self.note,
        }


def select(entries: dict[str, Callable], only: Sequence[str] | None) -> dict[str, Callable]:
    """The entries named in ``only``; a name that is no entry but a module (``evaluators`` for
    ``bench/evaluators.py``) selects all of that module's entries."""
    if not only:
        return entries
    by_module = {}
    for name, fn in entries.items():
        by_module.setdefault(fn.__module__.removeprefix("bench."), []).append(name)
    unknown = [n for n in only if n not in entries and n not in by_module]
    if unknown:
        raise KeyError(f"unknown benchmark(s) {unknown}; registered: {sorted(entries)} (or a module: "
                       f"{sorted(by_module)})")
    names = [m for n in only for m in ([n] if n in entries else by_module[n])]
    return {n: entries[n] for n in dict.fromkeys(names)}
