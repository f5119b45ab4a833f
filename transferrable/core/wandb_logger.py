"""The W&B logger, degrading instead of failing: a run never crashes or hangs because W&B is unreachable.

``logger=wandb`` is offline by default. With ``logger.wandb.offline=false`` the suite first checks that an API
key exists (``WANDB_API_KEY`` or a netrc entry, as ``wandb login`` writes) and that the W&B server answers a TCP
connection within ``probe_timeout`` seconds; otherwise it warns once and logs offline into the same run directory
(``wandb sync`` uploads it later). Without the wandb package it falls back to CSV. Online with a bad key would
otherwise hang for ~100 s and then fail the run.

An explicit ``logger.wandb.offline=false`` wins over a ``WANDB_MODE=offline`` in the environment (the Makefile
exports one): the run says so and goes online. Offline, ``log_model`` is dropped with one warning (Lightning refuses
it: checkpoints cannot be uploaded offline). :func:`log_lineage` logs the run's starting weights (the source
representation, a BiGAN encoder, a checkpoint) and its composed config as W&B artifacts, so a run can be traced to
the weights it started from.
"""

from __future__ import annotations

import logging
import netrc
import os
import re
import socket
from urllib.parse import urlparse

log = logging.getLogger(__name__)

DEFAULT_BASE_URL = "https://api.wandb.ai"


def _server(base_url: str | None) -> tuple[str, int]:
    url = urlparse(base_url or os.environ.get("WANDB_BASE_URL") or DEFAULT_BASE_URL)
    return url.hostname or "api.wandb.ai", url.port or (80 if url.scheme == "http" else 443)


def has_api_key(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc(os.environ.get("NETRC")).authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def server_reachable(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def why_offline(base_url: str | None = None, probe_timeout: float = 2.0) -> str | None:
    """None when online logging can work; otherwise the reason, for the warning."""
    host, port = _server(base_url)
    if not has_api_key(host):
        return f"no W&B API key (set WANDB_API_KEY or run `wandb login`) for {host}"
    if not server_reachable(host, port, probe_timeout):
        return f"the W&B server {host}:{port} did not answer within {probe_timeout:g} s"
    return None


def make_wandb_logger(offline: bool = True, base_url: str | None = None, probe_timeout: float = 2.0,
                      lineage: bool = True, **kwargs):
    """``WandbLogger(offline=..., **kwargs)``, switched to offline (or CSV without wandb) when online cannot work.
    ``lineage``: :func:`log_lineage` logs the run's weights and config as artifacts."""
    try:
        import wandb  # noqa: F401  (WandbLogger imports it lazily; check now so the fallback happens here)
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:
        from lightning.pytorch.loggers import CSVLogger

        log.warning("logger=wandb but the wandb package is not installed: logging to CSV instead")
        return CSVLogger(save_dir=kwargs.get("save_dir", "."), name="csv")
    if not offline:  # asked for explicitly (the YAML default is offline): it wins over WANDB_MODE=offline
        reason = why_offline(base_url, probe_timeout)
        if reason:
            log.warning("W&B online logging is not possible (%s): logging offline instead; upload later with "
                        "`wandb sync <run dir>/wandb/offline-run-*`", reason)
            offline = True
        elif os.environ.get("WANDB_MODE") in ("offline", "dryrun", "disabled"):
            log.warning("logger.wandb.offline=false: logging online although WANDB_MODE=%s (the Makefile exports "
                        "WANDB_MODE=offline; the explicit setting wins)", os.environ["WANDB_MODE"])
    os.environ["WANDB_MODE"] = "offline" if offline else "online"  # also for any wandb.init a callback makes
    if offline and kwargs.get("log_model"):
        log.warning("logger.wandb.log_model=%s needs online logging (checkpoints cannot be uploaded offline): "
                    "not logging checkpoints to W&B; they stay in <run dir>/checkpoints", kwargs["log_model"])
        kwargs["log_model"] = False
    logger = WandbLogger(offline=offline, **kwargs)
    logger.transferrable_lineage = bool(lineage)
    return logger


def _artifact_name(text: str) -> str:
    """W&B artifact names take letters, digits, dashes, underscores and dots."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-")[:120] or "artifact"


def log_lineage(loggers: list, cfg) -> list[str]:
    """Log, on every W&B logger with ``lineage`` on (rank 0 only), the weights the run starts from
    (``backbone.weights`` when it names a file: the cached source representation, a BiGAN encoder, a checkpoint)
    and the run's composed config as artifacts. Online the weights are an input of the run (``use_artifact``, the
    lineage graph); offline W&B cannot use artifacts, so they are logged by this run, with their sha256 in the
    run config either way. Returns the names of the artifacts logged."""
    from pathlib import Path

    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.utilities import rank_zero_only
    from omegaconf import OmegaConf

    if rank_zero_only.rank != 0:
        return []
    names: list[str] = []
    for lg in loggers:
        if not (isinstance(lg, WandbLogger) and getattr(lg, "transferrable_lineage", False)):
            continue
        import wandb

        from transferrable.core.artifact_cache import file_sha256

        run = lg.experiment
        weights = (cfg.get("backbone") or {}).get("weights")
        if isinstance(weights, str) and Path(weights).is_file():
            path = Path(weights)
            sha = file_sha256(path)
            art = wandb.Artifact(_artifact_name(path.stem), type="weights",
                                 metadata={"path": str(path), "sha256": sha, "architecture": cfg.backbone.get("_target_"),
                                           "source_dataset": cfg.get("source_dataset")})
            art.add_file(str(path))
            run.config.update({"lineage": {"weights": str(path), "weights_sha256": sha}}, allow_val_change=True)
            (run.log_artifact if run.offline else run.use_artifact)(art)
            names.append(art.name)
        config = wandb.Artifact(_artifact_name(f"config-{cfg.get('task_name', 'run')}"), type="config")
        with config.new_file("config.yaml") as f:
            f.write(OmegaConf.to_yaml(cfg, resolve=True))
        run.log_artifact(config)
        names.append(config.name)
    return names
