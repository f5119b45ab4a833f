"""Tables and figures of the captioning tasks: LRCN captioning (thesis Tables 4.5/4.6 layouts, decoding strategies,
``captions.png``, a W&B captions table) and video description (Table 4.9 layout).

The tables are ``report_core``'s ``tables.json`` format (cells in percent); ``merge_runs`` tables become one table
across the runs of a sweep in ``eval.py report=``. The pipelines (``engine/lrcn/caption.py``,
``engine/lrcn/video_description.py``) call these with their numbers.
"""

from __future__ import annotations

import math
from pathlib import Path

GENERATION_COLUMNS = ["BLEU-1", "BLEU-2", "BLEU-3", "BLEU-4", "METEOR", "ROUGE-L", "CIDEr-D"]
VIDEO_COLUMNS = ["BLEU-4", "BLEU-1", "ROUGE-L", "CIDEr-D"]


def caption_model_label(unit: str, variant: str, frozen: bool, image_input: str) -> str:
    """Row label of one captioning run, e.g. ``LSTM 2f (frozen)``."""
    extra = "" if image_input == "every_step" else f", image {image_input}"
    return f"{unit.upper()} {variant} ({'frozen' if frozen else 'fine-tuned'}{extra})"


def caption_tables(label: str, per_decoder: dict, ret: dict, base: dict) -> list[dict]:
    """Retrieval (Table 4.5 layout), generation with the first decoder (Table 4.6 layout) and, with several
    decoders, the decoding strategies beside the most-frequent-caption baseline."""
    main = next(iter(per_decoder))
    r = [[ret[f"caption_to_image/R@{k}"]] for k in (1, 5, 10)] + [[ret["caption_to_image/median_rank"]]]
    r += [[ret[f"image_to_caption/R@{k}"]] for k in (1, 5, 10)] + [[ret["image_to_caption/median_rank"]]]
    cols = ["cap->img R@1", "R@5", "R@10", "Medr", "img->cap R@1", "R@5", "R@10", "Medr"]

    def row(m):
        return [None if m.get(c) is None or not math.isfinite(m[c]) else [100 * m[c]] for c in GENERATION_COLUMNS]

    tables = [
        {"title": "Retrieval (Table 4.5 layout): R@K in %, median rank; length-normalised log-likelihood",
         "corner": "model", "columns": cols, "rows": [{"label": label, "cells": r}], "merge_runs": True},
        {"title": f"Generation (Table 4.6 layout), decoder {main}; scores x100",
         "corner": "model", "columns": GENERATION_COLUMNS, "rows": [{"label": label, "cells": row(per_decoder[main])}],
         "merge_runs": True},
    ]
    if len(per_decoder) > 1:
        rows = [{"label": name, "cells": [*row(m), [m["captions_per_second"]]]} for name, m in per_decoder.items()]
        rows.append({"label": "most frequent training caption", "cells": [*row(base), None]})
        tables.append({"title": f"Decoding strategies on {label}; scores x100, captions/s",
                       "corner": "decoder", "columns": [*GENERATION_COLUMNS, "captions/s"], "rows": rows})
    return tables


def video_description_tables(label: str, metrics: dict, base: dict) -> list[dict]:
    """Table 4.9 layout (one row per run, merged across a sweep) and the most-frequent-sentence baseline."""

    def cells(x):
        return [[100 * x[k]] if math.isfinite(x[k]) else None for k in VIDEO_COLUMNS]

    return [{"title": "Video description (Table 4.9 layout): scores x100 on the test videos",
             "corner": "architecture, input", "columns": VIDEO_COLUMNS,
             "rows": [{"label": label, "cells": cells(metrics)}], "merge_runs": True},
            {"title": "Baseline: the most frequent training sentence for every video", "corner": "",
             "columns": VIDEO_COLUMNS, "rows": [{"label": "most frequent sentence", "cells": cells(base)}]}]


def draw_captions(images: list, captions: list[str], path: Path) -> Path | None:
    """The first images (``.path``, ``.captions``) with their generated caption and first reference, as a PNG."""
    k = min(len(images), len(captions))
    if k == 0:
        return None
    # imported here for start-up speed (matplotlib is needed only when a run draws its figure)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from datamodules.base import read_image

    cols = min(4, k)
    rows = math.ceil(k / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.6 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i in range(k):
        ax = axes.ravel()[i]
        ax.imshow(read_image(images[i].path))
        ax.set_title(_wrap("ours: " + captions[i]) + "\n" + _wrap("ref: " + images[i].captions[0]), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def log_captions(trainer, images: list, captions: list[str], png: Path | None, metrics: dict) -> None:
    """The numbers to every logger; to W&B also a table of the first images with their captions, and the PNG."""
    from lightning.pytorch.loggers import WandbLogger

    numeric = {k: float(v) for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(float(v))}
    for lg in trainer.loggers:
        lg.log_metrics(numeric)
        if isinstance(lg, WandbLogger):
            import wandb

            data = [[wandb.Image(im.path), cap, " | ".join(im.captions)] for im, cap in zip(images, captions, strict=False)]
            lg.log_table(key="lrcn/captions", columns=["image", "generated", "references"], data=data)
            if png is not None:
                lg.log_image(key="lrcn/captions_png", images=[str(png)])
        lg.save()


def _wrap(text: str, width: int = 48) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width)) or text
