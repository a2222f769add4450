"""The layout rules of docs/architecture.md, checked on the source: a method is named only in its own
file, `analysis/methods/` imports neither the engine nor the model loader, there is no import circle,
and the registry's errors are `PlanError`s (a user error), while a bug keeps its traceback."""
from __future__ import annotations

import ast
import inspect
from pathlib import Path

import pytest

from analysis.errors import PlanError
from analysis.registry import all_methods, get_method, origin

from conftest import ROOT

PRODUCT = [ROOT / "app.py", *sorted((ROOT / "pages").glob("*.py"))] + [
    path for folder in ("analysis", "viz", "ui") for path in sorted((ROOT / folder).rglob("*.py"))]


def _constants(path: Path) -> list[tuple[str, int]]:
    tree = ast.parse(path.read_text())
    return [(node.value, node.lineno) for node in ast.walk(tree) if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def test_every_method_name_appears_only_in_its_own_file():
    homes = {name: Path(inspect.getfile(type(method))).resolve() for name, method in all_methods().items()
             if origin(name) == "builtin"}
    assert {"evit", "tome", "bat"} <= set(homes)
    stray = [f"{path.relative_to(ROOT)}:{line}: {value!r}" for path in PRODUCT for value, line in _constants(path)
             if value in homes and homes[value] != path.resolve()]
    assert not stray, stray
    # the issue's own check, literally: '"tome"' in the product code only in analysis/methods/tome.py
    quoted = [str(path.relative_to(ROOT)) for path in PRODUCT if '"tome"' in path.read_text()]
    assert quoted == ["analysis/methods/tome.py"], quoted


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Project modules that `path` imports anywhere in the file (function-level imports included)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_no_import_circle_and_methods_below_the_engine():
    files = {_module_name(path): path for path in PRODUCT if path.parent.name != "pages" and path.name != "app.py"}
    modules = set(files)
    graph = {name: _imports(path, modules) for name, path in files.items()}
    for name, targets in graph.items():
        if name.startswith("analysis.methods"):
            assert not targets & {"analysis.engine", "analysis.models", "analysis.gmacs", "analysis.sweep"}, (name, targets)
    # a package importing its own submodules (analysis.methods -> analysis.methods.base) is not a circle
    graph = {name: {t for t in targets if not t.startswith(name + ".")} for name, targets in graph.items()}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                raise AssertionError(f"import circle: {' -> '.join(path[path.index(target):] + [target])}")
            if target not in state:
                visit(target)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_unknown_method_is_a_plan_error():
    with pytest.raises(PlanError, match="unknown method 'nosuch'"):
        get_method("nosuch")


def test_a_bug_in_a_command_keeps_its_traceback(monkeypatch):
    """The CLI catches TokenscopeError alone: a KeyError from tokenscope's own code is not printed as
    `error: 'top1'` but raised with its traceback."""
    import analysis.cli.inspect as inspect_cli
    from analysis.cli import main

    def broken(args):
        return {}["top1"]

    monkeypatch.setattr(inspect_cli, "main", broken)
    with pytest.raises(KeyError, match="top1"):
        main(["inspect", str(ROOT / "assets" / "cat.jpg")])


def test_every_method_has_its_own_colour():
    """Two methods sharing a colour would be told apart in the charts by their marker alone."""
    from analysis.registry import all_methods
    from viz.palette import method_colour

    colours = {name: method_colour(name) for name in all_methods()}
    assert len(set(colours.values())) == len(colours), colours
