"""R-CNN's cache keys and versions: what decides whether a fine-tuned network, a pool5 memmap or a set of
SVMs on disk can be reused (the weights' hash, the optimiser, the data, the geometry, the proposals).
"""

from __future__ import annotations

import hashlib
from functools import partial
from typing import Any

import numpy as np
import torch
from torch import nn

from lightning_modules.rcnn import RCNNModule
from models.rcnn.windows import ImageSet
from transferrable.core.artifact_cache import digest

CACHE_VERSION = 1  # pool5 memmaps (rcnn_features/)


FINETUNE_CACHE_VERSION = 1  # fine-tuned networks (rcnn_finetune/): in the key and the manifests


def state_digest_arrays(arrays: list[np.ndarray]) -> str:
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def state_digest(module: nn.Module) -> str:
    h = hashlib.sha256()
    for k, v in module.state_dict().items():
        h.update(k.encode())
        t = v.detach().cpu().contiguous()
        h.update(str((tuple(t.shape), str(t.dtype))).encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _describe(factory) -> Any:
    if factory is None:
        return None
    if isinstance(factory, partial):
        return [f"{factory.func.__module__}.{factory.func.__qualname__}", dict(factory.keywords)]
    return repr(factory)


def optimizer_key(model: RCNNModule) -> dict:
    """The optimiser and scheduler in the fine-tuning key, only where they are not the SGD + StepLR that
    ``rcnn.finetune``'s values (already in the key) describe: the default keys stay what they always were."""
    ft = model.cfg["finetune"]
    default = {"optimizer": ["torch.optim.sgd.SGD", {"lr": ft["lr"], "momentum": ft["momentum"],
                                                     "weight_decay": ft["weight_decay"]}],
               "scheduler": ["torch.optim.lr_scheduler.StepLR", {"step_size": ft["step_epochs"], "gamma": ft["gamma"]}]}
    got = {"optimizer": _describe(model.optimizer_factory), "scheduler": _describe(model.scheduler_factory)}
    return {} if got == default else {"optim": got}


def finetune_key(trainer, model: RCNNModule, data: ImageSet, mean, std, seed) -> dict:
    ft = model.cfg["finetune"]
    # warp fine-tuning keeps the key it had before finetune.windows existed (its caches stay valid)
    ft_key = {k: v for k, v in ft.items() if ft["windows"] != "warp" or k not in ("windows", "roi_images")}
    return {"version": FINETUNE_CACHE_VERSION, "start": state_digest(model), "finetune": ft_key,
            "epochs": trainer.max_epochs, "seed": seed, "precision": str(trainer.precision),
            "size": model.size, "pad": model.pad, "images": data.ids, "boxes": state_digest_arrays(data.boxes),
            "mean": [float(m) for m in mean], "std": [float(s) for s in std], **optimizer_key(model),
            # N DDP processes share each epoch's minibatches and average their gradients: another network
            **({"world_size": int(trainer.world_size)} if trainer.world_size > 1 else {})}


def feature_key(model: RCNNModule, data: ImageSet, weights: str, proposals: str) -> dict:
    """What a pool5 memmap depends on: the network (``weights``: its state digest), the proposals' tag, geometry."""
    rc = model.cfg
    return {"version": CACHE_VERSION, "weights": weights, "mode": rc["feature_mode"],
            "roi_scale": rc["roi_scale"] if rc["feature_mode"] == "roi_pool" else None,
            "size": model.size, "pad": model.pad, "proposals": proposals, "split": data.name,
            "ids": digest("\n".join(data.ids)), "regions": data.num_regions,
            "dtype": rc["feature_dtype"], "bf16": model.use_bf16}


def svm_key(model: RCNNModule, features: dict | None, layer: str, scale: float, c: int) -> dict:
    return {"features": features, "layer": layer, "scale": float(scale), "svm": model.cfg["svm"], "class": int(c),
            "num_classes": model.num_classes}
