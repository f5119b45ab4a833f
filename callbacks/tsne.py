"""``TSNECallback``: at the end of testing, the module's backbone taps on the test split as a t-SNE map
(thesis Figure 2.1) -> ``<default_root_dir>/tsne_<taps>.png``. The embedding and drawing are
``transferrable/viz/tsne.py``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import numpy as np
import torch

from transferrable.core.atomic import atomic_write_json
from transferrable.core.log_results import wandb_loggers
from transferrable.viz.tsne import (
    DEFAULT_MAX_DIM,
    GaussianProjector,
    draw_tsne,
    embed_panels,
    stratified_subsample,
)

log = logging.getLogger(__name__)


# -- the callback -------------------------------------------------------------------------------
def _split_loader(trainer, split: str):
    dm = trainer.datamodule
    make = getattr(dm, f"{split}_dataloader", None) if dm is not None else None
    if make is not None:
        return make()
    attr = {"test": "test_dataloaders", "val": "val_dataloaders", "train": "train_dataloader"}.get(split)
    loader = getattr(trainer, attr, None) if attr else None
    if isinstance(loader, list | tuple):
        loader = loader[0] if loader else None
    if loader is None:
        raise RuntimeError(f"TSNECallback: no datamodule with a {split}_dataloader() and no {split} loader on the trainer")
    return loader


class TSNECallback(L.Callback):
    """At the end of testing, t-SNE the backbone's ``taps`` on ``split`` and save one PNG.

    Runs ``pl_module.backbone.forward_taps`` (eval mode, ``torch.inference_mode``) over a stratified
    subsample of ``max_points`` images of the split (from the datamodule's ``<split>_dataloader``),
    flattens every tap and randomly projects those wider than ``max_dim`` on the fly, then writes
    ``<trainer.default_root_dir>/tsne_<taps>.png`` (+ ``.json`` with the silhouettes) and logs the
    image to W&B when a WandbLogger is attached. Rank 0 only.
    """

    def __init__(
        self,
        taps: Sequence[str] = ("conv1", "fc6"),
        max_points: int = 2000,
        split: str = "test",
        seed: int | None = 0,
        max_dim: int = DEFAULT_MAX_DIM,
        perplexity: float = 30.0,
        max_iter: int = 1000,
        title: str | None = None,
    ):
        super().__init__()
        taps = [taps] if isinstance(taps, str) else list(taps)
        if not taps:
            raise ValueError("TSNECallback needs at least one tap")
        self.taps, self.max_points, self.split = taps, int(max_points), str(split)
        self.seed = 0 if seed is None else int(seed)
        self.max_dim, self.perplexity, self.max_iter, self.title = int(max_dim), float(perplexity), int(max_iter), title
        self.last_path: Path | None = None
        self.silhouettes: dict[str, float] = {}

    # -- data -----------------------------------------------------------------------------------
    def _subset_loader(self, base):
        """A loader over a stratified (by label) subsample of ``base``'s dataset, when it can be indexed."""
        from torch.utils.data import DataLoader, Subset

        dataset = getattr(base, "dataset", None)
        try:
            n = len(dataset)
        except TypeError:
            return base
        labels = getattr(dataset, "labels", None)
        if labels is not None and len(labels) == n:
            idx = stratified_subsample(np.asarray(labels), self.max_points, self.seed)
        elif n > self.max_points:
            idx = np.sort(np.random.default_rng(self.seed).choice(n, self.max_points, replace=False))
        else:
            return base
        return DataLoader(Subset(dataset, idx.tolist()), batch_size=base.batch_size or 64, shuffle=False,
                          num_workers=base.num_workers, collate_fn=base.collate_fn, pin_memory=base.pin_memory)

    @torch.inference_mode()
    def collect(self, trainer, pl_module) -> tuple[dict[str, np.ndarray], np.ndarray]:
        backbone = pl_module.backbone
        backbone.check_taps(self.taps)
        loader = self._subset_loader(_split_loader(trainer, self.split))
        channels_last = bool(getattr(pl_module, "hparams", {}).get("channels_last", False))
        projectors: dict[str, GaussianProjector] = {}
        feats: dict[str, list[np.ndarray]] = {t: [] for t in self.taps}
        labels: list[np.ndarray] = []
        seen = 0
        was_training = backbone.training
        backbone.eval()
        try:
            for batch in loader:
                if not isinstance(batch, list | tuple) or len(batch) < 2:
                    raise TypeError("TSNECallback expects (images, labels) batches")
                x, y = batch[0], batch[1]
                x = x[: self.max_points - seen].to(pl_module.device)
                if channels_last and x.ndim == 4:
                    x = x.contiguous(memory_format=torch.channels_last)
                with trainer.precision_plugin.forward_context():
                    outs = backbone.forward_taps(x, self.taps)
                for tap in self.taps:
                    v = outs[tap].flatten(1).float()
                    if v.shape[1] > self.max_dim:
                        if tap not in projectors:
                            projectors[tap] = GaussianProjector(v.shape[1], self.max_dim, self.seed)
                        v = projectors[tap](v)
                    feats[tap].append(v.cpu().numpy())
                labels.append(torch.as_tensor(y)[: len(x)].cpu().numpy())
                seen += len(x)
                if seen >= self.max_points:
                    break
        finally:
            backbone.train(was_training)
        if not labels:
            raise RuntimeError(f"TSNECallback: the {self.split} split is empty")
        return {t: np.concatenate(v) for t, v in feats.items()}, np.concatenate(labels)

    # -- hook -----------------------------------------------------------------------------------
    def on_test_end(self, trainer, pl_module) -> None:
        if not trainer.is_global_zero:
            return
        if not hasattr(getattr(pl_module, "backbone", None), "forward_taps"):
            # after a whole training run, a missing plot is better than a crash
            log.warning("TSNECallback: %s has no tap backbone (.backbone.forward_taps); no t-SNE plot",
                        type(pl_module).__name__)
            return
        self.run(trainer, pl_module)

    def run(self, trainer, pl_module) -> Path:
        features, labels = self.collect(trainer, pl_module)
        result = embed_panels(features, labels, max_points=self.max_points, seed=self.seed, max_dim=self.max_dim,
                              perplexity=self.perplexity, max_iter=self.max_iter)
        class_names = getattr(trainer.datamodule, "class_names", None) if trainer.datamodule is not None else None
        out = Path(trainer.default_root_dir) / f"tsne_{'_'.join(self.taps)}.png"
        title = self.title or (f"t-SNE of {getattr(pl_module.backbone, 'arch', 'backbone')} features, "
                               f"{self.split} split ({len(result.labels)} points)")
        path = draw_tsne(result, out, class_names=class_names, title=title)
        self.last_path, self.silhouettes = path, dict(result.silhouettes)
        atomic_write_json(path.with_suffix(".json"), {"split": self.split, "points": len(result.labels),
                                                      "seed": self.seed, "silhouette": self.silhouettes})
        metrics = {f"tsne/silhouette_{t}": s for t, s in self.silhouettes.items()}
        # into callback_metrics, so the run's metrics.json (read from there after testing) carries them
        trainer.callback_metrics.update({k: torch.tensor(v) for k, v in metrics.items()})
        for lg in wandb_loggers(trainer):
            lg.log_image(key="tsne", images=[str(path)], caption=[" | ".join(f"{k} {v:.3f}" for k, v in metrics.items())])
            lg.log_metrics(metrics)
        log.info("t-SNE of %s written to %s (silhouette %s)", self.taps, path,
                 ", ".join(f"{t}={s:.3f}" for t, s in self.silhouettes.items()))
        return path
