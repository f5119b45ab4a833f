"""Small timing helpers shared by the entries: interleaved repeats and a step-rate loop."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable


def interleave(runs: dict[str, Callable[[], float]], repeats: int) -> dict[str, list[float]]:
    """Call every ``runs[name]()`` once per repeat, rotating the order each repeat, and collect the results.

    Rotating (A B, B A, A B, ...) spreads drift of a shared, busy machine evenly over the alternatives
    being compared, so ratios of medians stay fair.
    """
    names = list(runs)
    out: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        k = r % len(names)
        for name in names[k:] + names[:k]:
            out[name].append(float(runs[name]()))
    return out


def per_second(count: float, fn: Callable[[], object]) -> float:
    """``count / seconds`` that ``fn()`` took."""
    t0 = time.perf_counter()
    fn()
    return count / (time.perf_counter() - t0)


def steady_rate(batches: Iterable, step: Callable[[object], object], skip: int) -> float:
    """Steps per second over ``batches``: the first ``skip`` are run untimed, then fetching and stepping
    through every remaining batch is timed."""
    it = iter(batches)
    for _ in range(skip):
        step(next(it))
    n, t0 = 0, time.perf_counter()
    for batch in it:
        step(batch)
        n += 1
    if n == 0:
        raise ValueError(f"need more than skip={skip} batches to time")
    return n / (time.perf_counter() - t0)
