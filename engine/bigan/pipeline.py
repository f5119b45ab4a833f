"""task=bigan: splits into memory, fit (three optimisers, manual optimisation), then the unsupervised evaluation.

After training (BN statistics re-estimated on training data first, like the original "deploy" pass):
``test/knn1_acc`` (test queries, train+val gallery; Euclidean distance in the feature space), ``test/knn1_raw_acc``
(the same on raw pixels, cached by the data's hash under ``<cache_dir>/bigan/``), ``test/linear_probe_acc`` and,
for ``bigan.latent=discrete``, ``test/cluster_purity`` / ``test/cluster_nmi`` of E's category against the labels.
The final sample grids go to ``<run dir>/samples/final_*.png``; a conv BiGAN's encoder is exported (BN folded)
as ``encoder_backbone.pt`` (``transferrable/run/bigan_source.py`` caches it for ``backbone.weights=bigan:<dataset>``).

Under DDP every rank holds the splits in memory and trains on its shard of each epoch; the evaluation covers the
whole splits on every rank (features and 1-NN answers computed in shards and gathered, ``lightning_modules/bigan.py``),
so the numbers are those of one process. The raw-pixel 1-NN cache is looked up and written by rank 0 (its answer
broadcast, so the ranks agree on computing it), the linear probe runs on rank 0 and is broadcast, and the grids, the
encoder export and the logged test metrics come from rank 0 only.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from datamodules.in_memory import batch_sampler_loader, load_splits
from models.bigan import BiGANAlexNet
from models.bigan_training import save_bigan_grids
from transferrable.core.atomic import atomic_torch_save, atomic_write_json
from transferrable.core.distributed import rank_and_world, rank_aware
from transferrable.core.errors import ConfigError
from transferrable.core.manifest import warn_rebuild
from transferrable.metrics import unsupervised_eval  # looked up per call (tests spy on knn1_predict)

log = logging.getLogger(__name__)

ENCODER_FILE = "encoder_backbone.pt"


@rank_aware
def run(cfg: DictConfig, trainer, datamodule, model) -> dict:
    s = model.s
    output_dir = Path(cfg.paths.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if not s.in_memory:
        raise ConfigError("bigan.in_memory=false is not supported yet: the BiGAN task keeps its splits in memory "
                          "(use dataset.max_train_samples to bound them)")
    model.data = load_splits(datamodule, model.enc_size, s.channels)
    model.eval_batch_size = int(getattr(datamodule, "eval_batch_size", 512))
    batch = int(getattr(datamodule, "batch_size", 128))
    train = model.data["train"]
    # each DDP rank trains on len(train) // world_size rows of every epoch (datamodules/in_memory.py)
    shard = len(train) // max(int(trainer.world_size), 1)
    train_loader = batch_sampler_loader(train, batch, True, model.seed, drop_last=shard > batch,
                                        shard=trainer.world_size > 1)
    val_loader = batch_sampler_loader(model.data["val"], model.eval_batch_size, False, 0, drop_last=False)
    t0 = time.perf_counter()
    if cfg.get("train", True):
        trainer.fit(model, train_dataloaders=train_loader, val_dataloaders=val_loader,
                    ckpt_path=cfg.get("ckpt_path"), weights_only=True)
    elif cfg.get("ckpt_path"):
        model.load_state_dict(torch.load(cfg.ckpt_path, map_location="cpu", weights_only=True)["state_dict"])
    train_seconds = time.perf_counter() - t0
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if _is_number(v)}
    metrics["train_seconds"] = train_seconds
    metrics["epochs"] = float(trainer.current_epoch)
    if model.batches_trained and train_seconds > 0:
        metrics["train_samples_per_s"] = model.batches_trained * batch / train_seconds
    cache_dir = Path(cfg.paths.cache_dir) / "bigan" if cfg.paths.get("cache_dir") else None
    _same_weights_on_every_rank(model)
    evaluation = evaluate(model, "test", cache_dir)
    metrics.update(evaluation)
    rank0 = rank_and_world()[0] == 0
    if s.grids and rank0:
        save_bigan_grids(model, output_dir / "samples", "final", s.grid_upscale, trainer)
    if s.arch == "conv":
        path = output_dir / ENCODER_FILE
        if rank0:
            export_encoder(model, path, evaluation)
        metrics["encoder_checkpoint"] = str(path)  # type: ignore[assignment]
    for lg in trainer.loggers if rank0 else []:
        lg.log_metrics({k: v for k, v in metrics.items() if k.startswith("test/")}, step=trainer.global_step)
        lg.save()
    return metrics


def evaluate(model, split: str = "test", cache_dir: Path | None = None) -> dict[str, float]:
    """The end-of-training numbers: 1-NN (features, raw pixels), linear probe, discrete clustering."""
    t0 = time.perf_counter()
    s = model.s
    model.reestimate_bn()
    gallery = [name for name in ("train", "val") if name in model.data]
    metrics: dict[str, float] = {}
    g, gy = model.features(gallery)
    q, qy = model.features(split)
    pred = unsupervised_eval.knn1_predict_sharded(g, gy, q, s.knn_metric)
    metrics[f"{split}/knn1_acc"] = float((pred == qy).double().mean())
    if s.raw_knn:
        metrics[f"{split}/knn1_raw_acc"] = raw_knn1(model.data, gallery, split, s.knn_metric, cache_dir)
    if s.linear_probe:  # one fit (rank 0), its accuracy sent to the other ranks
        probe = None
        if rank_and_world()[0] == 0:
            probe = unsupervised_eval.linear_probe_accuracy(
                g.numpy(), gy.numpy(), q.numpy(), qy.numpy(), C=s.probe_C, max_train=s.probe_max_train, seed=model.seed)
        metrics[f"{split}/linear_probe_acc"] = _from_rank0(probe)
    if model.prior.categories and "E" in model.objective.trains:
        clusters = encoder_categories(model, split).numpy()
        metrics[f"{split}/cluster_purity"] = unsupervised_eval.cluster_purity(clusters, qy.numpy())
        metrics[f"{split}/cluster_nmi"] = unsupervised_eval.cluster_nmi(clusters, qy.numpy())
    metrics[f"{split}/feature_dim"] = float(g.shape[1])
    metrics["eval_seconds"] = time.perf_counter() - t0
    return metrics


@torch.no_grad()
def encoder_categories(model, split: str) -> torch.Tensor:
    """argmax of E's category logits (``bigan.latent=discrete``) for every image of ``split``."""
    model.E.eval()
    return model.map_batches(split, lambda x01: model.prior.split(model.E(model.inputs(x01)[0]).float())[0].argmax(1))


def raw_knn1(data: dict, gallery: list[str], query: str, metric: str, cache_dir: Path | None) -> float:
    """1-NN on raw pixels in [0, 1] (the reference line of Table 5.1), cached by the data's hash. Under DDP rank 0
    alone reads and writes the cache; a miss is computed by every rank, each its share of the queries."""
    g = torch.cat([data[s].images for s in gallery])
    gy = torch.cat([data[s].labels for s in gallery])
    q, qy = data[query].images, data[query].labels
    cache = None
    if cache_dir is not None and rank_and_world()[0] == 0:
        h = hashlib.sha1()
        for t in (g, gy, q):
            h.update(str(tuple(t.shape)).encode())
            h.update(t.contiguous().numpy().tobytes())
        h.update(metric.encode())
        cache = cache_dir / f"raw_knn1_{h.hexdigest()[:16]}.json"
    acc = _cached_acc(cache, qy) if cache is not None and cache.is_file() else None
    acc = _from_rank0(acc)  # the ranks agree on computing it (or not)
    if acc is not None:
        return acc
    pred = unsupervised_eval.knn1_predict_sharded(g.float() / 255.0, gy, q.float() / 255.0, metric)
    if cache is not None:
        atomic_write_json(cache, {"predictions": pred.tolist(), "metric": metric})
    return float((pred == qy).double().mean())


def _from_rank0(value):
    """Rank 0's ``value`` on every rank (``value`` itself on one process)."""
    if rank_and_world()[1] == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@torch.no_grad()
def _same_weights_on_every_rank(model) -> None:
    """Rank 0's parameters and buffers (those of its checkpoint) on every rank before the sharded evaluation. The
    averaged gradients keep the parameters equal already; the BN running statistics are each rank's own."""
    if rank_and_world()[1] == 1:
        return
    import torch.distributed as dist

    for t in model.state_dict().values():
        dist.broadcast(t, src=0)


def _cached_acc(cache: Path, query_labels: torch.Tensor) -> float | None:
    """The cached raw-pixel 1-NN accuracy, or None (with a ``CacheWarning``) when the file is damaged."""
    try:
        pred = torch.as_tensor(json.loads(cache.read_text())["predictions"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        warn_rebuild("raw 1-NN cache", cache, f"it does not parse ({type(err).__name__})")
        return None
    if pred.shape != query_labels.shape:
        warn_rebuild("raw 1-NN cache", cache, f"{len(pred)} predictions for {len(query_labels)} queries")
        return None
    return float((pred == query_labels).double().mean())


def export_encoder(model, path: Path, evaluation: dict) -> Path:
    """E's trunk as a suite backbone checkpoint, BN folded into the convolutions (``batch_norm=False`` layout), for
    ``task=classify backbone=bigan_alexnet backbone.weights=<path>``."""
    trunk: BiGANAlexNet = model.E.trunk
    atomic_torch_save(path, {
        "arch": trunk.arch,
        "state_dict": trunk.folded_state_dict(),
        "bn_folded": True,
        "objective": model.s.objective,
        "metrics": {k: float(v) for k, v in evaluation.items()},
    })
    log.info("bigan: encoder backbone (BN folded) -> %s", path)
    return path


def _is_number(v) -> bool:
    try:
        float(v)
        return True
    except (TypeError, ValueError):
        return False
