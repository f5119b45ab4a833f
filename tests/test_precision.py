"""The CPU precision policy (transferrable/core/precision.py): bf16 autocast only with native bf16, an explicit
precision always wins, the switch forces the decision, and the recurrent tasks survive bf16 autocast on a CPU
without a bf16 LSTM (AVX2-only; reproduced here by capping oneDNN's ISA)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import ROOT, compose_train, point_paths_at, tiny_overrides

from transferrable.core import precision as policy
from transferrable.core.errors import find_user_error
from transferrable.run.runner import apply_precision_policy, train


@pytest.fixture
def forced(monkeypatch):
    """``forced("0"|"1"|None)``: set TRANSFERRABLE_CPU_BF16 and re-read the capability."""

    def _force(value: str | None) -> policy.Bf16Capability:
        if value is None:
            monkeypatch.delenv(policy.FORCE_ENV, raising=False)
        else:
            monkeypatch.setenv(policy.FORCE_ENV, value)
        policy.cpu_bf16.cache_clear()
        return policy.cpu_bf16()

    yield _force
    policy.cpu_bf16.cache_clear()


def test_auto_resolves_by_capability_and_an_explicit_precision_wins(forced):
    assert not forced("0").native
    assert policy.resolve_precision("auto", "cpu")[0] == "32-true"
    assert "forced by TRANSFERRABLE_CPU_BF16=0" in policy.resolve_precision("auto", "cpu")[1]
    assert forced("1").native
    assert policy.resolve_precision("auto", "cpu") == ("bf16-mixed", policy.resolve_precision("auto", "cpu")[1])
    for explicit in ("32-true", "bf16-mixed", "16-mixed"):
        assert policy.resolve_precision(explicit, "cpu") == (explicit, "set explicitly (trainer.precision)")
    cap = forced(None)
    assert cap.native == cap.hardware  # unforced: exactly what the CPU flags say


def test_capability_follows_the_cpu_flags_and_a_onednn_isa_cap(forced, monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)  # CI may emulate an AVX2 machine with it
    flags = policy._cpu_flags()
    cap = forced(None)
    if flags:
        assert cap.hardware == any(f in flags for f in policy.BF16_FLAGS), cap
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")  # oneDNN without bf16 kernels = an AVX2-only machine
    cap = forced(None)
    assert not cap.native and not cap.hardware
    assert policy.resolve_precision("auto", "cpu")[0] == "32-true"


def test_a_bad_switch_value_is_one_user_facing_line(forced):
    with pytest.raises(policy.PrecisionError, match="TRANSFERRABLE_CPU_BF16='yes': expected 0") as err:
        forced("yes")
    assert find_user_error(err.value) is err.value  # train.py prints it as one line and exits 2


def test_inference_switches_follow_the_run_precision():
    assert policy.inference_bf16(None, "bf16-mixed") and policy.inference_bf16("auto", "bf16-true")
    assert not policy.inference_bf16(None, "32-true") and not policy.inference_bf16(None, None)
    assert policy.inference_bf16(True, "32-true") and not policy.inference_bf16(False, "bf16-mixed")


def test_hardware_cpu_defaults_to_auto_and_the_choice_is_recorded(forced, fmnist_dir, tmp_path):
    """hardware=cpu says ``auto``; a run resolves it once, logs why, keeps it in the config (so the loggers'
    hyperparameters, W&B included, carry it), writes it to metrics.json, and the nested source pretraining
    inherits it."""
    assert compose_train(["hardware=cpu"]).trainer.precision == "auto"
    forced("0")
    cfg = compose_train([o for o in tiny_overrides(fmnist_dir) if not o.startswith("trainer.precision")]
                        + ["logger=csv"])
    cfg = point_paths_at(cfg, tmp_path)
    assert cfg.trainer.precision == "auto"
    metrics = train(cfg)
    assert metrics["precision"] == "32-true" and cfg.precision_policy.precision == "32-true"
    assert "TRANSFERRABLE_CPU_BF16=0" in cfg.precision_policy.reason
    assert json.loads((tmp_path / "metrics.json").read_text())["precision"] == "32-true"
    hparams = next(tmp_path.rglob("hparams.yaml")).read_text()
    assert "precision_policy" in hparams and "TRANSFERRABLE_CPU_BF16=0" in hparams

    from transferrable.run.source import _pretraining_config

    forced("1")
    cfg = point_paths_at(compose_train(["hardware=cpu", "backbone.weights=source:fashion_mnist"]), tmp_path / "b")
    assert apply_precision_policy(cfg) == "bf16-mixed"
    pre = _pretraining_config(cfg, "fashion_mnist", tmp_path / "pre")
    assert pre.trainer.precision == "bf16-mixed" and pre.precision_policy.reason == cfg.precision_policy.reason
    assert apply_precision_policy(pre) == "bf16-mixed"  # already resolved: not re-decided, not re-logged


def test_recurrent_layers_run_fp32_inside_autocast_without_native_bf16(forced):
    from models.recurrent import LSTM, RNN

    x = torch.randn(3, 5, 8)
    for value, dtype in (("0", torch.float32), ("1", torch.bfloat16 if forced("1").hardware else torch.float32)):
        forced(value)
        for cls in (LSTM, RNN):
            torch.manual_seed(0)
            layer = cls(8, 16, batch_first=True)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                y, _ = layer(x)
            assert y.dtype == dtype, (value, cls)
    forced("0")
    torch.manual_seed(0)
    plain = torch.nn.LSTM(8, 16, batch_first=True)
    torch.manual_seed(0)
    ours = LSTM(8, 16, batch_first=True)
    assert list(plain.state_dict()) == list(ours.state_dict())  # same parameter names: checkpoints load
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, _ = ours(x)
    torch.testing.assert_close(y, plain(x)[0])  # the same fp32 computation


AVX2_SCRIPT = """
import torch
from models.recurrent import LSTM
x = torch.randn(2, 4, 8)
with torch.autocast("cpu", dtype=torch.bfloat16):
    try:
        torch.nn.LSTM(8, 8, batch_first=True)(x)
        print("plain nn.LSTM: ok")
    except RuntimeError as err:
        print("plain nn.LSTM:", str(err).splitlines()[0][:80])
    y, _ = LSTM(8, 8, batch_first=True)(x)
print("ours:", y.dtype, bool(torch.isfinite(y).all()))
"""


def test_lstm_under_bf16_autocast_on_an_avx2_only_onednn():
    """``ONEDNN_MAX_CPU_ISA=AVX2`` gives oneDNN the kernels of an AVX2-only CPU: there plain ``nn.LSTM`` under bf16
    autocast fails as on the AMD machines (where it is not already such a machine), and ours runs in fp32."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2", "PYTHONPATH": str(ROOT)}
    env.pop(policy.FORCE_ENV, None)
    out = subprocess.run([sys.executable, "-c", AVX2_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    print(out.stdout)
    assert "ours: torch.float32 True" in out.stdout


# -- every recurrent task, tiny, under forced bf16 autocast -----------------------------------------------------
def _finite(metrics: dict, *keys: str) -> None:
    for k in keys:
        assert k in metrics and math.isfinite(metrics[k]), (k, metrics.get(k))


@pytest.mark.slow
@pytest.mark.parametrize("native", ["0", "1"])
def test_recurrent_tasks_under_bf16_autocast(forced, native, fmnist_dir, make_cfg, tmp_path):
    """lrcn_activity, lrcn_caption and lrcn_video_description with ``trainer.precision=bf16-mixed`` and their
    inference bf16 on: with the policy forced to "no native bf16" the LSTMs take the fp32 path; forced to "native"
    they run bf16 where the CPU has it (elsewhere the fp32 path again). No crash, finite metrics."""
    if native == "1" and not forced("1").hardware:
        pytest.skip("this CPU has no native bf16: the forced-native case is the same fp32 path as native=0")
    forced(native)
    bf16 = ["trainer.precision=bf16-mixed"]
    from test_lrcn_activity import _tiny_cfg

    act = train(_tiny_cfg(tmp_path / "act", fmnist_dir, "lstm", *bf16, "trainer.max_epochs=1",
                          "dataset.clips_per_group=1", "dataset.num_frames=16"))
    _finite(act, "test/acc")
    from test_lrcn_caption import _caption_cfg

    cap = train(_caption_cfg(make_cfg, fmnist_dir, tmp_path, *bf16, "lrcn.bf16=true", "trainer.max_epochs=1",
                             out="caption"))
    _finite(cap, "test/CIDEr-D", "test/BLEU-4", "test/image_to_caption/R@1")
    vid = train(make_cfg("task=lrcn_video_description", *bf16, "dataset.n_train=40", "dataset.n_val=8",
                         "dataset.n_test=10", "dataset.vocab_min_count=1", "video.hidden=16", "video.embed=8",
                         "video.input=encoder_max", "trainer.max_epochs=1", "video.java=false", out="video"))
    _finite(vid, "test/BLEU-4")
