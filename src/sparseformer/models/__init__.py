"""SparseFormer model classes."""

from sparseformer.models.outputs import SparseFormerOutput
from sparseformer.models.sparseformer import SparseFormer
from sparseformer.models.video import VideoSparseFormer

__all__ = ["SparseFormer", "SparseFormerOutput", "VideoSparseFormer"]
