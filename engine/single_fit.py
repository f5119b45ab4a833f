"""The default pipeline (``task=classify`` and any single-fit task): fit, then test the best checkpoint."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from transferrable.core.distributed import rank_aware
from transferrable.core.log_results import log_images
from transferrable.viz.confusion import plot_confusion

CONFUSION_FILE = "confusion.png"  # the test split's confusion matrix (+ confusion.json: the counts)


def plain_metrics(metrics: dict) -> dict[str, float]:
    """Lightning's ``callback_metrics`` (tensors) as floats; non-numeric entries are left out."""
    out = {}
    for k, v in metrics.items():
        try:
            out[k] = float(v)
        except (TypeError, ValueError):
            continue
    return out


@rank_aware
def run(cfg: DictConfig, trainer, datamodule, model) -> dict:
    """Fit (resuming from ``ckpt_path``), then test the best checkpoint, or ``ckpt_path`` itself with train=false."""
    train = cfg.get("train", True)
    if train:
        trainer.fit(model, datamodule=datamodule, ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    metrics = plain_metrics(trainer.callback_metrics)
    if cfg.get("test", True):
        best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
        ckpt = (best or None) if train else cfg.get("ckpt_path")
        trainer.test(model, datamodule=datamodule, ckpt_path=ckpt, weights_only=True)
        metrics.update(plain_metrics(trainer.callback_metrics))
        if ckpt:
            metrics["test_checkpoint"] = ckpt  # type: ignore[assignment]
        write_confusion(cfg, trainer, datamodule, model)
    return metrics


def write_confusion(cfg: DictConfig, trainer, datamodule, model) -> None:
    """``confusion.png`` of the test split when the module counted one (``test_confusion_counts``, every rank's
    samples), on rank 0; also to W&B."""
    counts = getattr(model, "test_confusion_counts", None)
    if counts is None or not trainer.is_global_zero:
        return
    names = list(getattr(datamodule, "class_names", None) or [str(i) for i in range(len(counts))])
    title = f"{cfg.get('task_name', 'classify')}: {getattr(datamodule, 'name', 'dataset')} test split"
    path = plot_confusion(Path(cfg.paths.output_dir) / CONFUSION_FILE, counts, names, title)
    log_images(trainer, {"test/confusion": path})
