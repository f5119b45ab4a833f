"""The bench entries that time whole ``train.py`` commands (``test_bench.HEAVY``), quick, with one repeat each,
checked by the same record tests as the others. A module of its own: its run is one xdist group, so it goes to one
worker while ``tests/test_bench.py``'s run (every other entry) goes to another.

Here their ``train.py`` runs are forked from the test zygote (tests/zygote.py), without the ~10 s import each: the
test checks the records' shape and arithmetic, not the machine (``python -m bench`` itself starts real processes).
"""

from __future__ import annotations

import subprocess
from types import SimpleNamespace

import pytest
from test_bench import (  # noqa: F401 - collected here too, against this module's run
    HEAVY,
    run_quick,
    test_every_benchmark_ran,
    test_quick_run_writes_json,
    test_records_are_well_formed,
    test_targets_from_the_issue,
)
from zygote import ROOT, run_script


def _run(cmd, cwd=None, env=None, **_):
    """``subprocess.run([sys.executable, ...])`` as the entries call it; ``run_script`` forks train.py runs."""
    return run_script(list(cmd[1:]), cwd=cwd or ROOT, env=env)


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    import bench.ddp
    import bench.main_job

    shim = SimpleNamespace(run=_run, DEVNULL=subprocess.DEVNULL, PIPE=subprocess.PIPE)
    with pytest.MonkeyPatch.context() as mp:
        for module in (bench.ddp, bench.main_job):
            mp.setattr(module, "subprocess", shim)
        return run_quick(tmp_path_factory, list(HEAVY), repeats=1)
