"""How a cost grows with its work: measure it at a few sizes and fit the exponent of ``cost ~ size^k``.

Reusable by any entry (DeCAF images, R-CNN proposals, clip or caption length, ...)::

    from bench.growth import growth_figure, measure_growth

    slopes, costs = measure_growth({n: (lambda n=n: seconds_for(n)) for n in (16, 32, 64)}, ctx.repeats)
    fig = growth_figure("LRCN forward vs clip length", costs, slopes, "frames")

``k`` = 1 is linear; a fixed per-call overhead pulls it below 1, a superlinear step (quadratic attention,
growing caches) above. Each repeat measures every size once (order rotated, as ``interleave`` does) and
gives one fitted ``k``, so the table shows the median and spread of ``k`` over repeats.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

from bench.registry import Figure, Stats, Target
from bench.timing import interleave

LINEAR = Target("<=", 1.15)  # the default: a step whose cost is linear in its work, with a little slack


def loglog_slope(sizes: Sequence[float], costs: Sequence[float]) -> float:
    """Least-squares slope of log(cost) against log(size): the ``k`` of ``cost ~ size^k``."""
    x, y = np.log(np.asarray(sizes, float)), np.log(np.asarray(costs, float))
    if len(x) < 2 or np.ptp(x) == 0:
        raise ValueError("a growth fit needs at least two different sizes")
    if not np.all(np.isfinite(y)):
        raise ValueError(f"costs must be positive and finite, got {list(costs)}")
    return float(np.polyfit(x, y, 1)[0])


def measure_growth(runs: Mapping[int, Callable[[], float]], repeats: int,
                   warmup: bool = True) -> tuple[list[float], dict[int, list[float]]]:
    """``runs[size]()`` returns the cost (e.g. seconds) at that size. Returns (fitted k per repeat, costs per size).

    ``warmup`` calls the smallest size once, untimed, first (lazy imports, oneDNN kernels, allocator)."""
    sizes = sorted(runs)
    if warmup:
        runs[sizes[0]]()
    costs = interleave({s: runs[s] for s in sizes}, repeats)
    slopes = [loglog_slope(sizes, [costs[s][r] for s in sizes]) for r in range(repeats)]
    return slopes, {s: costs[s] for s in sizes}


def growth_figure(name: str, costs: Mapping[int, Sequence[float]], slopes: Sequence[float], work: str,
                  cost_unit: str = "s", expected: float = 1.0, target: Target | None = LINEAR,
                  note: str = "") -> Figure:
    """A figure whose value is the fitted exponent ``k`` (per repeat), against ``expected`` (1 = linear)."""
    per_size = ", ".join(f"{s} {work}: {np.median(c):.3g} {cost_unit}" for s, c in sorted(costs.items()))
    return Figure(f"{name}: growth exponent k (cost ~ {work}^k)", Stats(slopes), "exponent",
                  reference=Stats([expected]), reference_name="linear" if expected == 1.0 else f"k = {expected:g}",
                  target=target, note="; ".join(x for x in (f"median cost {per_size}", note) if x))
