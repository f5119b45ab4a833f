"""The default pipeline (``task=classify`` and any single-fit task): fit, then test the best checkpoint."""

from __future__ import annotations

from omegaconf import DictConfig

from transferrable.core.distributed import rank_aware


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
    return metrics
