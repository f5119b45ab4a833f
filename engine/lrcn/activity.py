"""task=lrcn_activity: fit, test the best checkpoint, then the per-video outputs of the test.

``video_scores.npz`` (per-video softmax scores, labels, video and class names, modality and sequence model: what
late fusion and the per-class tables of ``eval.py report=`` read, ``engine/lrcn/report.py``) and
``confusion.png`` (+ its counts, ``confusion.json``) go into the run's output directory; the plot also goes to W&B as ``lrcn/confusion`` when a W&B
logger is attached.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from engine import single_fit
from engine.lrcn.report import CONFUSION_FILE
from engine.lrcn.scores import SCORES_FILE, save_video_scores
from transferrable.core.distributed import rank_aware
from transferrable.core.log_results import log_images
from transferrable.metrics.classification import confusion_counts
from transferrable.viz.confusion import plot_confusion


@rank_aware
def run(cfg: DictConfig, trainer, datamodule, model) -> dict:
    metrics = single_fit.run(cfg, trainer, datamodule, model)
    if cfg.get("test", True):
        write_test_outputs(trainer, datamodule, model, Path(cfg.paths.output_dir))
    return metrics


def write_test_outputs(trainer, datamodule, model, output_dir: Path) -> None:
    """The last test's per-video scores and confusion matrix (nothing when no test video was scored)."""
    scores, labels, order = model.collect_scores("test")  # every rank's videos (a collective call under DDP)
    if not len(labels) or not trainer.is_global_zero:
        return
    lrcn = model.cfg
    save_video_scores(output_dir / SCORES_FILE, scores, labels, [datamodule.splits["test"].names[i] for i in order],
                      datamodule.class_names, lrcn["modality"], lrcn["sequence_model"])
    title = f"{'LRCN' if lrcn['sequence_model'] == 'lstm' else 'single frame'} {lrcn['modality']}"
    counts = confusion_counts(labels, scores.argmax(1), len(datamodule.class_names))
    plot_confusion(output_dir / CONFUSION_FILE, counts, datamodule.class_names, f"{title}: test videos")
    log_images(trainer, {"lrcn/confusion": output_dir / CONFUSION_FILE})
