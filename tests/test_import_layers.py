"""Layers point one way: the project's import graph, function-local imports included, has no cycle.

    core (transferrable.core.errors, atomic files, manifests, precision, ...)
      <- models/, datamodules/
      <- lightning_modules/, callbacks/
      <- engine/ (one pipeline per method)
      <- transferrable.run.runner
      <- entry points (train.py, eval.py, bench/)

Pure ``ast`` (nothing is imported), so it runs in well under a second. Every ``import`` and ``from ... import``
statement anywhere in a file counts: at module level, inside functions, under ``TYPE_CHECKING`` or ``try``. A
cycle is a strongly connected component of more than one module (or a module importing itself).
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("models", "datamodules", "lightning_modules", "callbacks", "engine", "transferrable", "bench")
SCRIPTS = ("train.py", "eval.py")


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    """Every project module by dotted name (a package by its ``__init__``)."""
    files = [ROOT / s for s in SCRIPTS]
    for pkg in PACKAGES:
        files += sorted((ROOT / pkg).rglob("*.py"))
    return {_module_name(f): f for f in files if f.is_file()}


def _resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module ``name`` lives in: itself, or its longest enclosing project module."""
    while name:
        if name in modules:
            return name
        name = name.rpartition(".")[0]
    return None


def imports_of(mod: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The project modules ``mod`` imports anywhere in its file."""
    is_pkg = path.name == "__init__.py"
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: ``from . import x`` / ``from ..pkg import y``
                anchor = mod.split(".") if is_pkg else mod.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # ``from pkg import sub`` imports the submodule ``pkg.sub`` when there is one, else names of ``pkg``.
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        for t in targets:
            hit = _resolve(t, modules)
            if hit is not None:
                out.add(hit)
    return out


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {m: imports_of(m, p, modules) for m, p in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module, or a module importing itself (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    counter = 0

    def visit(v: str) -> None:  # recursion depth is bounded by the module count (~150)
        nonlocal counter
        index[v] = low[v] = counter
        counter += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1 or v in graph.get(v, ()):
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


# A module's layer is its folder's: the longest prefix of its dotted name listed here. No exceptions list.
LAYERS = {
    "transferrable": 0,  # the package itself (a docstring); tests/test_import_layers checks it holds no module
    "transferrable.core": 0,
    "transferrable.metrics": 1, "transferrable.viz": 1,
    "models": 2, "datamodules": 2,
    "lightning_modules": 3, "callbacks": 3,
    "engine": 4,
    "transferrable.run": 5,
    "train": 6, "eval": 6, "bench": 6,
}
LOWER_FOLDERS = ("transferrable.core", "transferrable.metrics", "transferrable.viz")


def layer(mod: str) -> int | None:
    """The layer of the longest listed prefix of ``mod`` (``None``: a module no folder places)."""
    parts = mod.split(".")
    for n in range(len(parts), 0, -1):
        prefix = ".".join(parts[:n])
        if prefix in LAYERS:
            return LAYERS[prefix] if (prefix != "transferrable" or mod == "transferrable") else None
    return None


def method_names() -> set[str]:
    """The methods, by the task names in conf/task/ and their first words (``lrcn_caption`` -> ``lrcn``)."""
    tasks = {p.stem for p in (ROOT / "conf" / "task").glob("*.yaml")}
    return tasks | {t.split("_")[0] for t in tasks}


def _describe(comp: list[str], graph: dict[str, set[str]]) -> str:
    members = set(comp)
    edges = [f"    {a} -> {b}" for a in comp for b in sorted(graph[a] & members)]
    return "  {" + ", ".join(comp) + "}\n" + "\n".join(edges)


def test_graph_sees_the_project():
    """The walk finds the packages and resolves imports (a broken walk would pass vacuously)."""
    graph = import_graph()
    assert {"train", "eval", "transferrable.run.runner", "models.backbones", "datamodules.base"} <= set(graph)
    assert "transferrable.run.runner" in graph["train"]
    assert any(graph[m] for m in graph if m.startswith("lightning_modules."))


def test_cycle_finder_finds_a_function_local_cycle(tmp_path):
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c"], ["e"]]


def test_errors_is_a_leaf():
    """``transferrable.core.errors`` is imported by every layer, so it imports nothing of the project."""
    assert import_graph()["transferrable.core.errors"] == set()


def test_every_module_has_a_layer():
    missing = sorted(m for m in import_graph() if layer(m) is None)
    assert not missing, f"modules in no layer's folder (move them into one): {missing}"


def test_layer_of_a_module_is_its_folders():
    assert layer("transferrable.core.errors") == 0 and layer("transferrable.viz.tsne") == 1
    assert layer("engine.rcnn.pipeline") == 4 and layer("transferrable.run.runner") == 5
    assert layer("transferrable.stray") is None and layer("somewhere.else") is None


def test_lower_folders_name_no_method():
    """transferrable/core, metrics and viz serve every method: no module or top-level definition there is named after
    one (a method's code lives in engine/<method>/)."""
    methods = method_names()
    assert {"rcnn", "decaf", "bigan", "lrcn"} <= methods
    named = []
    for mod, path in project_modules().items():
        if not mod.startswith(LOWER_FOLDERS):
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        defs = [n.name for n in tree.body if isinstance(n, ast.FunctionDef | ast.ClassDef)]
        defs += [t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)]
        for name in [mod.rsplit(".", 1)[-1], *defs]:
            if set(name.lower().strip("_").split("_")) & methods:
                named.append(f"{mod}: {name}")
    assert not named, "names of methods in the lower folders:\n  " + "\n  ".join(named)


def test_callbacks_are_leaves():
    """Callbacks are built from config (``_target_``); no module imports one, so a callback is never a library."""
    graph = import_graph()
    users = sorted(f"{a} -> {b}" for a in graph for b in graph[a]
                   if b.startswith("callbacks") and not a.startswith("callbacks"))
    assert not users, f"modules that import a callback: {users}"


def test_each_method_has_one_home():
    """Every task's pipeline target (conf/task/*.yaml) lives in its method's own engine/<method>/ package."""
    import yaml

    for path in sorted((ROOT / "conf" / "task").glob("*.yaml")):
        target = (yaml.safe_load(path.read_text()).get("pipeline") or {}).get("_target_", "engine.single_fit.run")
        parts = target.split(".")
        assert parts[0] == "engine", (path.name, target)
        if target != "engine.single_fit.run":
            assert parts[1] in method_names() and (ROOT / "engine" / parts[1]).is_dir(), (path.name, target)


def test_no_import_cycles():
    graph = import_graph()
    found = cycles(graph)
    assert not found, "import cycles (function-local imports included):\n" + "\n".join(
        _describe(c, graph) for c in found)


def test_layers_point_one_way():
    graph = import_graph()
    upward = [f"  {a} (layer {layer(a)}) -> {b} (layer {layer(b)})"
              for a in sorted(graph) for b in sorted(graph[a]) if layer(b) > layer(a)]
    assert not upward, "imports that point up the layers:\n" + "\n".join(upward)
