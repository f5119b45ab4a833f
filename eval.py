"""Evaluate a checkpoint, or turn a multirun into an ablation table.

``python eval.py ckpt_path=logs/classify/runs/<run>/checkpoints/last.ckpt``
``python eval.py report=logs/classify/multiruns/<sweep> metrics=[test/acc]``
``python eval.py fuse=[<rgb run>,<flow run>]`` (LRCN late fusion of two runs' per-video test scores)
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


@hydra.main(version_base="1.3", config_path="conf", config_name="eval.yaml")
@exit_on_user_error
def main(cfg: DictConfig) -> None:
    exit_on_signals()  # SIGTERM/SIGINT -> exit 143/130, never 0
    if cfg.get("report"):
        # imported here for start-up speed: only what this mode needs
        from transferrable.run.report import write_report

        print(write_report(cfg.report, cfg.get("metrics")), end="")
        print(f"(written to {Path(cfg.report) / 'report.md'}, with a knob_<knob>.png per swept knob)")
        if cfg.get("report_wandb"):
            from transferrable.run.report import log_plots_to_wandb

            log_plots_to_wandb(cfg.report)
    elif cfg.get("fuse"):
        # imported here for start-up speed: only what this mode needs
        from engine.lrcn.report import fusion_line

        if len(cfg.fuse) != 2:
            raise SystemExit("fuse=[<rgb run dir or video_scores.npz>,<flow run dir or video_scores.npz>]")
        print(fusion_line(*cfg.fuse), end="")
    elif cfg.get("ckpt_path"):
        # imported here for start-up speed: only what this mode needs
        from transferrable.run.runner import evaluate_checkpoint

        evaluate_checkpoint(cfg)
    else:
        raise SystemExit("eval.py needs ckpt_path=<checkpoint>, report=<multirun dir> or fuse=[<rgb run>,<flow run>]")


if __name__ == "__main__":
    run_entry_point(main)  # Hydra's own failures (run directory, unknown option): one line, exit 2
