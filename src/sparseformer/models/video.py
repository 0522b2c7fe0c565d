"""Video SparseFormer: latent tokens with spatio-temporal RoIs.

SparseFormer (Gao, Tong, Wang, Shou, ICLR 2024, arXiv 2304.03768), Sec. 5 (video); official
code at github.com/showlab/sparseformer. The video model is the image model built with D=3 from
the start (no surgery on a built image model):

- RoIs are ``(x1, y1, t1, x2, y2, t2)`` in normalised clip coordinates;
- the stem runs per frame (1x7x7 convolution, 1x3x3 max-pool, channel normalisation);
- each sampling point has 3 offset coordinates, standardised per axis as in 2-D;
- sampling is trilinear on the ``(B, C, T, H, W)`` feature volume;
- RoI adjustment predicts 6 numbers: ``(dx, dy, dt, dlogw, dlogh, dlogt)``.

A freshly initialised video model spreads each token's points over its time slice (a Latin
square of time offsets over the spatial grid, see :func:`time_grid_offsets`), so that one token
can contrast frames from the start. This matters: with all time offsets equal, their per-axis
standardisation divides by ~0 and its gradient is ~``1/(3 * offset_eps)``, which swamps every
other gradient (and gradient clipping). Models inflated from image weights must start with zero
time offsets (that is what makes a one-frame clip reproduce the image model); their first
optimizer step spreads the offsets, so train them with a per-parameter optimizer (AdamW).

Token inflation: ``replicates = R`` runs ``N * R`` tokens. Replicate ``i`` (tokens
``i * N .. (i + 1) * N - 1``) starts with the image grid RoI in space and the time slice
``[i/R, (i+1)/R]``, and with the same initial embedding as the other replicates.

The coordinate-gradient clamp keeps the image bound ``1/H`` (H the feature height) on every
axis, time included: a time cell (``1/T``, T = 8 typically) is wider than a spatial one, so the
bound is, if anything, conservative in time; the official code uses the same bound.
"""

from __future__ import annotations

import logging
import math

import torch
from torch import Tensor

from sparseformer.config import VideoSparseFormerConfig
from sparseformer.models.blocks import SampleMixOp
from sparseformer.models.sparseformer import SparseFormer

logger = logging.getLogger(__name__)

__all__ = ["VideoSparseFormer", "time_grid_offsets", "time_tiled_rois"]


def time_grid_offsets(num_points: int) -> Tensor:
    """Initial time offsets of a fresh video model: a Latin square over the ``k x k`` point grid.

    Point ``(row j, column i)`` (x fastest, as in :func:`~sparseformer.layers.grid_offsets`)
    gets time level ``(i + j) mod k``, at ``(level + 0.5) / k - 0.5``: every time level covers
    every row and every column, and the spread equals the spatial one.

    Returns:
        ``(P,)`` time offsets.
    """
    k = math.isqrt(num_points)
    index = torch.arange(num_points)
    level = (index % k + index // k) % k
    return (level.float() + 0.5) / k - 0.5


def time_tiled_rois(rois: Tensor, replicates: int) -> Tensor:
    """Tile 2-D RoIs over ``replicates`` consecutive time slices.

    Args:
        rois: ``(N, 4)`` image RoIs ``x1, y1, x2, y2``.
        replicates: R.

    Returns:
        ``(R * N, 6)`` video RoIs ``x1, y1, t1, x2, y2, t2``, replicate-major: row ``i * N + n``
        is RoI ``n`` over the time slice ``[i/R, (i+1)/R]``.
    """
    N = rois.shape[0]
    p1, p2 = rois.chunk(2, dim=-1)  # (N, 4) -> 2 x (N, 2)
    bounds = torch.linspace(0.0, 1.0, replicates + 1, dtype=rois.dtype, device=rois.device)
    t1 = bounds[:-1].repeat_interleave(N).unsqueeze(-1)  # (R,) -> (R*N, 1)
    t2 = bounds[1:].repeat_interleave(N).unsqueeze(-1)  # (R,) -> (R*N, 1)
    p1 = p1.repeat(replicates, 1)  # (N, 2) -> (R*N, 2)
    p2 = p2.repeat(replicates, 1)  # (N, 2) -> (R*N, 2)
    return torch.cat([p1, t1, p2, t2], dim=-1)


class VideoSparseFormer(SparseFormer):
    """SparseFormer video classifier; input ``(B, 3, T, H, W)`` normalised clips.

    Same API as :class:`SparseFormer` (timm style); ``forward_with_details`` returns RoIs
    ``(B, N*R, 6)`` and sampling points ``(B, N*R, P, 3)`` as ``(x, y, t)``.

    Args:
        config: the architecture, with ``num_frames`` and ``replicates``.
    """

    roi_dims = 3

    def __init__(self, config: VideoSparseFormerConfig) -> None:
        if not isinstance(config, VideoSparseFormerConfig):
            raise TypeError(
                f"VideoSparseFormer needs a VideoSparseFormerConfig, got {type(config).__name__}"
            )
        super().__init__(config)
        # said once, here, for a model built for too few frames; else at its first such clip
        self._warned_few_frames = config.num_frames < config.replicates
        if self._warned_few_frames:
            logger.warning(
                "%d frames for %d token replicates: some replicates' time slices fall between "
                "frame centres and read zero padding; give clips of at least as many frames "
                "(--frames on the command line), or a model of fewer replicates",
                config.num_frames,
                config.replicates,
            )

    def _check_input(self, x: Tensor) -> None:
        super()._check_input(x)
        if torch.jit.is_tracing() or torch.compiler.is_compiling():
            return  # a symbolic T compared with R would narrow an exported graph's range
        T, R = x.shape[2], self.config.replicates
        if T < R and not self._warned_few_frames:
            self._warned_few_frames = True  # once per model: a loop of clips says it once
            logger.warning(
                "clips of %d frame(s) for %d token replicates: some replicates' time slices "
                "fall between frame centres and read zero padding; give clips of at least %d "
                "frames",
                T,
                R,
                R,
            )

    def _num_latent_tokens(self) -> int:
        return self.config.num_tokens * self.config.replicates

    def _initial_roi_prior(self) -> Tensor:
        return time_tiled_rois(super()._initial_roi_prior(), self.config.replicates)

    @torch.no_grad()
    def init_weights(self) -> None:
        """The image init; then one embedding per spatial token shared by its replicates, and
        time offsets spread over each token's time slice (:func:`time_grid_offsets`)."""
        super().init_weights()
        N, R = self.config.num_tokens, self.config.replicates
        if not self.config.shared_initial_token:  # one (1, D) embedding is shared anyway
            self.initial_tokens.copy_(self.initial_tokens[:N].repeat(R, 1))  # (N, D) -> (R*N, D)
        for m in self.modules():
            if isinstance(m, SampleMixOp):
                bias = m.offset_bias.view(m.num_points, 3)  # (P*3,) -> (P, 3) as (x, y, t)
                bias[:, 2] = time_grid_offsets(m.num_points).to(bias)
