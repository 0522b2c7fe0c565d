"""Start-up cost: ``import sparseformer`` and ``sparseformer --help`` import neither torch nor
timm, yet timm finds our models whether it is imported before or after us.

Each check runs a fresh interpreter, since this process imported torch long ago. The checks look
at what gets imported, never at the clock: timing belongs to benchmarks, not unit tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

import sparseformer

HEAVY = ("torch", "timm", "numpy", "PIL", "torchvision", "matplotlib")


def python(code: str, *args: str, cwd=None) -> subprocess.CompletedProcess:
    proc = subprocess.run(
        [sys.executable, *args, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def heavy_in(modules) -> list[str]:
    return sorted({m.split(".")[0] for m in modules} & set(HEAVY))


def test_import_sparseformer_imports_no_torch_and_lists_the_api():
    out = python(
        """
        import json, sys
        import sparseformer
        print(json.dumps({"modules": list(sys.modules), "dir": dir(sparseformer),
                          "version": sparseformer.__version__}))
        """
    ).stdout
    seen = json.loads(out)
    assert heavy_in(seen["modules"]) == []
    assert set(sparseformer.__all__) <= set(seen["dir"])
    assert not {"Any", "TYPE_CHECKING", "annotations", "importlib"} & set(seen["dir"])
    assert seen["version"] == sparseformer.__version__


def test_every_cli_module_imports_nothing_heavy():
    """The commands import torch inside their handlers, so that --help stays instant."""
    out = python(
        """
        import importlib, json, sys
        from sparseformer.cli import COMMANDS, build_parser
        for name in ("common", *COMMANDS):
            importlib.import_module(f"sparseformer.cli.{name}")
        build_parser()  # registering every sub-command too
        print(json.dumps(list(sys.modules)))
        """
    ).stdout
    assert heavy_in(json.loads(out)) == []


@pytest.mark.parametrize("flag", ["--help", "--version"])
def test_help_and_version_import_no_torch(flag):
    proc = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "sparseformer", flag],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert ("usage: sparseformer" if flag == "--help" else "sparseformer ") in proc.stdout
    imported = [line.rsplit("|", 1)[-1].strip() for line in proc.stderr.splitlines()]
    assert "sparseformer.cli" in imported
    assert heavy_in(imported) == []


@pytest.mark.parametrize("timm_first", [False, True], ids=["timm-after", "timm-before"])
def test_timm_finds_our_models(timm_first):
    order = "import timm, sparseformer" if timm_first else "import sparseformer, timm"
    out = python(
        f"""
        import json, sys
        {order}
        from sparseformer.weights.timm_hook import _TimmFinder
        model = timm.create_model("sparseformer_v1_nano", num_classes=3)
        print(json.dumps({{
            "names": timm.list_models("sparseformer*"),
            "model": type(model).__name__,
            "loader": type(timm.__loader__).__name__,
            "finders": [type(f).__name__ for f in sys.meta_path if isinstance(f, _TimmFinder)],
        }}))
        """
    ).stdout
    seen = json.loads(out)
    assert "sparseformer_v1_tiny" in seen["names"] and "sparseformer_v1_nano" in seen["names"]
    assert seen["model"] == "SparseFormer"
    assert seen["loader"] == "SourceFileLoader"  # timm looks as if imported without us
    assert seen["finders"] == []  # the hook removed itself once it fired (or never waited)


def test_what_registration_imports_does_not_import_timm():
    """The hook imports the factory while timm's import finishes: were timm imported by a
    module on the factory's own path, that module would still be half-initialized then."""
    out = python(
        """
        import json, sys
        import sparseformer.weights.factory, sparseformer.weights.registry
        print(json.dumps(list(sys.modules)))
        """
    ).stdout
    assert "timm" not in heavy_in(json.loads(out))


def test_a_failed_registration_never_breaks_import_timm(tmp_path):
    """A stand-in timm without ``timm.models``: our registration fails, is logged, and
    ``import timm`` still succeeds."""
    (tmp_path / "timm").mkdir()
    (tmp_path / "timm" / "__init__.py").write_text("STAND_IN = True\n")
    proc = python(
        """
        import sys
        sys.path.insert(0, ".")
        import sparseformer, timm
        assert timm.STAND_IN
        print("imported")
        """,
        cwd=tmp_path,
    )
    assert "imported" in proc.stdout
    assert "could not register SparseFormer models with timm" in proc.stderr


def test_public_names_resolve_lazily():
    from sparseformer.weights import factory

    assert sparseformer.create_model is factory.create_model
    assert sparseformer.list_models("sparseformer_v1_t*") == ["sparseformer_v1_tiny"]
    assert set(sparseformer.__all__) == {"__version__", *sparseformer._LAZY}
    for name in sparseformer.__all__:
        assert getattr(sparseformer, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        sparseformer.not_a_name  # noqa: B018
