"""RoI health statistics: is a SparseFormer still looking at the image, and at different places?

SparseFormer (Gao et al., ICLR 2024) moves every latent token's region of interest (RoI) stage
by stage. A training run can go wrong in ways the loss hides for a while: RoIs that shrink to
nothing, grow past the image, drift off it, or collapse onto the same spot. These numbers make
that visible; ``sparseformer train`` logs them each epoch and ``sparseformer viz`` prints them.

Pure torch, cheap (a few reductions over ``(B, N, 2D)`` and ``(B, N, P, D)`` tensors), and
dimension-generic: the same code serves images (D=2, area) and videos (D=3, volume).
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor

from sparseformer.models.outputs import SparseFormerOutput

__all__ = ["sampling_roi_indices", "roi_statistics", "roi_iou_matrix"]

logger = logging.getLogger(__name__)


def _corners(rois: Tensor) -> tuple[Tensor, Tensor]:
    """Ordered corners ``lo <= hi`` of ``(..., 2D)`` RoIs, each ``(..., D)``, float32."""
    p1, p2 = rois.float().chunk(2, dim=-1)  # (..., 2D) -> 2 x (..., D)
    return torch.minimum(p1, p2), torch.maximum(p1, p2)


def sampling_roi_indices(output: SparseFormerOutput) -> list[int]:
    """For each sampling step, the index into ``output.rois`` of the RoIs it sampled from.

    Sampling points are the RoI centre plus offsets standardised to zero mean over the P
    points (``layers.sampling``), so a step's mean point is the centre of the RoIs it used; the
    RoIs of the unit application that sampled are the RoIs after that application (ops after
    sampling do not move RoIs). The match is greedy and in order, which is exact whenever the
    matched RoIs differ from earlier ones, and gives equal RoIs when they do not.

    Returns:
        ``len(output.sampling_points)`` increasing indices into ``output.rois``.
    """
    indices: list[int] = []
    start = 0
    num_rois = len(output.rois)
    for step, points in enumerate(output.sampling_points):
        mean_point = points.detach().float().mean(dim=2)  # (B, N, P, D) -> (B, N, D)
        found = None
        for j in range(start, num_rois):
            lo, hi = _corners(output.rois[j].detach())
            center, size = (lo + hi) / 2, hi - lo
            tol = 1e-4 * (1.0 + size.abs())
            if center.shape == mean_point.shape and bool(
                ((center - mean_point).abs() <= tol).all()
            ):
                found = j
                break
        if found is None:  # should not happen for our models; fall back to application order
            found = min(max(start, step), num_rois - 1)
            logger.debug("sampling step %d matches no RoIs; assuming RoIs %d", step, found)
        indices.append(found)
        start = found + 1 if found + 1 < num_rois else found
    return indices


def roi_iou_matrix(rois: Tensor) -> Tensor:
    """Pairwise IoU (intersection over union of areas/volumes) between the RoIs of each sample.

    Args:
        rois: ``(B, N, 2D)`` corners in normalised coordinates.

    Returns:
        ``(B, N, N)`` IoU in ``[0, 1]``; the diagonal is 1 for non-empty RoIs.
    """
    lo, hi = _corners(rois)  # (B, N, D) each
    inter_lo = torch.maximum(lo.unsqueeze(2), lo.unsqueeze(1))  # (B, N, 1, D), (B, 1, N, D)
    inter_hi = torch.minimum(hi.unsqueeze(2), hi.unsqueeze(1))  # -> (B, N, N, D)
    inter = (inter_hi - inter_lo).clamp(min=0).prod(dim=-1)  # (B, N, N, D) -> (B, N, N)
    area = (hi - lo).prod(dim=-1)  # (B, N, D) -> (B, N)
    union = area.unsqueeze(2) + area.unsqueeze(1) - inter
    return inter / union.clamp(min=1e-12)


def _area(rois: Tensor) -> Tensor:
    lo, hi = _corners(rois)
    return (hi - lo).prod(dim=-1)  # (B, N, D) -> (B, N)


# How far past the image edge (a fraction of its side) counts as outside. Edge RoIs of the
# initial grid lie exactly on 0 or 1, and the first updates of training move them by float
# noise; without a margin a run that has barely moved reads as 60% outside.
OUTSIDE_MARGIN = 1e-3


def _outside(rois: Tensor) -> tuple[Tensor, Tensor]:
    """Per RoI: partly outside ``[0, 1]^D`` (by more than ``OUTSIDE_MARGIN``) and wholly
    outside it, both ``(B, N)`` bool."""
    lo, hi = _corners(rois)
    partly = ((lo < -OUTSIDE_MARGIN) | (hi > 1 + OUTSIDE_MARGIN)).any(dim=-1)
    wholly = ((hi <= 0) | (lo >= 1)).any(dim=-1)
    return partly, wholly


@torch.no_grad()
def roi_statistics(output: SparseFormerOutput) -> dict[str, float]:
    """Flat, JSON-friendly health statistics of a batch's RoIs and sampling points.

    Areas are fractions of the image (volumes of the clip for D=3); an RoI grid of half-image
    boxes has area 0.25 (0.125 for a half-clip in time too). Keys (``S`` sampling steps,
    stages numbered from 1):

    - ``roi/area_init``: mean RoI area before the first unit.
    - ``roi/area_stage{k}``: mean area of the RoIs sampling step ``k`` used, ``k = 1..S``.
    - ``roi/area_final``: mean area of the final RoIs; ``roi/area_min_final``: the smallest.
    - ``roi/outside_final``: fraction of final RoIs not wholly inside the image (by more than
      ``OUTSIDE_MARGIN``, a thousandth of its side);
      ``roi/off_image_final``: fraction wholly off it (they read only padding).
    - ``roi/points_outside``: fraction of all sampling points (every step) outside the image;
      ``roi/points_outside_last``: the same for the last step.
    - ``roi/center_std_init`` and ``roi/center_std_final``: spread of RoI centres over the
      tokens of an image (std per axis, averaged over axes and images). A final spread far
      below the initial one means the tokens crowd onto one spot.
    - ``roi/iou_mean_final``: mean IoU over pairs of distinct tokens;
      ``roi/collapsed_pairs_final``: fraction of such pairs with IoU above 0.9 (near-duplicate
      RoIs; 0 for the initial grid).

    Args:
        output: from ``model.forward_with_details(x)``: ``rois`` each ``(B, N, 2D)``,
            ``sampling_points`` each ``(B, N, P, D)``, ``initial_rois`` ``(B, N, 2D)``.

    Returns:
        ``{name: float}``; keys depend only on the number of sampling steps.
    """
    stats: dict[str, float] = {}
    final = output.rois[-1] if output.rois else output.initial_rois
    if final is None:
        raise ValueError("the output holds no RoIs; call model.forward_with_details(x)")
    final = final.detach().float()
    initial = output.initial_rois.detach().float() if output.initial_rois is not None else None

    if initial is not None:
        stats["roi/area_init"] = _area(initial).mean().item()
    for k, j in enumerate(sampling_roi_indices(output), start=1):
        stats[f"roi/area_stage{k}"] = _area(output.rois[j].detach()).mean().item()
    area = _area(final)
    stats["roi/area_final"] = area.mean().item()
    stats["roi/area_min_final"] = area.min().item()

    partly, wholly = _outside(final)
    stats["roi/outside_final"] = partly.float().mean().item()
    stats["roi/off_image_final"] = wholly.float().mean().item()

    if output.sampling_points:
        margin = OUTSIDE_MARGIN
        outside = [
            ((p < -margin) | (p > 1 + margin)).any(dim=-1) for p in output.sampling_points
        ]  # (B, N, P)
        stats["roi/points_outside"] = torch.stack([o.float().mean() for o in outside]).mean().item()
        stats["roi/points_outside_last"] = outside[-1].float().mean().item()

    def center_std(rois: Tensor) -> float:
        lo, hi = _corners(rois)
        center = (lo + hi) / 2  # (B, N, D)
        if center.shape[1] < 2:
            return 0.0
        return center.std(dim=1).mean().item()  # std over tokens, mean over images and axes

    if initial is not None:
        stats["roi/center_std_init"] = center_std(initial)
    stats["roi/center_std_final"] = center_std(final)

    B, N, _ = final.shape
    if N > 1:
        iou = roi_iou_matrix(final)  # (B, N, N)
        off_diag = ~torch.eye(N, dtype=torch.bool, device=iou.device)
        pairs = iou[:, off_diag]  # (B, N, N) -> (B, N*(N-1))
        stats["roi/iou_mean_final"] = pairs.mean().item()
        stats["roi/collapsed_pairs_final"] = (pairs > 0.9).float().mean().item()
    else:
        stats["roi/iou_mean_final"] = 0.0
        stats["roi/collapsed_pairs_final"] = 0.0
    return stats
