"""The detailed output of a SparseFormer forward pass."""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

__all__ = ["SparseFormerOutput", "NonFiniteOutputError", "NON_FINITE_OUTPUTS"]

# what predict and viz say of an input whose outputs are not numbers (the weights are not)
NON_FINITE_OUTPUTS = "the model's outputs are NaN or infinite for it (a run that diverged?)"


class NonFiniteOutputError(ValueError):
    """A model's outputs (logits or RoIs) are NaN or infinite: nothing true to draw or rank."""


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

    def is_finite(self) -> bool:
        """Whether the logits and every RoI are finite numbers."""
        return all(bool(t.isfinite().all()) for t in (self.logits, *self.rois))

    @property
    def latent_tokens(self) -> Tensor:
        """``(B, N, D)``: the final tokens that have RoIs (``tokens`` without a CLS token)."""
        return self.tokens[:, self.num_prefix_tokens :]
