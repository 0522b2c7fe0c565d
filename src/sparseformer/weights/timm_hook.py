"""Register SparseFormer's names with timm as soon as timm is imported, without importing it.

Why: ``import sparseformer`` has always made ``timm.create_model("sparseformer_v1_tiny")`` and
``timm.list_models("sparseformer*")`` work. Registering means importing timm, and timm imports
torch and torchvision: seconds, paid by every ``sparseformer --help``. So the package root does
not register; it calls :func:`install`, which registers at once when timm is already imported,
and otherwise waits for timm: a ``sys.meta_path`` finder lets the normal loader run timm's
``__init__`` and then imports :mod:`sparseformer.weights.timm_models`. The finder removes itself
once it has fired. A failed registration is logged and never breaks ``import timm``.

Registration imports :mod:`sparseformer.weights.factory` while timm's import finishes, so the
factory's own imports must not import timm (a module on that path would be half-initialized
then); ``tests/test_startup.py`` checks it.
"""

from __future__ import annotations

import importlib
import importlib.abc
import logging
import sys
from importlib.machinery import ModuleSpec
from types import ModuleType

__all__ = ["install"]

_LOG = logging.getLogger(__name__)
_REGISTRATION = "sparseformer.weights.timm_models"


def install() -> None:
    """Register with timm now if timm is imported, else when it is (idempotent)."""
    if "timm" in sys.modules:
        _register()
    elif not any(isinstance(finder, _TimmFinder) for finder in sys.meta_path):
        sys.meta_path.insert(0, _TimmFinder())


def _register() -> None:
    try:
        importlib.import_module(_REGISTRATION)
    except Exception:  # timm itself imported fine: leave it usable, say why ours are missing
        _LOG.warning("could not register SparseFormer models with timm", exc_info=True)


class _TimmFinder(importlib.abc.MetaPathFinder):
    """Finds nothing itself: asks the finders after it for ``timm`` and wraps the loader's
    ``exec_module`` so that registration follows the execution of timm's ``__init__``."""

    def find_spec(self, fullname, path, target=None) -> ModuleSpec | None:
        if fullname != "timm":
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None) if finder is not self else None
            spec = find(fullname, path, target) if find else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _RegisteringLoader(spec.loader, self)
                return spec
        return None


class _RegisteringLoader(importlib.abc.Loader):
    """Runs the real loader, gives the module its real loader back, then registers."""

    def __init__(self, loader: importlib.abc.Loader, finder: _TimmFinder) -> None:
        self.loader, self.finder = loader, finder

    def create_module(self, spec: ModuleSpec) -> ModuleType | None:
        return self.loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self.loader  # timm as if we were absent
        self.loader.exec_module(module)  # an error here is timm's own, and the hook stays
        if self.finder in sys.meta_path:
            sys.meta_path.remove(self.finder)
        _register()
