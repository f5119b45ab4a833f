"""Checkpoints a user names (``ckpt_path=``) are read weights-only and checked against the run before any work.

``torch.load(weights_only=True)`` refuses any pickle that would build an object (a crafted ``__reduce__`` never
runs); the refusal becomes one line naming the override. A checkpoint written by this suite carries its run's
resolved config (``run_config_yaml``): resuming or testing it with another task (``model._target_``) or another
backbone architecture (the backbone node without weights/freeze/norm_eval/dropout)
is refused before any data is read or any pretraining starts, instead of failing later in ``load_state_dict``
with a page of missing keys.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from transferrable.core.errors import ConfigError

log = logging.getLogger(__name__)

# ckpt_path values Lightning resolves itself (``last`` also means "start fresh when there is none")
LIGHTNING_KEYWORDS = ("last", "best", "hpc", "registry")
_NOT_ARCHITECTURE = ("weights", "freeze", "norm_eval", "dropout")  # no effect on what the weights mean


def load_failure(err: BaseException) -> str:
    """A short, one-line reason why ``torch.load(weights_only=True)`` refused a file (PyTorch's own message is
    a page with terminal escapes; its ``WeightsUnpickler error`` line names the global the pickle wanted)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(err))
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    unpickler = [ln for ln in lines if ln.startswith("WeightsUnpickler error:")]
    if unpickler:  # e.g. "Unsupported global: GLOBAL io.open": the pickle would build an object / call code
        reason = unpickler[0].removeprefix("WeightsUnpickler error:").split(" was not an allowed global")[0].strip()
        return f"the pickle asks for code, refused: {reason}"
    return f"{type(err).__name__}: {(lines or [''])[0][:160]}"


def load_weights_only(path: str | Path, override: str = "ckpt_path") -> Any:
    """``torch.load(path, weights_only=True)``; a missing file or a pickle that is not plain data is one line."""
    import torch

    path = Path(os.path.expanduser(str(path)))
    if not path.is_file():
        raise FileNotFoundError(f"{override}={str(path)!r}: no such checkpoint file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - UnpicklingError, a truncated zip, ...: one line naming the file
        raise ConfigError(f"{override}={str(path)!r}: not a loadable weights-only checkpoint "
                          f"({load_failure(err)})") from None


def _architecture(backbone: DictConfig | dict | None) -> dict:
    node = OmegaConf.to_container(backbone, resolve=True) if isinstance(backbone, DictConfig) else dict(backbone or {})
    return {k: v for k, v in node.items() if k not in _NOT_ARCHITECTURE}


def check_ckpt_path(cfg: DictConfig) -> None:
    """Refuse ``ckpt_path`` when it is missing, not weights-only, or written by another task or backbone."""
    ckpt = cfg.get("ckpt_path")
    if not ckpt or str(ckpt) in LIGHTNING_KEYWORDS or "://" in str(ckpt):
        return
    blob = load_weights_only(ckpt)
    if not isinstance(blob, dict) or "state_dict" not in blob:
        raise ConfigError(f"ckpt_path={ckpt!r}: not a Lightning checkpoint (no state_dict)")
    if "run_config_yaml" not in blob:
        return  # a Lightning checkpoint from elsewhere: Lightning's own strict loading decides
    theirs = OmegaConf.create(blob["run_config_yaml"])
    their_model = theirs.get("model", {}).get("_target_")
    our_model = cfg.get("model", {}).get("_target_")
    if their_model and our_model and their_model != our_model:
        raise ConfigError(
            f"ckpt_path={ckpt!r} was written by task={theirs.get('task_name')} ({their_model}), but this run is "
            f"task={cfg.get('task_name')} ({our_model}); pass a checkpoint of this task or the matching task=")
    their_arch, our_arch = _architecture(theirs.get("backbone")), _architecture(cfg.get("backbone"))
    if their_arch and our_arch and their_arch != our_arch:
        differ = sorted(k for k in set(their_arch) | set(our_arch) if their_arch.get(k) != our_arch.get(k))
        shown = ", ".join(f"{k}: {their_arch.get(k)!r} vs {our_arch.get(k)!r}" for k in differ[:4])
        raise ConfigError(
            f"ckpt_path={ckpt!r} holds another backbone architecture than backbone= of this run "
            f"(checkpoint vs run: {shown}); use the checkpoint's backbone overrides")


def resolve_last(cfg: DictConfig) -> None:
    """``ckpt_path=last`` (hardware=slurm sets it, so a requeued job continues): the newest ``last*.ckpt`` in this
    run's checkpoint directory, as Lightning picks it, or null -- a fresh start -- when there is none, so every
    pipeline (not only Lightning's fit) gets a file or nothing, and the file is checked like any other."""
    if cfg.get("ckpt_path") != "last":
        return
    from omegaconf import open_dict

    dirpath = OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath")
    found = sorted(Path(dirpath).glob("last*.ckpt"), key=lambda p: p.stat().st_mtime) if dirpath else []
    with open_dict(cfg):
        cfg.ckpt_path = str(found[-1]) if found else None
    log.info("ckpt_path=last: %s", f"resuming from {found[-1]}" if found else "no checkpoint yet, starting fresh")
