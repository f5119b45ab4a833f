"""``startup``: what the suite costs before any work, against a bare ``import torch`` timed in the same run.

Subprocess times are wall times of fresh interpreters (cold imports); composing the train config is
timed in-process, as tests and sweeps do it.
"""

from __future__ import annotations

import subprocess
import sys
import time

from bench import ROOT
from bench.registry import Context, Figure, Stats, Target, benchmark
from bench.suite import QUIET, compose_train
from bench.timing import interleave

COMMANDS = {
    "import torch": [sys.executable, "-c", "import torch"],
    "python train.py --help": [sys.executable, "train.py", "--help"],
    "import train (module-level imports of train.py)": [sys.executable, "-c", "import train"],
}
# A config-only path must not pay for torch: at most the bare torch import (REFERENCE.md §1).
TARGETS = {
    "python train.py --help": Target("<=", 1.0),
    "import train (module-level imports of train.py)": Target("<=", 1.0),
    "hydra compose conf/train.yaml (in-process)": Target("<=", 0.25),
}


def wall_time(cmd: list[str]):
    def run() -> float:
        t0 = time.perf_counter()
        done = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        seconds = time.perf_counter() - t0
        if done.returncode != 0:
            last = (done.stderr.strip().splitlines() or ["no stderr"])[-1]
            raise RuntimeError(f"{' '.join(cmd[1:])} exited {done.returncode}: {last}")
        return seconds

    return run


def compose_time() -> float:
    t0 = time.perf_counter()
    compose_train(QUIET)
    return time.perf_counter() - t0


@benchmark("startup")
def startup(ctx: Context) -> list[Figure]:
    runs = {name: wall_time(cmd) for name, cmd in COMMANDS.items()}
    runs["hydra compose conf/train.yaml (in-process)"] = compose_time
    if not ctx.quick:
        for run in runs.values():  # warm-up: page cache, .pyc files
            run()
    times = interleave(runs, ctx.repeats)
    reference = Stats(times.pop("import torch"))
    return [
        Figure(
            name,
            Stats(samples),
            "s",
            reference=reference,
            reference_name="python -c 'import torch'",
            target=TARGETS.get(name),
            note="wall time; lower is better",
        )
        for name, samples in times.items()
    ]
