"""The CPU-kind test files again, as on an AVX2-only CPU, inside the same (parallel) pytest run.

These files take another path on a CPU with native bf16 (precision policy, recurrent layers, bf16 benches).
On such a CPU each file is run once more in a child pytest with oneDNN and ATen capped at AVX2, so the policy
picks fp32 there too. The cap must be set before torch starts, hence one child process per file; as separate
test items they are spread over the xdist workers like any other slow test. On an AVX2-only CPU the main run
already takes that path, and these items are skipped.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import ROOT

from transferrable.core import precision as policy

CPU_KIND_TESTS = ["tests/test_precision.py", "tests/test_lrcn_activity.py", "tests/test_lrcn_caption.py",
                  "tests/test_lrcn_video_description.py", "tests/test_determinism.py", "tests/test_bench.py"]
AVX2_CAP = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}


def test_the_cpu_kind_files_exist():
    missing = [f for f in CPU_KIND_TESTS if not (ROOT / f).is_file()]
    assert not missing, f"renamed or removed: {missing} (update CPU_KIND_TESTS)"


@pytest.mark.slow
@pytest.mark.parametrize("path", CPU_KIND_TESTS, ids=[f.split("/")[-1][:-3] for f in CPU_KIND_TESTS])
def test_cpu_kind_file_passes_as_on_an_avx2_only_cpu(path, tmp_path):
    policy.cpu_bf16.cache_clear()
    if not policy.cpu_bf16().hardware:
        pytest.skip("no native bf16 here (or already capped): the main run is the AVX2 path")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
    env.pop(policy.FORCE_ENV, None)
    env.update(AVX2_CAP)
    # the child pytest gets its own temporary root: it must not clean up (or collide with) this run's
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--basetemp={tmp_path / 'bt'}",
           path]
    out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    log = f"{out.stdout[-6000:]}{out.stderr[-2000:]}"
    assert out.returncode == 0, f"{' '.join(cmd)} with {AVX2_CAP}: {summary}\n{log}"
    assert " passed" in summary and "failed" not in summary and "error" not in summary, summary
