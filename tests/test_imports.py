"""The import graph of fewstep: no cycles, and every import points down the layers of DESIGN.md rule 13.

Read from the source with ``ast`` (module-level and function-level imports alike, since a function-level import is a
cycle deferred, not removed), so a new upward import fails here instead of at some later import order.
"""
from __future__ import annotations

import ast
import graphlib
from pathlib import Path

import fewstep

ROOT = Path(fewstep.__file__).resolve().parent

#: fewstep's layers, lowest first (DESIGN.md rule 13); a module may import from its own layer and the ones below
LAYERS: list[tuple[str, ...]] = [
    ("errors", "io", "options", "config"),
    ("diffusion",),
    ("models", "data", "eval"),
    ("student",),
    ("methods",),
    ("train",),
    ("api", "distillation", "report", "export", "zoo", "demo", "bench"),
    ("cli", ""),  # "" is the package itself (it imports the API lazily, by name)
]


def _modules() -> dict[str, tuple[Path, bool]]:
    """``{dotted name: (file, is a package)}`` for every module of fewstep."""
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = ["fewstep", *path.relative_to(ROOT).with_suffix("").parts]
        package = parts[-1] == "__init__"
        out[".".join(parts[:-1] if package else parts)] = (path, package)
    return out


def import_graph() -> dict[str, set[str]]:
    """``{module: the fewstep modules it imports anywhere in its source}`` (``from .x import name`` counts as
    importing ``x.name`` when that is a module, else ``x``)."""
    modules = _modules()
    graph: dict[str, set[str]] = {}
    for name, (path, package) in modules.items():
        here = name.split(".") if package else name.split(".")[:-1]
        edges: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ImportFrom):
                base = here[: len(here) - node.level + 1] if node.level else []
                target = ".".join(base + ([node.module] if node.module else []))
                for alias in node.names:
                    sub = f"{target}.{alias.name}"
                    edges.add(sub if sub in modules else target)
            elif isinstance(node, ast.Import):
                edges.update(alias.name for alias in node.names)
        graph[name] = {e for e in edges if e in modules and e != name}
    return graph


def layer(module: str) -> int:
    top = module.split(".")[1] if "." in module else ""
    for i, names in enumerate(LAYERS):
        if top in names:
            return i
    raise AssertionError(f"{module} is in no layer of LAYERS; add it where it belongs")


def test_graph_reads_function_level_and_relative_imports():
    graph = import_graph()
    # function-level (api.load_model), relative two levels up (train/teacher.py), package __init__ (fewstep.train)
    assert "fewstep.student" in graph["fewstep.api"]
    assert "fewstep.methods.base" in graph["fewstep.train.teacher"]
    assert "fewstep.train.loop" in graph["fewstep.train"]
    assert "fewstep.diffusion.samplers" in graph["fewstep.train.teacher"]  # inside teacher_sample_writer


def test_no_import_cycle():
    try:
        graphlib.TopologicalSorter(import_graph()).prepare()
    except graphlib.CycleError as e:
        raise AssertionError(f"fewstep's imports form a cycle: {' -> '.join(reversed(e.args[1]))}") from None


def test_imports_point_down_the_layers():
    upward = sorted(f"{a} -> {b}" for a, targets in import_graph().items() for b in targets if layer(b) > layer(a))
    assert not upward, f"imports from a higher layer (DESIGN.md rule 13): {'; '.join(upward)}"
