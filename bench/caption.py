"""``caption``: LRCN caption decoding speed (captions/s, greedy vs beam 5, batched over images, on cached
image features) and the time of the caption metrics (BLEU/ROUGE-L/CIDEr-D with the PTB tokenizer, and
METEOR, both Java; Python tokenizer without METEOR as the reference) for a test set of 200 images with 5
references each.

The decoder is the task's CPU default (2f LSTM, hidden 256, 512-d fc7 features) with random weights and
a 150-word vocabulary: decoding cost does not depend on what the weights learnt, except through caption
length, which ``max_len`` bounds (random weights rarely stop early, so this is the slow end)."""

from __future__ import annotations

import time

import torch

from bench.registry import Context, Figure, Stats, benchmark
from bench.timing import interleave


def _decode_rate(model, feats: torch.Tensor, width: int, max_len: int) -> float:
    t0 = time.perf_counter()
    model.beam(feats, width=width, max_len=max_len)
    return len(feats) / (time.perf_counter() - t0)


def _metric_seconds(refs: dict, hyps: dict, java: bool, meteor: bool) -> float:
    import warnings

    from transferrable.metrics.caption_eval import caption_metrics

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        caption_metrics(refs, hyps, java="auto" if java else False, meteor=meteor)
    return time.perf_counter() - t0


@benchmark("caption")
def caption(ctx: Context) -> list[Figure]:
    from models.lrcn_caption import LRCNCaptioner
    from transferrable.metrics.caption_eval import java_available

    images, hidden, max_len = (8, 32, 6) if ctx.quick else (200, 256, 20)
    torch.manual_seed(0)
    model = LRCNCaptioner(150, 512, hidden=hidden, embed=hidden, variant="2f").eval()
    feats = torch.randn(images, 512).relu()
    rates = interleave({"greedy": lambda: _decode_rate(model, feats, 1, max_len),
                        "beam5": lambda: _decode_rate(model, feats, 5, max_len)}, ctx.repeats)
    greedy, beam5 = Stats(rates["greedy"]), Stats(rates["beam5"])
    figures = [
        Figure(f"greedy decoding, {images} images, 2f LSTM h{hidden}, <= {max_len} words", greedy, "captions/s"),
        Figure(f"beam-5 decoding, {images} images, 2f LSTM h{hidden}, <= {max_len} words", beam5, "captions/s",
               reference=greedy, reference_name="greedy, same run"),
    ]
    words = ["a", "red", "blue", "coat", "bag", "on", "the", "left", "grass", "two", "dress", "in", "front", "of"]
    gen = torch.Generator().manual_seed(0)

    def sentence(n: int) -> str:
        return " ".join(words[int(i)] for i in torch.randint(len(words), (n,), generator=gen))

    refs = {i: [sentence(8) for _ in range(5)] for i in range(images)}
    hyps = {i: sentence(7) for i in range(images)}
    runs = {"python": lambda: _metric_seconds(refs, hyps, java=False, meteor=False)}
    if java_available() and not ctx.quick:
        runs["java"] = lambda: _metric_seconds(refs, hyps, java=True, meteor=False)
        runs["java_meteor"] = lambda: _metric_seconds(refs, hyps, java=True, meteor=True)
    secs = interleave(runs, ctx.repeats)
    python = Stats(secs["python"])
    figures.append(Figure(f"BLEU+ROUGE-L+CIDEr-D, {images} images x 5 refs, Python tokenizer", python, "s"))
    if "java" in secs:
        figures.append(Figure(f"BLEU+ROUGE-L+CIDEr-D, {images} images, PTB tokenizer (Java)", Stats(secs["java"]),
                              "s", reference=python, reference_name="Python tokenizer, same run"))
        figures.append(Figure(f"all metrics incl. METEOR (Java start-up included), {images} images",
                              Stats(secs["java_meteor"]), "s", reference=python,
                              reference_name="Python tokenizer, same run"))
    return figures
