"""W&B robustness: asking for online logging without a key or without a reachable server degrades to offline
logging with one warning, instead of hanging or crashing the run. No traffic leaves the machine: the
"server" is a socket on 127.0.0.1."""

from __future__ import annotations

import logging
import socket

import pytest
from hydra.utils import instantiate

from transferrable.core.wandb_logger import make_wandb_logger, why_offline


@pytest.fixture
def no_credentials(monkeypatch, tmp_path):
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    (tmp_path / "netrc").write_text("")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the block ends: connecting is refused at once


def test_online_without_api_key_logs_offline_with_a_warning(no_credentials, tmp_path, caplog):
    with caplog.at_level(logging.WARNING):
        lg = make_wandb_logger(offline=False, save_dir=str(tmp_path), project="t")
    assert lg._offline
    assert any("no W&B API key" in r.getMessage() and "wandb sync" in r.getMessage() for r in caplog.records)


def test_online_with_unreachable_server_logs_offline(no_credentials, monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    url = f"http://127.0.0.1:{_closed_port()}"
    with caplog.at_level(logging.WARNING):
        lg = make_wandb_logger(offline=False, base_url=url, probe_timeout=0.5, save_dir=str(tmp_path), project="t")
    assert lg._offline
    assert any("did not answer" in r.getMessage() and "127.0.0.1" in r.getMessage() for r in caplog.records)


def test_key_from_netrc_and_a_listening_server_allow_online(no_credentials, tmp_path):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        port = server.getsockname()[1]
        (tmp_path / "netrc").write_text(f"machine 127.0.0.1\n  login user\n  password {'k' * 40}\n")
        assert why_offline(f"http://127.0.0.1:{port}", probe_timeout=1.0) is None
    assert "no W&B API key" in why_offline("http://elsewhere.invalid", probe_timeout=0.1)


def test_logger_config_builds_the_degrading_logger(make_cfg, no_credentials):
    cfg = make_cfg("logger=wandb", "logger.wandb.offline=false",
                   f"logger.wandb.base_url=http://127.0.0.1:{_closed_port()}", "logger.wandb.probe_timeout=0.5")
    lg = instantiate(cfg.logger.wandb)
    assert type(lg).__name__ == "WandbLogger" and lg._offline


# -- issue 28: log_model offline, an explicit offline=false over WANDB_MODE=offline ----------------------------------
def test_offline_drops_log_model_with_one_warning(no_credentials, tmp_path, caplog):
    """Lightning refuses log_model with offline=True; the default offline logger and the no-key fallback both drop
    it with one warning instead of crashing the run."""
    for offline in (True, False):  # the YAML default, and online asked for without a key (falls back)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            lg = make_wandb_logger(offline=offline, log_model=True, save_dir=str(tmp_path), project="t")
        assert lg._offline and lg._log_model is False
        dropped = [r for r in caplog.records if "log_model" in r.getMessage()]
        assert len(dropped) == 1 and "checkpoints cannot be uploaded offline" in dropped[0].getMessage()


def test_explicit_offline_false_wins_over_wandb_mode_offline(no_credentials, monkeypatch, tmp_path, caplog):
    """``make train ARGS="logger.wandb.offline=false"`` runs under the Makefile's WANDB_MODE=offline: with a key and a
    server that answers (a local socket here; nothing is sent) it goes online and says it overrode the variable."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        url = f"http://127.0.0.1:{server.getsockname()[1]}"
        with caplog.at_level(logging.WARNING):
            lg = make_wandb_logger(offline=False, base_url=url, probe_timeout=1.0, save_dir=str(tmp_path), project="t")
    assert lg._offline is False
    import os

    assert os.environ["WANDB_MODE"] == "online"  # what wandb.init reads (Lightning leaves it alone online)
    assert any("WANDB_MODE=offline" in r.getMessage() and "explicit setting wins" in r.getMessage()
               for r in caplog.records)


def test_default_offline_sets_wandb_mode_offline(no_credentials, monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "online")
    lg = make_wandb_logger(offline=True, save_dir=str(tmp_path), project="t")
    import os

    assert lg._offline and os.environ["WANDB_MODE"] == "offline"
