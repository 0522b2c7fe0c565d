"""Data: built-in and ImageFolder datasets, checked image reading, transforms and loaders."""

from __future__ import annotations

from sparseformer.data.datasets import (
    BUILTIN_DATASETS,
    DatasetBundle,
    DataSource,
    build_datasets,
    dataset_defaults,
)
from sparseformer.data.folder import CheckedImageFolder, DataError
from sparseformer.data.images import open_rgb, to_rgb
from sparseformer.data.transforms import Augmentation, Preprocessing, build_transform

__all__ = [
    "BUILTIN_DATASETS",
    "Augmentation",
    "CheckedImageFolder",
    "DataError",
    "DataSource",
    "DatasetBundle",
    "Preprocessing",
    "build_datasets",
    "build_transform",
    "dataset_defaults",
    "open_rgb",
    "to_rgb",
]
