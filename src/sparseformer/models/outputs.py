"""The detailed output of a SparseFormer forward pass."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["SparseFormerOutput"]


@dataclass
class SparseFormerOutput:
    """Logits with the geometry that produced them.

    Attributes:
        logits: ``(B, num_classes)`` (or pre-logits ``(B, D)`` for a model without classifier).
        tokens: ``(B, N, D)`` final tokens: the latent tokens, after ``num_prefix_tokens``
            tokens without a RoI (a CLS token) where the model has them.
        rois: RoIs after every unit application, each ``(B, N, 2D)`` normalised corners
            ``x1, y1[, t1], x2, y2[, t2]``; index 0 is after the first application.
        sampling_points: points of every sampling step, each ``(B, N, P, D)`` in normalised
            image coordinates ``x, y[, t]``.
        initial_rois: ``(B, N, 2D)`` the RoIs before the first unit.
        num_prefix_tokens: tokens before the latent tokens in ``tokens`` (1: the CLS token).
    """

    logits: Tensor
    tokens: Tensor
    rois: list[Tensor] = field(default_factory=list)
    sampling_points: list[Tensor] = field(default_factory=list)
    initial_rois: Tensor | None = None
    num_prefix_tokens: int = 0

    @property
    def latent_tokens(self) -> Tensor:
        """``(B, N, D)``: the final tokens that have RoIs (``tokens`` without a CLS token)."""
        return self.tokens[:, self.num_prefix_tokens :]
