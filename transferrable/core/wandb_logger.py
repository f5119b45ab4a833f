"""The W&B logger, degrading instead of failing: a run never crashes or hangs because W&B is unreachable.

``logger=wandb`` is offline by default. With ``logger.wandb.offline=false`` the suite first checks that an API
key exists (``WANDB_API_KEY`` or a netrc entry, as ``wandb login`` writes) and that the W&B server answers a TCP
connection within ``probe_timeout`` seconds; otherwise it warns once and logs offline into the same run directory
(``wandb sync`` uploads it later). Without the wandb package it falls back to CSV. Online with a bad key would
otherwise hang for ~100 s and then fail the run.
"""

from __future__ import annotations

import logging
import netrc
import os
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


def make_wandb_logger(offline: bool = True, base_url: str | None = None, probe_timeout: float = 2.0, **kwargs):
    """``WandbLogger(offline=..., **kwargs)``, switched to offline (or CSV without wandb) when online cannot work."""
    try:
        import wandb  # noqa: F401  (WandbLogger imports it lazily; check now so the fallback happens here)
        from lightning.pytorch.loggers import WandbLogger
    except ImportError:
        from lightning.pytorch.loggers import CSVLogger

        log.warning("logger=wandb but the wandb package is not installed: logging to CSV instead")
        return CSVLogger(save_dir=kwargs.get("save_dir", "."), name="csv")
    if not offline and os.environ.get("WANDB_MODE") != "offline":
        reason = why_offline(base_url, probe_timeout)
        if reason:
            log.warning("W&B online logging is not possible (%s): logging offline instead; upload later with "
                        "`wandb sync <run dir>/wandb/offline-run-*`", reason)
            offline = True
    if offline:
        os.environ["WANDB_MODE"] = "offline"  # also for any wandb.init a callback makes
    return WandbLogger(offline=offline, **kwargs)
