"""SparseFormer model classes."""

from sparseformer.models.outputs import SparseFormerOutput
from sparseformer.models.sparseformer import SparseFormer

__all__ = ["SparseFormer", "SparseFormerOutput"]
