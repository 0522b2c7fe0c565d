"""Sine/cosine codes of RoI corners, for position injection into the tokens.

Bootstrapping SparseFormers from Vision Foundation Models (Gao, Tong, Lin, Chen, Shou,
CVPR 2024, arXiv 2312.01987): a ViT inherited as the cortex expects tokens that know where
they are, so the focusing stage adds ``Linear(LayerNorm(pe(roi)))`` to each token, ``pe`` a
fixed code of the RoI's corners. Ported from the official code (github.com/showlab/sparseformer).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["roi_sine_embedding"]

# Highest frequency: the code resolves a RoI corner to about 1/128 of the image.
_MAX_FREQUENCY = 128.0


def roi_sine_embedding(rois: Tensor, dim: int) -> Tensor:
    """A fixed ``dim``-wide code of each RoI's corners.

    Each of the ``2D`` coordinates gets ``f = dim / 2D`` frequencies ``exp(linspace(0,
    ln 128, f))`` (f even). With ``a_k`` the coordinate times pi times frequency ``k``, the
    coordinate's ``f`` numbers are the sines of the even-indexed ``a_k`` followed by the cosines
    of the odd-indexed ones, ``[sin a_0, sin a_2, ..., cos a_1, cos a_3, ...]``; coordinates
    follow one another (coordinate-major): ``[x1: f numbers, y1: f numbers, ...]``.

    Args:
        rois: ``(B, N, 2D)`` normalised corners.
        dim: code width, a multiple of ``4D``.

    Returns:
        ``(B, N, dim)`` in the dtype of ``rois``.
    """
    B, N, coords = rois.shape
    if dim % (2 * coords):
        raise ValueError(f"the position code width {dim} is not a multiple of {2 * coords}")
    f = dim // coords
    freqs = torch.linspace(0.0, math.log(_MAX_FREQUENCY), f, device=rois.device).exp()
    x = rois.unsqueeze(-1) * math.pi * freqs.to(rois.dtype)  # (B, N, 2D) -> (B, N, 2D, f)
    code = torch.cat([x[..., 0::2].sin(), x[..., 1::2].cos()], dim=-1)  # (B, N, 2D, f)
    return code.reshape(B, N, coords * f)  # (B, N, 2D, f) -> (B, N, dim)
