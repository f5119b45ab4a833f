"""Benchmarks of the suite against its references and the machine's limits, as ratios from one run.

``python -m bench`` runs every entry registered with :func:`bench.registry.benchmark`; each topic lives
in its own module here (``bench/<topic>.py``) and is found automatically. See ``bench/__main__.py``.
"""

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Benchmarks never touch the network and must resolve the suite's configs from the repository root.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("PROJECT_ROOT", str(ROOT))
