"""Pipelines: how each method's stages run (torchvision references' ``engine.py``), one file per method.

A pipeline is ``run(cfg, trainer, datamodule, model) -> metrics`` and is chosen by the task's config
(``pipeline: {_target_: engine.<method>.run, _partial_: true}``); ``transferrable/run/runner.py`` builds the objects and
calls it. LightningModules keep their steps, metrics and ``configure_optimizers``; pipelines never define steps.
Layering: core (``transferrable/errors``, ``precision``, caches) <- models, datamodules, lightning_modules <- engine
<- runner <- ``train.py`` / ``eval.py``.
"""
