"""The CPU precision policy: bf16 autocast only where the CPU executes bf16 natively, fp32 everywhere else.

Without AMX or AVX512-BF16, bf16 autocast is emulated (measured 15x slower than fp32 on an AVX2-only AMD EPYC)
and oneDNN has no bf16 LSTM there. So ``trainer.precision: auto`` (the default of ``hardware=cpu``) resolves at
the start of a run to ``bf16-mixed`` or ``32-true``; an explicit ``trainer.precision=...`` always wins, and the
tasks' own inference paths (``decaf.bf16``, ``rcnn.bf16``, ... default ``null``) follow the resolved precision.

``TRANSFERRABLE_CPU_BF16=0|1`` forces the capability decision (CI runs the AVX2 path on an AMX machine with 0).
``ONEDNN_MAX_CPU_ISA`` below ``AVX512_CORE_BF16`` counts as no native bf16, since oneDNN then has no kernels.

This module imports only ``transferrable.core.errors`` (a leaf), so models, data and the runner may all use it.
"""

from __future__ import annotations

import functools
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from transferrable.core.errors import ConfigError

log = logging.getLogger(__name__)

FORCE_ENV = "TRANSFERRABLE_CPU_BF16"
AUTO = "auto"
# CPU flags (as /proc/cpuinfo spells them) with which bf16 matmul/convolution run natively
BF16_FLAGS = ("amx_bf16", "avx512_bf16")
# oneDNN ISA caps that still include native bf16 (any other value caps oneDNN below it)
_ONEDNN_BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX512_CORE_AMX", "AVX512_CORE_AMX_FP16",
                     "AVX10_1_512_AMX", "AVX10_1_512_AMX_FP16", "AVX10_2_512", "AVX10_2_512_AMX_2", "ALL")


class PrecisionError(ConfigError):
    """A bad ``TRANSFERRABLE_CPU_BF16`` value (one user-facing line)."""


@dataclass(frozen=True)
class Bf16Capability:
    native: bool  # what the policy uses (the forcing switch included)
    hardware: bool  # what this CPU (and oneDNN's ISA cap) can really do
    reason: str


def _cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _hardware_bf16() -> tuple[bool, str]:
    flags = _cpu_flags()
    if flags:
        found = [f for f in BF16_FLAGS if f in flags]
        why = f"CPU flags {'+'.join(found)}" if found else "no amx_bf16/avx512_bf16 in the CPU flags"
    else:  # not Linux: ask torch (private helpers, so guarded)
        import torch

        probe = getattr(torch.cpu, "_is_avx512_bf16_supported", None)
        found = [True] if probe is not None and probe() else []
        why = "torch reports AVX512-BF16" if found else "no native bf16 reported by torch"
    isa = os.environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if found and isa and isa not in _ONEDNN_BF16_ISAS:
        return False, f"{why}, but ONEDNN_MAX_CPU_ISA={isa} caps oneDNN below bf16"
    return bool(found), why


@functools.cache
def cpu_bf16() -> Bf16Capability:
    """Does this CPU run bf16 natively? Read once per process (flags, then the forcing switch)."""
    hardware, why = _hardware_bf16()
    forced = os.environ.get(FORCE_ENV)
    if forced is None or forced == "":
        return Bf16Capability(hardware, hardware, why)
    if forced not in ("0", "1"):
        raise PrecisionError(f"{FORCE_ENV}={forced!r}: expected 0 (force fp32) or 1 (force bf16), or unset (auto)")
    return Bf16Capability(forced == "1", hardware, f"forced by {FORCE_ENV}={forced} ({why})")


def recurrent_bf16_ok() -> bool:
    """oneDNN's bf16 LSTM/RNN exists only with native bf16: the policy must want it and the CPU must have it."""
    cap = cpu_bf16()
    return cap.native and cap.hardware


def resolve_precision(precision, accelerator: str) -> tuple[str, str]:
    """``(precision, reason)`` for a trainer: ``auto`` is resolved by capability, anything else is kept."""
    if str(precision) != AUTO:
        return str(precision), "set explicitly (trainer.precision)"
    if str(accelerator) in ("gpu", "cuda"):
        import torch

        if torch.cuda.is_available() and torch.cuda.is_bf16_supported():
            return "bf16-mixed", "auto: the GPU supports bf16"
        return "16-mixed", "auto: the GPU has no bf16, fp16 autocast instead"
    if str(accelerator) not in ("cpu", "auto"):
        return "32-true", f"auto: fp32 on accelerator {accelerator!r}"
    cap = cpu_bf16()
    if cap.native:
        return "bf16-mixed", f"auto: native bf16 on this CPU ({cap.reason})"
    return "32-true", f"auto: bf16 would be emulated on this CPU ({cap.reason})"


def is_bf16(precision) -> bool:
    return str(precision).startswith("bf16")


def inference_bf16(requested, trainer_precision) -> bool:
    """A task's own bf16 switch (``decaf.bf16`` etc.): ``null``/``auto`` follows the run's precision."""
    if requested is None or str(requested) == AUTO:
        return is_bf16(trainer_precision)
    return bool(requested)
