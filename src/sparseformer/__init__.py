"""SparseFormer: sparse visual recognition via limited latent tokens.

An implementation of Gao, Tong, Wang, Shou, "SparseFormer: Sparse Visual Recognition via
Limited Latent Tokens", ICLR 2024 (arXiv 2304.03768), that loads the authors' released weights.

Public API::

    import sparseformer
    model = sparseformer.create_model("sparseformer_v1_tiny", checkpoint_path="...pth")
    sparseformer.list_models("sparseformer_v1_*")
    sparseformer.count_flops(model, (3, 224, 224)).table()
"""

import importlib.metadata as _metadata

from sparseformer.bench.counting import FlopCount, count_flops, count_params
from sparseformer.config import SparseFormerConfig, StageConfig, VideoSparseFormerConfig
from sparseformer.models import SparseFormer, SparseFormerOutput, VideoSparseFormer
from sparseformer.weights import timm_models as _timm_models  # noqa: F401  (registers with timm)
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

__all__ = [
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
]
