"""Registration of SparseFormer names with timm, so ``timm.create_model`` finds them.

Imported once, by :mod:`sparseformer.weights.timm_hook`, as soon as both ``sparseformer`` and
timm are imported: timm's registry is timm's own global, and this is the only place that writes
to it.
"""

from __future__ import annotations

from typing import Any

from timm.models import generate_default_cfgs, register_model

from sparseformer.weights.factory import create_model, pretrained_cfg
from sparseformer.weights.registry import MODELS

__all__: list[str] = []  # timm's register_model appends every registered name


def _entrypoint(name: str):
    def entrypoint(pretrained: bool = False, **kwargs: Any):
        return create_model(name, pretrained=pretrained, **kwargs)

    entrypoint.__name__ = name
    entrypoint.__qualname__ = name
    entrypoint.__module__ = __name__
    entrypoint.__doc__ = f"{name}: {MODELS[name].description}"
    return entrypoint


def _cfgs() -> dict[str, dict[str, Any]]:
    """One pretrained config per released weights (``name.tag``, the default tag first), and
    one untagged for a model without released weights."""
    cfgs = {}
    for name, spec in MODELS.items():
        for tag in spec.tags or (None,):
            cfgs[f"{name}.{tag}" if tag else name] = pretrained_cfg(name, tag)
    return cfgs


# read by register_model: timm.models.get_pretrained_cfg and list_models(pretrained=True)
default_cfgs = generate_default_cfgs(_cfgs())

for _name in MODELS:
    globals()[_name] = register_model(_entrypoint(_name))
