"""LRCN activity recognition's per-video test scores on disk (``video_scores.npz``).

``engine/lrcn/activity.py`` writes the file after the test; late fusion and the Table 4.1-4.3 report
(``engine/lrcn/report.py``) read it. Imports only numpy and ``transferrable.core.atomic``.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from transferrable.core.atomic import atomic_write_bytes

SCORES_FILE = "video_scores.npz"


def save_video_scores(path: Path, scores: np.ndarray, labels: np.ndarray, videos: list[str], classes: list[str],
                      modality: str, sequence_model: str) -> None:
    buf = io.BytesIO()
    np.savez(buf, scores=scores.astype(np.float32), labels=np.asarray(labels, np.int64), videos=np.array(videos),
             classes=np.array(classes), modality=np.array(modality), sequence_model=np.array(sequence_model))
    atomic_write_bytes(path, buf.getvalue())


def load_video_scores(path: str | Path) -> dict:
    with np.load(path, allow_pickle=False) as z:
        return {
            "scores": z["scores"], "labels": z["labels"], "videos": [str(v) for v in z["videos"]],
            "classes": [str(c) for c in z["classes"]], "modality": str(z["modality"]),
            "sequence_model": str(z["sequence_model"]),
        }
