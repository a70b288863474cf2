"""The import graph the layout promises: the library (pipeline/) never imports the apps (stages/);
a stage imports no other stage (only the CLI and the two orchestrators, demo and experiment, call
stages; stages/options.py holds options, not a stage); and no module imports itself back in a cycle."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ORCHESTRATORS = {"stages.cli", "stages.demo", "stages.experiment"}
NOT_STAGES = {"stages.options"}


def imports() -> dict[str, set[str]]:
    """Module -> the project modules it imports (at top level or inside functions)."""
    graph = {}
    for package in ("pipeline", "stages"):
        for path in (ROOT / package).rglob("*.py"):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found = set()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found |= {node.module} | {f"{node.module}.{a.name}" for a in node.names}
                elif isinstance(node, ast.Import):
                    found |= {a.name for a in node.names}
            graph[name] = {m for m in found if m.split(".")[0] in ("pipeline", "stages")} - {name}
    return {k: {m for m in v if m in graph or m in ("pipeline", "stages")} for k, v in graph.items()}


def test_the_library_never_imports_the_apps():
    bad = {m: sorted(i for i in deps if i.startswith("stages")) for m, deps in imports().items() if m.startswith("pipeline.")}
    assert not {m: d for m, d in bad.items() if d}


def test_no_stage_imports_another_stage():
    graph = imports()
    stages = {m for m in graph if m.startswith("stages.")} - NOT_STAGES - {"stages.__init__"}
    bad = {m: sorted(deps & (stages - {m})) for m, deps in graph.items() if m in stages - ORCHESTRATORS}
    assert not {m: d for m, d in bad.items() if d}, "stages importing stages"


def test_the_import_graph_has_no_cycle():
    graph = imports()
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for d in graph.get(m, ()):
            visit(d)
        path.pop()
        done.add(m)
    for m in graph:
        visit(m)


def test_every_function_fits_on_one_screen():
    """A newcomer reads a function whole: none in pipeline/ or stages/ runs over 60 lines (split by
    stage of the work, as evaluate's metric families and run's per-arm steps are)."""
    long = []
    for package in ("pipeline", "stages"):
        for path in (ROOT / package).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.end_lineno - node.lineno >= 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({node.end_lineno - node.lineno + 1} lines)")
    assert not long, long
