"""The authors' SparseFormer as a benchmark model: ``sparseformer bench --official PATH``.

For users who want to check this project's speed against the original: PATH is the authors'
v1 ImageNet code (github.com/showlab/sparseformer), a checkout or the one Python file that
defines their model. The model class is found by reading the source (no code runs until the
file that defines it is imported): a class whose ``__init__`` takes the v1 constructor
arguments (``conv_dim``, ``num_latent_tokens``, ``token_sampling_points``,
``width_configurations``, ``block_sizes``, ``repeats``), the arguments the authors' outputs in
this project's conformance fixtures were made with. It is built with the same architecture as
the SparseFormer it is compared with and timed beside it, in the same run, as
``authors:<name>``.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import inspect
import logging
import sys
from pathlib import Path

from torch import nn

from sparseformer.bench.results import BenchError
from sparseformer.config import SparseFormerConfig, VideoSparseFormerConfig
from sparseformer.weights.registry import MODELS, split_tag

__all__ = [
    "PREFIX",
    "official_name",
    "official_counterparts",
    "official_kwargs",
    "timed_models",
    "build_official",
]

log = logging.getLogger(__name__)

PREFIX = "authors:"
# the v1 constructor's architecture arguments; a class taking these is the authors' model
V1_ARGUMENTS = (
    "conv_dim",
    "num_latent_tokens",
    "token_sampling_points",
    "width_configurations",
    "block_sizes",
    "repeats",
)
_SKIP_DIRS = {".git", ".venv", "venv", "env", "__pycache__", "build", "dist", "node_modules"}


def official_name(name: str) -> str:
    """The row name of the authors' implementation of ``name``."""
    return PREFIX + name


def timed_models(models: tuple[str, ...], path: str | None) -> tuple[str, ...]:
    """``models``, then the authors' implementation of each it has (with ``path``)."""
    if path is None:
        return models
    theirs = tuple(official_name(n) for n in official_counterparts(models))
    if not theirs:
        known = [n for n in MODELS if official_kwargs_or_none(n) is not None]
        raise BenchError(
            "--official compares the authors' code with the same architecture of ours: add one "
            f"they released ({', '.join(known)}) to --models"
        )
    return models + theirs


def official_counterparts(models: tuple[str, ...]) -> list[str]:
    """The models of ``models`` that the authors' v1 code can build: v1 image SparseFormers."""
    return [name for name in models if official_kwargs_or_none(name) is not None]


def official_kwargs_or_none(name: str, num_classes: int = 1000) -> dict | None:
    """:func:`official_kwargs` of a registered v1 image SparseFormer, else ``None``."""
    spec = MODELS.get(split_tag(name)[0])  # a released model's tag: the same architecture
    if spec is None or isinstance(spec.config, VideoSparseFormerConfig):
        return None
    if not _is_v1(spec.config):  # bootstrapped models: not the v1 code's architecture
        return None
    return official_kwargs(spec.config, num_classes)


def _is_v1(config: SparseFormerConfig) -> bool:
    """Whether the v1 constructor can build ``config``: every field it cannot set at its v1
    default (stages of the default ops, no stage embedding or own activation)."""
    from dataclasses import fields

    from sparseformer.config import StageConfig

    settable = {"stages", "num_tokens", "num_points", "stem_channels", "drop_path_rate",
                "num_classes"}  # fmt: skip
    v1 = SparseFormerConfig()
    fixed = [f.name for f in fields(config) if f.name not in settable]
    if any(getattr(config, name) != getattr(v1, name) for name in fixed):
        return False
    return all(s == StageConfig(s.width, s.depth, s.repeats) for s in config.stages)


def official_kwargs(config: SparseFormerConfig, num_classes: int = 1000) -> dict:
    """The authors' v1 constructor arguments for ``config``'s architecture."""
    return {
        "conv_dim": config.stem_channels,
        "num_latent_tokens": config.num_tokens,
        "token_sampling_points": config.num_points,
        "width_configurations": [s.width for s in config.stages],
        "block_sizes": [s.depth for s in config.stages],
        "repeats": [s.repeats for s in config.stages],
        "drop_path_rate": config.drop_path_rate,
        "num_classes": num_classes,
    }


def build_official(path: str | Path, name: str, num_classes: int = 1000) -> nn.Module:
    """The authors' model of ``name``'s architecture, from their code at ``path``."""
    kwargs = official_kwargs_or_none(name, num_classes)
    if kwargs is None:
        raise BenchError(f"the authors' v1 code has no {name}: compare a v1 image SparseFormer")
    cls = load_official_class(Path(path).expanduser().resolve())
    accepted = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    kwargs = {k: v for k, v in kwargs.items() if takes_any or k in accepted}
    try:
        model = cls(**kwargs)
    except Exception as exc:
        raise BenchError(
            f"--official: {cls.__module__}.{cls.__qualname__}({_call(kwargs)}) failed: "
            f"{type(exc).__name__}: {exc}"
        ) from None
    if not isinstance(model, nn.Module):
        raise BenchError(f"--official: {cls.__qualname__} did not build a torch module")
    log.info("the authors' %s: %s.%s(%s)", name, cls.__module__, cls.__qualname__, _call(kwargs))
    return _LogitsOnly(model)


def _call(kwargs: dict) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in kwargs.items())


class _LogitsOnly(nn.Module):
    """The authors' model, returning the logits only (a tuple or dict output's first tensor)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """The authors' model's own switch (``--grad-checkpointing``), where it has one."""
        self.model.set_grad_checkpointing(enable)

    def forward(self, x):
        out = self.model(x)
        if isinstance(out, dict):
            out = next(iter(out.values()))
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out


@functools.cache
def load_official_class(path: Path) -> type:
    """Import the class of the authors' v1 model from ``path`` (a directory or a .py file);
    once per path and run: every input size of a bench builds their model again."""
    if not path.exists():
        raise BenchError(f"--official {path}: no such file or directory (give the authors' code)")
    files = [path] if path.is_file() else sorted(_python_files(path))
    broken: list[str] = []  # files that do not parse, said where nothing else is found
    found = [(file, cls) for file in files for cls in _v1_classes(file, broken)]
    if not found:
        unparsed = f"; {broken[0]}" if broken else ""
        raise BenchError(
            f"--official {path}: no class there takes the v1 constructor arguments "
            f"({', '.join(V1_ARGUMENTS)}){unparsed}; give the authors' v1 ImageNet code "
            "(github.com/showlab/sparseformer)"
        )
    found.sort(key=lambda fc: (fc[1] != "SparseFormer", "video" in fc[1].lower()))
    file, class_name = found[0]
    if len(found) > 1:
        log.info("--official: several candidates (%s); taking %s in %s",
                 ", ".join(f"{c} in {f}" for f, c in found), class_name, file)  # fmt: skip
    module = _import(file)
    return getattr(module, class_name)


def _python_files(root: Path):
    for file in root.rglob("*.py"):
        parts = file.relative_to(root).parts
        if not any(p in _SKIP_DIRS or p.startswith(".") for p in parts[:-1]):
            yield file


def _v1_classes(file: Path, broken: list[str]) -> list[str]:
    """Top-level classes of ``file`` whose ``__init__`` names every v1 argument; a file that
    cannot be read or parsed is appended to ``broken``, with why."""
    try:
        source = file.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        broken.append(f"{file} cannot be read ({exc})")
        return []
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError) as exc:  # null bytes: ValueError before Python 3.11.4
        line = getattr(exc, "lineno", None)
        where = f"line {line}: " if line is not None else ""  # none: binary data
        broken.append(f"{file} does not parse ({where}{getattr(exc, 'msg', exc)}); is it Python "
                      "source?")  # fmt: skip
        return []
    except (MemoryError, RecursionError):  # the parser's stack: nesting too deep
        broken.append(f"{file} does not parse (nested too deeply for Python's parser)")
        return []
    found = []
    for node in tree.body:
        if not isinstance(node, ast.ClassDef):
            continue
        for item in node.body:
            if isinstance(item, ast.FunctionDef) and item.name == "__init__":
                a = item.args
                names = {x.arg for x in (*a.posonlyargs, *a.args, *a.kwonlyargs)}
                if all(arg in names for arg in V1_ARGUMENTS):
                    found.append(node.name)
    return found


def _import(file: Path):
    """Import ``file`` under its package path, so that its relative imports resolve; under an
    alias when that name is taken by another module (their folder called ``sparseformer``)."""
    file = file.resolve()
    root, parts = file.parent, [file.stem]
    depth = _relative_depth(file)  # folders its relative imports climb: packages, if namespace
    while (root / "__init__.py").exists() or len(parts) <= depth:
        parts.insert(0, root.name)
        root = root.parent
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    loaded = sys.modules.get(parts[0])
    where = getattr(loaded, "__file__", None) or ""
    try:
        if loaded is not None and not Path(where).resolve().is_relative_to(root):
            parts[0] = _load_aliased(root / parts[0], f"_authors_{parts[0]}")
        return importlib.import_module(".".join(parts))
    except ModuleNotFoundError as exc:
        top = (exc.name or "?").split(".")[0]
        if top == parts[0]:  # a module of their own code, not a package to install
            raise BenchError(
                f"--official: importing {file} needs {exc.name!r}, a module of the authors' "
                f"code that is not under {root}; give their whole checkout"
            ) from None
        raise BenchError(
            f"--official: importing {file} needs {exc.name!r}, which is not installed; "
            f"install what the authors' code needs (pip install {top})"
        ) from None
    except Exception as exc:
        raise BenchError(
            f"--official: importing {file} failed: {type(exc).__name__}: {exc}"
        ) from None


def _relative_depth(file: Path) -> int:
    """The most folders a relative import of ``file`` climbs (``from ..x import y``: 2)."""
    try:
        tree = ast.parse(file.read_text(encoding="utf-8", errors="replace"))
    except (SyntaxError, ValueError):
        return 0
    levels = [n.level for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    return max(levels, default=0)


def _load_aliased(path: Path, alias: str) -> str:
    """Load the package (folder) or module (``.py``) at ``path`` as ``alias``."""
    if alias not in sys.modules:
        if path.is_dir():
            spec = importlib.util.spec_from_file_location(
                alias, path / "__init__.py", submodule_search_locations=[str(path)]
            )
        else:
            spec = importlib.util.spec_from_file_location(alias, path.with_suffix(".py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[alias] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            del sys.modules[alias]
            raise
    return alias
