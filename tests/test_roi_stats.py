"""RoI health statistics: hand-computed values on synthetic outputs, images and video."""

from __future__ import annotations

import json

import pytest
import torch

from sparseformer import create_model
from sparseformer.layers import grid_offsets, grid_rois
from sparseformer.layers.sampling import sampling_points, standardize_offsets
from sparseformer.models.outputs import SparseFormerOutput
from sparseformer.viz.figures import roi_iou_matrix, roi_statistics, sampling_roi_indices


def _points(rois: torch.Tensor, num_points: int) -> torch.Tensor:
    """Grid sampling points over ``(B, N, 2D)`` RoIs, as the model makes them at init."""
    B, N, two_d = rois.shape
    offsets = grid_offsets(num_points, two_d // 2).expand(B, N, -1, -1)  # (B, N, P, D)
    return sampling_points(rois, standardize_offsets(offsets))


def _output(rois: list[torch.Tensor], sample_at: list[int], initial: torch.Tensor, P: int = 4):
    return SparseFormerOutput(
        logits=torch.zeros(initial.shape[0], 3),
        tokens=torch.zeros(initial.shape[0], initial.shape[1], 8),
        rois=rois,
        sampling_points=[_points(rois[j], P) for j in sample_at],
        initial_rois=initial,
    )


def test_stats_of_hand_made_rois():
    initial = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])  # (1, 2, 4)
    moved = torch.tensor([[[0.0, 0.0, 0.2, 0.5], [0.9, 0.9, 1.3, 1.4]]])  # 2nd partly outside
    off = torch.tensor([[[1.1, 0.0, 1.2, 0.5], [0.0, 0.0, 0.2, 0.5]]])  # 1st wholly outside
    out = _output([initial, moved, moved, off], sample_at=[0, 1], initial=initial)
    stats = roi_statistics(out)
    assert sampling_roi_indices(out) == [0, 1]
    assert stats["roi/area_init"] == pytest.approx(0.25)
    assert stats["roi/area_stage1"] == pytest.approx(0.25)
    assert stats["roi/area_stage2"] == pytest.approx((0.1 + 0.2) / 2)
    assert stats["roi/area_final"] == pytest.approx((0.05 + 0.1) / 2)
    assert stats["roi/area_min_final"] == pytest.approx(0.05)
    assert stats["roi/outside_final"] == pytest.approx(0.5)
    assert stats["roi/off_image_final"] == pytest.approx(0.5)
    # the second step's points: all 4 of the box (0.9..1.3, 0.9..1.4) lie below the image
    # (y >= 1.0057), none of (0..0.2, 0..0.5); step 1 has none outside
    assert stats["roi/points_outside_last"] == pytest.approx(0.5)
    assert stats["roi/points_outside"] == pytest.approx(stats["roi/points_outside_last"] / 2)
    # centres (0.25, 0.25), (0.75, 0.75): std over 2 tokens (unbiased) = 0.5 / sqrt(2)
    assert stats["roi/center_std_init"] == pytest.approx(0.5 / 2**0.5)
    assert stats["roi/iou_mean_final"] == pytest.approx(0.0)
    json.dumps(stats)  # JSON-friendly
    assert all(isinstance(v, float) for v in stats.values())


def test_a_point_outside_on_one_axis_is_outside():
    initial = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])  # (1, 2, 4)
    below = torch.tensor([[[0.4, 1.2, 0.6, 1.4], [0.1, 0.1, 0.3, 0.3]]])  # x inside, y not
    stats = roi_statistics(_output([initial, below], sample_at=[1], initial=initial))
    assert stats["roi/points_outside_last"] == pytest.approx(0.5)
    assert stats["roi/outside_final"] == pytest.approx(0.5)


def test_sampling_indices_skip_applications_without_sampling():
    torch.manual_seed(1)
    initial = grid_rois(4).unsqueeze(0)  # (1, 4, 4)
    a = initial + 0.01 * torch.randn_like(initial)
    b = a + 0.02 * torch.randn_like(a)
    # applications: 0 samples (a), 1 moves RoIs but samples nothing (b), 2 samples (b), 3 cortex
    out = _output([a, b, b, b], sample_at=[0, 2], initial=initial)
    assert sampling_roi_indices(out) == [0, 1]  # 1 and 2 hold equal RoIs: either is right
    out = _output([a, a + 0.05, b, b], sample_at=[0, 2], initial=initial)
    assert sampling_roi_indices(out) == [0, 2]


def test_collapse_is_visible():
    initial = grid_rois(9).unsqueeze(0)
    same = torch.tensor([0.4, 0.4, 0.6, 0.6]).expand(1, 9, 4).clone()
    out = _output([same], sample_at=[0], initial=initial)
    stats = roi_statistics(out)
    assert stats["roi/collapsed_pairs_final"] == 1.0
    assert stats["roi/iou_mean_final"] == pytest.approx(1.0)
    assert stats["roi/center_std_final"] == pytest.approx(0.0, abs=1e-6)
    assert stats["roi/center_std_init"] > 0.1
    healthy = roi_statistics(_output([initial], sample_at=[0], initial=initial))
    assert healthy["roi/collapsed_pairs_final"] == 0.0


def test_video_rois_use_volumes():
    # (B=2, N=2, 6): x1, y1, t1, x2, y2, t2
    rois = torch.tensor([[0.0, 0.0, 0.0, 0.5, 0.5, 0.5], [0.5, 0.5, 0.5, 1.0, 1.0, 1.5]])
    rois = rois.expand(2, -1, -1)
    out = _output([rois], sample_at=[0], initial=rois)
    assert out.sampling_points[0].shape == (2, 2, 4, 3)
    stats = roi_statistics(out)
    assert stats["roi/area_final"] == pytest.approx((0.125 + 0.25) / 2)
    assert stats["roi/outside_final"] == pytest.approx(0.5)
    assert stats["roi/off_image_final"] == 0.0
    assert roi_iou_matrix(rois).shape == (2, 2, 2)


def test_random_model_matches_the_initial_grid():
    model = create_model("sparseformer_v1_nano").eval()
    with torch.no_grad():
        out = model.forward_with_details(torch.randn(2, 3, 32, 32))
    stats = roi_statistics(out)
    assert sampling_roi_indices(out) == [0, 1, 2]
    assert [k for k in stats if k.startswith("roi/area_stage")] == [
        "roi/area_stage1",
        "roi/area_stage2",
        "roi/area_stage3",
    ]
    assert stats["roi/area_final"] == pytest.approx(0.25)  # half-image boxes do not move
    assert stats["roi/points_outside"] == 0.0
    # 3 x 3 grid of half boxes: centres at 0.25, 0.5, 0.75 on each axis
    assert stats["roi/center_std_init"] == pytest.approx(
        torch.tensor([0.25, 0.5, 0.75]).repeat(3).std().item()
    )


def test_empty_output_is_a_clear_error():
    with pytest.raises(ValueError, match="forward_with_details"):
        roi_statistics(SparseFormerOutput(logits=torch.zeros(1, 2), tokens=torch.zeros(1, 1, 2)))


def test_rois_on_the_image_edge_are_inside_despite_float_noise():
    # the initial grid's edge RoIs lie on 0 and 1; the first updates move them by ~1e-7
    initial = torch.tensor([[[0.0, 0.0, 0.5, 0.5], [0.5, 0.5, 1.0, 1.0]]])
    noisy = initial + torch.tensor([[[-1e-6, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1e-6]]])
    stats = roi_statistics(_output([initial, noisy], sample_at=[0, 1], initial=initial))
    assert stats["roi/outside_final"] == 0.0 and stats["roi/points_outside"] == 0.0
    past = initial + torch.tensor([[[-0.01, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]])
    stats = roi_statistics(_output([initial, past], sample_at=[0, 1], initial=initial))
    assert stats["roi/outside_final"] == 0.5  # a hundredth of the side past the edge counts
