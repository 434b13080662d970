"""The layout is the data flow: layers import only downwards, no cycles, no oversized module.

Counted from the source with ``ast``, lazy imports inside functions included, so the rules hold
for every import the code can execute. docs/architecture.md describes the same layers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.conftest import ROOT

PACKAGES = ("recsys", "pipelines", "benchmarks")
MAX_LINES = 400
# Lowest first; a module belongs to the longest prefix that names it.
LAYERS = (
    "recsys",  # the package root holds nothing but its version
    "recsys.core",
    "recsys.config",
    "recsys.data",
    "recsys.quantized",
    "recsys.ranking",
    "recsys.model",
    "recsys.training",
    "recsys.evaluation",
    "recsys.serving",
    "pipelines",
    "benchmarks",
    "pipelines.cli",
)


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {
        _module_name(path): path
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def _imports(path: Path, known: set[str]) -> set[str]:
    """The project modules one file imports, wherever the import statement sits."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{alias.name}" for alias in node.names] + [node.module]
            names = [n for n in names if n in known] or [node.module]
            if len(names) > 1:
                names = names[:-1]  # `from pkg import module`: the modules, not the package
        else:
            continue
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name:
                found.add(name)
    return found


def _layer(module: str) -> int:
    matches = [i for i, p in enumerate(LAYERS) if module == p or module.startswith(p + ".")]
    assert matches, f"{module} is in no layer: add it to LAYERS and docs/architecture.md"
    return max(matches, key=lambda i: len(LAYERS[i]))


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(path, known) - {name} for name, path in modules.items()}


def test_no_import_goes_from_a_lower_layer_to_a_higher_one(graph: dict[str, set[str]]) -> None:
    upward = [
        f"{src} ({LAYERS[_layer(src)]}) imports {dst} ({LAYERS[_layer(dst)]})"
        for src, targets in sorted(graph.items())
        for dst in sorted(targets)
        if _layer(dst) > _layer(src)
    ]
    assert upward == []


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Tarjan's strongly connected components of two or more modules: the import cycles."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_there_is_no_import_cycle(graph: dict[str, set[str]]) -> None:
    assert cycles(graph) == []


def test_the_checker_sees_lazy_imports_and_cycles(tmp_path: Path) -> None:
    """The rules above could fail: a lazy upward import and a two-module cycle are found."""
    a, b = tmp_path / "a.py", tmp_path / "b.py"
    a.write_text("def f():\n    from recsys.serving.recommender import SessionRecommender\n")
    b.write_text("from recsys.core import errors, atomic\nimport recsys.ranking\n")
    known = set(_modules())
    assert _imports(a, known) == {"recsys.serving.recommender"}
    assert _imports(b, known) == {"recsys.core.errors", "recsys.core.atomic", "recsys.ranking"}
    assert _layer("recsys.serving.recommender") > _layer("recsys.model.gru4rec")
    assert _layer("pipelines.cli") > _layer("benchmarks.runner") > _layer("pipelines.train")
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_module_uses_relative_imports() -> None:
    """The checker resolves absolute names only; a relative import would pass unseen."""
    relative = [
        f"{name}:{node.lineno}"
        for name, path in _modules().items()
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.ImportFrom) and node.level > 0
    ]
    assert relative == []


def test_no_module_is_over_the_size_limit() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in _modules().items()}
    assert {name: n for name, n in sizes.items() if n > MAX_LINES} == {}


def test_the_benchmarks_live_outside_the_pipeline_steps() -> None:
    assert sorted(p.name for p in (ROOT / "pipelines").glob("bench*.py")) == []
    assert (ROOT / "benchmarks" / "runner.py").is_file()
