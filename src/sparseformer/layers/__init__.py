"""Building blocks of SparseFormer (Gao et al., ICLR 2024).

Conventions, stated once for every layer here:

- tokens ``(B, N, D)``; features ``(B, C, H, W)`` or ``(B, C, T, H, W)``;
- RoIs ``(B, N, 2D)`` as normalised corners ``x1, y1[, t1], x2, y2[, t2]`` (0 and 1 are the
  outer edges of the image), D = 2 for images and 3 for video;
- sampling points ``(B, N, P, D)`` in the same coordinates; sampled values ``(B, N, P, C)``.

Layers take plain values, never a config object.
"""

from sparseformer.layers.attention import Attention, Mlp
from sparseformer.layers.drop import drop_path, drop_path_rates, residual_drop_path
from sparseformer.layers.mixing import AdaptiveMixing
from sparseformer.layers.position import roi_sine_embedding
from sparseformer.layers.roi import (
    adjust_rois,
    center_size_to_roi,
    grid_and_whole_rois,
    grid_rois,
    roi_center_size,
)
from sparseformer.layers.sampling import (
    at_least_fp32,
    clamp_coordinate_grad,
    fp32_geometry,
    grid_offsets,
    sample_features,
    sample_features_reference,
    sampling_points,
    standardize_offsets,
)
from sparseformer.layers.stem import EarlyConvolution, channel_normalize

__all__ = [
    "AdaptiveMixing",
    "Attention",
    "EarlyConvolution",
    "Mlp",
    "adjust_rois",
    "at_least_fp32",
    "center_size_to_roi",
    "channel_normalize",
    "clamp_coordinate_grad",
    "drop_path",
    "drop_path_rates",
    "residual_drop_path",
    "fp32_geometry",
    "grid_and_whole_rois",
    "grid_offsets",
    "grid_rois",
    "roi_center_size",
    "roi_sine_embedding",
    "sample_features",
    "sample_features_reference",
    "sampling_points",
    "standardize_offsets",
]
