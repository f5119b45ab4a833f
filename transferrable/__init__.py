"""Run plumbing shared by train.py and eval.py: building runs from config, the source representation,
atomic files and ablation reports. Methods live in ``lightning_modules``, models in ``models``."""
