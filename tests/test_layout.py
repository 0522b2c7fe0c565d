"""The package's shape: the root shows the architecture, files and functions stay readable,
imports run one way (no cycles, nothing imports the CLI, commands share helpers through one
module). Read from the source text with ``ast``; nothing is imported."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "sparseformer"
ROOT = {
    "__init__.py", "__main__.py", "config.py", "export.py", "py.typed", "recipes",
    "layers", "models", "weights", "data", "engine", "viz", "bench", "bootstrap", "cli",
}  # fmt: skip
MAX_FILE_LINES = 400
MAX_FUNCTION_LINES = 80
CLI_SHARED = "sparseformer.cli.common"  # the one CLI module that commands import from


def _modules() -> dict[str, Path]:
    names = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(SRC).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


MODULES = _modules()


def _imports(name: str, path: Path) -> set[str]:
    """The package's modules that ``name`` imports, at any depth of its code."""
    found = set()
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1])
                base = f"{base}.{node.module}" if node.module else base
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base
                for alias in node.names
            ]
        else:
            continue
        for target in targets:
            while target and target not in MODULES:
                target = target.rpartition(".")[0]
            found |= {t for t in _with_packages(target) if _outside(t, name)}
    return found


def _with_packages(target: str) -> list[str]:
    """``target`` and the packages above it, whose ``__init__`` importing it runs first."""
    parts = target.split(".")
    return [".".join(parts[:n]) for n in range(2, len(parts) + 1)] if target else []


def _outside(target: str, name: str) -> bool:
    """An import of ``target`` that can close a cycle for ``name``: not itself, and not a
    package that ``name`` lies in (whose ``__init__`` runs before ``name`` anyway)."""
    return target != name and not name.startswith(target + ".")


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def test_the_root_holds_one_entry_per_concern():
    entries = {p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    assert entries == ROOT, f"unexpected: {sorted(entries - ROOT)}; missing: {ROOT - entries}"


@pytest.mark.parametrize("name", sorted(MODULES))
def test_files_and_functions_stay_short(name):
    source = MODULES[name].read_text()
    assert source.count("\n") <= MAX_FILE_LINES, f"{name}: split it by concern"
    long = [
        f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
        for node in ast.walk(ast.parse(source))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES
    ]
    assert not long, f"{name}: {long}"


def test_the_import_graph_has_no_cycles():
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(name: str, path: list[str]) -> None:
        state[name] = 1
        for target in sorted(GRAPH[name]):
            if state.get(target) == 1:
                cycle = path[path.index(target) :] + [target]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if target not in state:
                visit(target, path + [target])
        state[name] = 2

    for name in sorted(GRAPH):
        if name not in state:
            visit(name, [name])


def test_only_the_cli_imports_the_cli_and_commands_share_one_module():
    for name, targets in GRAPH.items():
        cli = {t for t in targets if t.startswith("sparseformer.cli")}
        if name == "sparseformer.__main__":
            assert cli == {"sparseformer.cli"}
        elif not name.startswith("sparseformer.cli"):
            assert not cli, f"{name} imports the CLI: {cli}"
        elif name not in ("sparseformer.cli", CLI_SHARED):
            assert cli <= {"sparseformer.cli", CLI_SHARED}, f"{name} imports {cli}"
