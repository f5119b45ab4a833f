"""The methods of the suite, found by their folders: every ``engine/<method>/`` package. Importing this module imports
each method's ``config.py``, which registers its config keys' rules with the schema (``register_keys``), so a new
method's keys are checked without editing anything outside its folder. Its ``*report.py`` modules, which register
their sweep tables (``@sweep_table``), are imported by :func:`load_method_reports` for ``eval.py report=``. A
pipeline that runs on N DDP processes says so itself (``transferrable.core.distributed.rank_aware``)."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil

import engine


def method_packages() -> list[str]:
    """The method folders under engine/, sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(engine.__path__) if m.ispkg)


def load_method_configs() -> tuple[str, ...]:
    """Import ``engine.<method>.config`` for every method folder that has one; the methods found, sorted."""
    found = []
    for name in method_packages():
        if importlib.util.find_spec(f"engine.{name}.config") is not None:
            importlib.import_module(f"engine.{name}.config")
            found.append(name)
    return tuple(found)


def load_method_reports() -> list[str]:
    """Import every ``engine/<method>/*report.py`` (each registers its sweep tables); the modules imported."""
    found = []
    for name in method_packages():
        package = importlib.import_module(f"engine.{name}")
        for info in pkgutil.iter_modules(package.__path__):
            if info.name.endswith("report"):
                found.append(importlib.import_module(f"engine.{name}.{info.name}").__name__)
    return found


METHODS = load_method_configs()
