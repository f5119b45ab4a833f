"""Train any task of the suite: ``python train.py [task=...] [backbone=...] [dataset=...] [key=value]``.

Sweeps: ``python train.py -m backbone.freeze=none,all``; reports: ``python eval.py report=<sweep dir>``.
"""

import os
from pathlib import Path

os.environ.setdefault("PROJECT_ROOT", str(Path(__file__).resolve().parent))
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# Before torch loads OpenMP: spinning OpenMP threads make every op many times slower when another process
# shares the cores (a sweep, a data loader, a second run); export OMP_WAIT_POLICY=ACTIVE to opt out.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hydra  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from transferrable.core.errors import exit_on_user_error, run_entry_point  # noqa: E402
from transferrable.core.signals import exit_on_signals  # noqa: E402


@hydra.main(version_base="1.3", config_path="conf", config_name="train.yaml")
@exit_on_user_error
def main(cfg: DictConfig) -> float | None:
    from transferrable.run.runner import train  # imported here for start-up speed (--help, --cfg job)

    exit_on_signals()  # SIGTERM/SIGINT -> exit 143/130, never 0
    metrics = train(cfg)
    return metrics.get(cfg.get("optimized_metric"))  # for hparams_search (Optuna)


if __name__ == "__main__":
    run_entry_point(main)  # Hydra's own failures (run directory, unknown option): one line, exit 2
