"""The methods of the suite, found by their folders: every ``engine/<method>/`` package. Importing this module imports
each method's ``config.py``, which registers its config keys' rules with the schema (``register_keys``), so a new
method's keys are checked without editing anything outside its folder. A pipeline that runs on N DDP processes says
so itself (``transferrable.core.distributed.rank_aware``)."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil

import engine


def load_method_configs() -> tuple[str, ...]:
    """Import ``engine.<method>.config`` for every method folder that has one; the methods found, sorted."""
    found = []
    for info in sorted(pkgutil.iter_modules(engine.__path__), key=lambda m: m.name):
        if info.ispkg and importlib.util.find_spec(f"engine.{info.name}.config") is not None:
            importlib.import_module(f"engine.{info.name}.config")
            found.append(info.name)
    return tuple(found)


METHODS = load_method_configs()
