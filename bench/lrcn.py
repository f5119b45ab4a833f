"""``lrcn``: LRCN activity recognition throughput on CPU: training and evaluation clips/s (16-frame clips,
caffenet_mini at 32 px, LSTM 256, bf16 autocast as ``hardware=cpu``), and where the time of one training clip
goes: decoding (OpenCV, MJPG .avi of the generated motions), Farnebäck flow, CNN (forward + backward over the
16 frames) and LSTM (forward + backward). Decoding and flow are paid once per video (cached), the CNN and LSTM
every epoch: the note says what a cached epoch costs."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.registry import Context, Figure, Stats, benchmark
from bench.suite import quiet

CLIP = 16


def _videos(directory: Path, n: int, frames: int, size: int) -> list[Path]:
    """MJPG .avi files of moving textured squares (the decoding cost depends on size and length, not content)."""
    from datamodules.motion_generator import write_avi

    rng = np.random.default_rng(0)
    paths = []
    for i in range(n):
        video = np.full((frames, size, size, 3), 90, np.uint8)
        patch = rng.integers(0, 255, (size // 3, size // 3, 3), dtype=np.uint8)
        for t in range(frames):
            x = (t * 2 + i) % (size - patch.shape[1])
            video[t, size // 3:size // 3 + patch.shape[0], x:x + patch.shape[1]] = patch
        paths.append(directory / f"v_{i}.avi")
        write_avi(paths[-1], video)
    return paths


def _time(fn, repeats: int) -> list[float]:
    fn()  # warm-up
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


@benchmark("lrcn")
def lrcn(ctx: Context) -> list[Figure]:
    from datamodules.ucf101 import compute_flow, decode_video
    from models.backbones import CaffeNetMini
    from models.lrcn import LRCN

    batch, n_videos, size, hidden = (2, 2, 36, 32) if ctx.quick else (8, 8, 36, 256)
    torch.manual_seed(0)
    with quiet(), tempfile.TemporaryDirectory() as tmp:
        paths = _videos(Path(tmp), n_videos, CLIP, size)
        decoded = [decode_video(p) for p in paths]
        decode = _time(lambda: [decode_video(p) for p in paths], ctx.repeats)
        flow = _time(lambda: [compute_flow(f) for f in decoded], ctx.repeats)

    net = LRCN(CaffeNetMini(), 11, "fc6", "lstm", hidden)
    net.backbone.to(memory_format=torch.channels_last)
    opt = torch.optim.AdamW([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    clips = torch.randn(batch, CLIP, 3, 32, 32)
    labels = torch.randint(0, 11, (batch,))
    loss_fn = torch.nn.CrossEntropyLoss()
    feat_dim = net.backbone.feature_dim("fc6")

    from transferrable.core.precision import cpu_bf16

    def autocast():  # as hardware=cpu: bf16 where the CPU runs it natively (the LSTM stays fp32 elsewhere)
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=cpu_bf16().native)

    def cnn():
        frames = clips.flatten(0, 1).contiguous(memory_format=torch.channels_last)
        with autocast():
            out = net.frame_features(frames)
        out.float().sum().backward()

    feats = torch.randn(batch, CLIP, feat_dim)

    def lstm():
        with autocast():
            out = net.sequence_scores(feats)
        out.float().sum().backward()

    def train_step():
        opt.zero_grad(set_to_none=True)
        with autocast():
            logits = net.frame_features(clips.flatten(0, 1).contiguous(memory_format=torch.channels_last))
            logits = net.sequence_scores(logits.view(batch, CLIP, -1))
        loss = loss_fn(logits.flatten(0, 1).float(), labels.repeat_interleave(CLIP))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 5.0)
        opt.step()

    video = torch.randn(24, 3, 32, 32)  # a 24-frame test video: clips at 0 and 8 (stride 8)

    @torch.no_grad()
    def eval_videos():
        with autocast():
            for _ in range(batch):
                f = net.frame_features(video.contiguous(memory_format=torch.channels_last))
                net.sequence_scores(torch.stack([f[0:CLIP], f[8:8 + CLIP]])).float().softmax(-1)

    net.train()
    cnn_t, lstm_t, step_t = _time(cnn, ctx.repeats), _time(lstm, ctx.repeats), _time(train_step, ctx.repeats)
    net.eval()
    eval_t = _time(eval_videos, ctx.repeats)

    per_clip = {
        "decode": np.array(decode) / n_videos, "flow": np.array(flow) / n_videos,
        "CNN": np.array(cnn_t) / batch, "LSTM": np.array(lstm_t) / batch,
    }
    total = sum(per_clip.values())
    train_rate = Stats([batch / t for t in step_t])
    figures = [
        Figure(f"LRCN training clips/s (b{batch}, 16 frames, 32 px, LSTM {hidden}, {'bf16' if cpu_bf16().native else 'fp32'})", train_rate, "clips/s",
               note=f"cached epoch of 352 clips ~{352 / train_rate.median:.0f} s"),
        Figure("LRCN evaluation clips/s (24-frame videos, 2 clips each, CNN once per frame)",
               Stats([2 * batch / t for t in eval_t]), "clips/s",
               reference=train_rate, reference_name="training clips/s, same run"),
    ]
    for name, t in per_clip.items():
        figures.append(Figure(f"share of a first-epoch training clip in {name}", Stats(list(100 * t / total)), "%",
                              note="decode and flow are cached after the first pass" if name in ("decode", "flow") else ""))
    return figures
