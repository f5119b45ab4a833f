"""``nn.LSTM`` / ``nn.RNN`` that run in fp32 inside bf16 autocast where the CPU has no bf16 recurrent kernel.

CPU autocast casts ``mkldnn_rnn_layer`` to bf16, and oneDNN has no bf16 LSTM without native bf16 (AVX2-only CPUs:
"could not create a primitive descriptor for the LSTM forward propagation primitive"). There these subclasses
run the same layer in fp32 with autocast off; with native bf16 (``transferrable/core/precision.py``) they are plain
``nn.LSTM``/``nn.RNN``. Parameter names are unchanged, so checkpoints load either way.
"""

from __future__ import annotations

import torch
from torch import nn

from transferrable.core.precision import recurrent_bf16_ok


def _fp32(state):
    if state is None:
        return None
    if isinstance(state, tuple):
        return tuple(s.float() for s in state)
    return state.float()


class _Fp32WithoutNativeBf16:
    def forward(self, input, hx=None):  # noqa: A002 - nn.LSTM's own argument name
        if (input.device.type == "cpu" and torch.is_autocast_enabled("cpu")
                and torch.get_autocast_dtype("cpu") == torch.bfloat16 and not recurrent_bf16_ok()):
            with torch.autocast("cpu", enabled=False):
                return super().forward(input.float(), _fp32(hx))
        return super().forward(input, hx)


class LSTM(_Fp32WithoutNativeBf16, nn.LSTM):
    pass


class RNN(_Fp32WithoutNativeBf16, nn.RNN):
    pass
