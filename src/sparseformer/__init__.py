"""SparseFormer: sparse visual recognition via limited latent tokens.

An implementation of Gao, Tong, Wang, Shou, "SparseFormer: Sparse Visual Recognition via
Limited Latent Tokens", ICLR 2024 (arXiv 2304.03768), that loads the authors' released weights.

Public API::

    import sparseformer
    model = sparseformer.create_model("sparseformer_v1_tiny", checkpoint_path="...pth")
    sparseformer.list_models("sparseformer_v1_*")
    sparseformer.count_flops(model, (3, 224, 224)).table()

``import sparseformer`` imports neither torch nor timm: each public name is imported on first
use (PEP 562), so that ``sparseformer --help`` starts at once. timm still finds our models
(``timm.create_model("sparseformer_v1_tiny")``) whether it is imported before or after us: see
:mod:`sparseformer.weights.timm_hook`.
"""

from __future__ import annotations

import importlib
import importlib.metadata as _metadata
from typing import TYPE_CHECKING, Any

from sparseformer.weights import timm_hook as _timm_hook

if TYPE_CHECKING:  # what the lazy names below resolve to, for type checkers and IDEs
    from sparseformer.bench.counting import FlopCount, count_flops, count_params
    from sparseformer.config import SparseFormerConfig, StageConfig, VideoSparseFormerConfig
    from sparseformer.layers.linear import packed_weights
    from sparseformer.models import SparseFormer, SparseFormerOutput, VideoSparseFormer
    from sparseformer.weights.convert import CheckpointError, NotASparseFormerCheckpoint
    from sparseformer.weights.factory import (
        UnknownModelError,
        create_model,
        get_model_spec,
        list_models,
    )
    from sparseformer.weights.inflate import inflate_image_state_dict
    from sparseformer.weights.loading import load_checkpoint

try:  # the installed distribution's version: pyproject.toml is the one place it is written
    __version__ = _metadata.version("sparseformer")
except _metadata.PackageNotFoundError:  # a source tree on sys.path that was never installed
    __version__ = "0+unknown"

# public name -> the module that defines it
_LAZY = {
    **dict.fromkeys(("FlopCount", "count_flops", "count_params"), "sparseformer.bench.counting"),
    **dict.fromkeys(
        ("SparseFormerConfig", "StageConfig", "VideoSparseFormerConfig"), "sparseformer.config"
    ),
    **dict.fromkeys(
        ("SparseFormer", "SparseFormerOutput", "VideoSparseFormer"), "sparseformer.models"
    ),
    **dict.fromkeys(
        ("CheckpointError", "NotASparseFormerCheckpoint"), "sparseformer.weights.convert"
    ),
    **dict.fromkeys(
        ("UnknownModelError", "create_model", "get_model_spec", "list_models"),
        "sparseformer.weights.factory",
    ),
    "inflate_image_state_dict": "sparseformer.weights.inflate",
    "load_checkpoint": "sparseformer.weights.loading",
    "packed_weights": "sparseformer.layers.linear",
}

__all__ = [  # the names of _LAZY, and the version
    "CheckpointError",
    "FlopCount",
    "NotASparseFormerCheckpoint",
    "SparseFormer",
    "SparseFormerConfig",
    "SparseFormerOutput",
    "StageConfig",
    "UnknownModelError",
    "VideoSparseFormer",
    "VideoSparseFormerConfig",
    "__version__",
    "count_flops",
    "count_params",
    "create_model",
    "get_model_spec",
    "inflate_image_state_dict",
    "list_models",
    "load_checkpoint",
    "packed_weights",
]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name]), name)
    globals()[name] = value  # once imported, a plain module attribute
    return value


def __dir__() -> list[str]:
    # the API, the module's own dunders and its subpackages imported so far; not the helpers
    # imported to build it (Any, importlib, ...)
    ours = __name__ + "."
    return sorted(
        {*__all__}
        | {
            name
            for name, value in globals().items()
            if name.startswith("__")
            or not name.startswith("_")
            and getattr(value, "__name__", "").startswith(ours)
        }
    )


_timm_hook.install()
