"""Hydra's and Lightning's own failures end in one ``error:`` line and exit 2 at the entry points (issue 29): an
object ``instantiate`` cannot build, Lightning's ``MisconfigurationException``, a run directory Hydra cannot create
and an unknown config option. In-process where the wrapper is what is tested; a subprocess (~5 s each) where only
the real entry point shows it."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess

import pytest
from conftest import ROOT, tiny_overrides
from hydra.utils import instantiate
from zygote import run_script

from transferrable.core.errors import exit_on_user_error


def exit_line(fn) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), pytest.raises(SystemExit) as code:
        exit_on_user_error(fn)()
    return code.value.code, err.getvalue()


def test_instantiate_error_is_one_line_naming_the_node():
    cfg = {"metric": {"_target_": "torchmetrics.classification.MulticlassAccuracy", "num_classes": 0}}
    code, err = exit_line(lambda: instantiate(cfg))
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("error: metric: could not be built (ValueError: ") and "num_classes" in err, err


def test_misconfiguration_is_one_line(tmp_path):
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor
    from lightning.pytorch.demos.boring_classes import BoringModel

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_checkpointing=False, max_steps=1,
                        callbacks=[LearningRateMonitor()], default_root_dir=tmp_path, enable_progress_bar=False)
    code, err = exit_line(lambda: trainer.fit(BoringModel()))  # a learning-rate monitor without a logger
    assert code == 2 and err.count("\n") == 1 and err.startswith("error: trainer: "), err
    assert "LearningRateMonitor" in err or "logger" in err, err


def test_a_bug_still_shows_its_traceback():
    with pytest.raises(ZeroDivisionError):
        exit_on_user_error(lambda: 1 / 0)()


def run(*args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline", "OMP_NUM_THREADS": "1"}
    env.pop("HYDRA_FULL_ERROR", None)
    return run_script([str(ROOT / "train.py"), *args], env=env, cwd=cwd or ROOT, timeout=300)


@pytest.mark.parametrize("where", ["/proc/transferrable-x", "file"])
def test_run_directory_that_cannot_be_created(where, tmp_path):
    if where == "file":
        (tmp_path / "f").write_text("in the way")
        where = str(tmp_path / "f" / "run")
    p = run(f"hydra.run.dir={where}", "logger=none")
    assert p.returncode == 2, p.stderr[-2000:]
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert lines == [lines[-1]] and lines[-1].startswith(f"error: cannot create {where} (hydra.run.dir"), p.stderr


def test_unknown_option_and_instantiate_error_via_train_py(fmnist_dir, tmp_path):
    p = run("backbone=nope")
    assert p.returncode == 2 and p.stderr.strip().startswith("error: In 'train.yaml': Could not find 'backbone/nope'")
    assert "caffenet_mini" in p.stderr and p.stderr.strip().count("\n") == 0, p.stderr
    p = run(*tiny_overrides(fmnist_dir), f"hydra.run.dir={tmp_path}", f"paths.log_dir={tmp_path}/logs",
            "+callbacks.bad._target_=torchmetrics.classification.MulticlassAccuracy", "+callbacks.bad.num_classes=0")
    last = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else ""
    assert p.returncode == 2 and last.startswith("error: callbacks.bad: could not be built (ValueError"), p.stderr[-3000:]
    assert "Traceback" not in p.stderr
