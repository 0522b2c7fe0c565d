"""What the built wheel will hold, checked from the source tree (fast; no build).

CI builds the wheel and checks its contents file by file (``.ci/check_dist.py``); these tests
catch the main mistake before a build: a data file that pyproject's package-data globs leave out.
"""

from __future__ import annotations

import glob
import importlib.metadata
from pathlib import Path

import pytest

import sparseformer
from sparseformer.cli import main

tomllib = pytest.importorskip("tomllib")  # Python 3.11+

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
PACKAGE = SRC / "sparseformer"


def _package_files() -> list[Path]:
    return [p for p in PACKAGE.rglob("*") if p.is_file() and "__pycache__" not in p.parts]


def _package_data() -> dict[str, list[str]]:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    return pyproject["tool"]["setuptools"].get("package-data", {})


def test_package_data_globs_cover_every_data_file():
    """Every non-.py file under src/sparseformer is matched by a package-data glob, resolved
    as setuptools resolves it: relative to the folder of the package named by the key (or to
    every package for ``*``; with ``find``'s default namespaces, every folder is a package)."""
    package_data = _package_data()
    covered: set[Path] = set()
    for folder in [PACKAGE, *(p for p in PACKAGE.rglob("*") if p.is_dir())]:
        name = ".".join(folder.relative_to(SRC).parts)
        for pattern in package_data.get(name, []) + package_data.get("*", []):
            covered |= {Path(p) for p in glob.glob(str(folder / pattern), recursive=True)}
    data = [p for p in _package_files() if p.suffix not in (".py", ".pyc")]
    assert data, "expected at least py.typed and the recipes"
    missing = sorted(str(p.relative_to(SRC)) for p in data if p not in covered)
    assert not missing, (
        f"not in [tool.setuptools.package-data] of pyproject.toml, so not in the wheel: {missing}"
    )


def test_shipped_recipes_are_package_data():
    from sparseformer.engine.recipe import list_recipes

    recipes = {p.stem for p in (PACKAGE / "recipes").glob("*.json")}
    assert recipes and set(list_recipes()) == recipes


def test_version_comes_from_the_package_metadata(capsys):
    assert sparseformer.__version__ == importlib.metadata.version("sparseformer")
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"sparseformer {sparseformer.__version__}"
