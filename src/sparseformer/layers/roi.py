"""Pure RoI geometry for images (D=2) and videos (D=3).

SparseFormer (Gao et al., ICLR 2024) gives every latent token a region of interest. RoIs are
``(..., 2D)`` tensors in normalised coordinates, ``x1, y1[, t1], x2, y2[, t2]``: the first half
holds one corner, the second half the other. Coordinates are not clipped: a RoI may grow past
the image, where sampling reads zeros (or the border, per config).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "roi_center_size",
    "center_size_to_roi",
    "adjust_rois",
    "grid_rois",
    "grid_and_whole_rois",
]


def roi_center_size(rois: Tensor) -> tuple[Tensor, Tensor]:
    """Split RoIs into centre and absolute size.

    Args:
        rois: ``(..., 2D)`` corners ``p1, p2`` in normalised coordinates.

    Returns:
        ``(center, size)``, each ``(..., D)``: ``(p1 + p2) / 2`` and ``|p2 - p1|``.
    """
    p1, p2 = rois.chunk(2, dim=-1)  # (..., 2D) -> 2 x (..., D)
    return (p1 + p2) / 2, (p2 - p1).abs()


def center_size_to_roi(center: Tensor, size: Tensor) -> Tensor:
    """Corners ``(c - s/2, c + s/2)`` from centre and size, both ``(..., D)`` -> ``(..., 2D)``."""
    return torch.cat([center - size / 2, center + size / 2], dim=-1)


def adjust_rois(rois: Tensor, delta: Tensor) -> Tensor:
    """Move and rescale RoIs by a predicted delta (the paper's RoI adjusting, Eq. 4).

    The centre moves by ``delta[:D]`` in units of the RoI size and the size scales by
    ``exp(delta[D:])``, so a zero delta is the identity and sizes stay positive.

    Args:
        rois: ``(B, N, 2D)`` corners, float32.
        delta: ``(B, N, 2D)``: centre shift ``(dx, dy[, dt])`` then log-size change.

    Returns:
        ``(B, N, 2D)`` adjusted corners.
    """
    center, size = roi_center_size(rois)
    shift, log_scale = delta.chunk(2, dim=-1)  # (B, N, 2D) -> 2 x (B, N, D)
    return center_size_to_roi(center + shift * size, size * log_scale.exp())


def grid_rois(num_tokens: int) -> Tensor:
    """The initial RoIs: an ``r x r`` grid of overlapping half-image boxes, ``r = sqrt(N)``.

    Box ``(i, j)`` spans ``[g_i/2, g_i/2 + 1/2]`` in x and ``[g_j/2, g_j/2 + 1/2]`` in y with
    ``g = i / (r - 1)``. Token ``k = i * r + j`` (y varies fastest), as in the official weights.
    One token (``r = 1``, where ``i / (r - 1)`` has no value) takes the centred box, ``g = 1/2``,
    where ``linspace(0, 1, 1)`` would start it on the top-left quarter (no released model has
    fewer than 49 tokens).

    Returns:
        ``(N, 4)`` corners ``x1, y1, x2, y2``.
    """
    r = math.isqrt(num_tokens)
    if r * r != num_tokens:
        raise ValueError(f"grid RoIs need a square number of tokens, got {num_tokens}")
    g = torch.linspace(0.0, 1.0, r) if r > 1 else torch.full((1,), 0.5)
    start = g / 2
    x1, y1 = torch.meshgrid(start, start, indexing="ij")  # (r, r) each, x slow, y fast
    p1 = torch.stack([x1, y1], dim=-1).reshape(num_tokens, 2)  # (r, r, 2) -> (N, 2)
    return torch.cat([p1, p1 + 0.5], dim=-1)


def grid_and_whole_rois(num_tokens: int) -> Tensor:
    """Initial RoIs for any token count, as the bootstrapped SparseFormers start.

    The first ``floor(sqrt(N))^2`` tokens get :func:`grid_rois`; the rest cover the whole image
    ``(0, 0, 1, 1)`` (63 tokens: a 7 x 7 grid and 14 whole-image tokens).

    Returns:
        ``(N, 4)`` corners ``x1, y1, x2, y2``.
    """
    r = math.isqrt(num_tokens)
    rest = torch.tensor([0.0, 0.0, 1.0, 1.0]).expand(num_tokens - r * r, 4)
    return torch.cat([grid_rois(r * r), rest])
