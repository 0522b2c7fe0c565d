"""Draw where SparseFormer's latent tokens look: RoIs and sampling points over the image.

SparseFormer (Gao et al., ICLR 2024), Fig. 1 and 5 of the paper. matplotlib is imported inside
the drawing functions, so importing this module stays cheap.
"""

from __future__ import annotations

from sparseformer.roi_stats import roi_iou_matrix, roi_statistics, sampling_roi_indices

__all__ = ["roi_statistics", "roi_iou_matrix", "sampling_roi_indices"]
