"""Geometry: sampling against a slow reference, gradcheck, RoI maths, initial priors."""

from __future__ import annotations

import pytest
import torch

from sparseformer.layers import (
    adjust_rois,
    clamp_coordinate_grad,
    grid_offsets,
    grid_rois,
    sample_features,
    sample_features_reference,
    sampling_points,
    standardize_offsets,
)


@pytest.mark.parametrize("dims", [2, 3])
def test_sampling_matches_reference(dims):
    spatial = (5, 7) if dims == 2 else (3, 5, 7)
    feats = torch.randn(2, 3, *spatial, dtype=torch.float64)
    points = torch.rand(2, 4, 6, dims, dtype=torch.float64) * 1.4 - 0.2  # some outside
    fast = sample_features(feats, points)
    slow = sample_features_reference(feats, points)
    assert fast.shape == (2, 4, 6, 3)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)


def test_pixel_centres_read_exact_values():
    feats = torch.arange(12.0).reshape(1, 1, 3, 4)
    # centre of pixel (row 1, col 2) is x = 2.5/4, y = 1.5/3
    points = torch.tensor([[[[2.5 / 4, 1.5 / 3]]]])
    assert sample_features(feats, points).item() == pytest.approx(6.0)


@pytest.mark.parametrize("dims", [2, 3])
def test_sampling_gradcheck(dims):
    spatial = (4, 5) if dims == 2 else (2, 4, 5)
    feats = torch.randn(1, 2, *spatial, dtype=torch.float64, requires_grad=True)
    # keep points away from cell boundaries where bilinear is not differentiable
    points = (torch.rand(1, 3, 4, dims, dtype=torch.float64) * 0.8 + 0.1).requires_grad_()
    assert torch.autograd.gradcheck(sample_features, (feats, points), eps=1e-6, atol=1e-5)


def test_clamp_coordinate_grad_bounds_gradient_only():
    x = torch.tensor([1.0, -2.0, 3.0], requires_grad=True)
    y = clamp_coordinate_grad(x, 0.5)
    assert torch.equal(y, x)
    (y * torch.tensor([10.0, -10.0, 0.1])).sum().backward()
    assert torch.equal(x.grad, torch.tensor([0.5, -0.5, 0.1]))
    bound = torch.tensor(0.25)  # a GradScaler scale can be a tensor
    x.grad = None
    (clamp_coordinate_grad(x, bound) * 10).sum().backward()
    assert torch.equal(x.grad, torch.full((3,), 0.25))


def test_grid_rois_follow_the_spec():
    rois = grid_rois(49)
    assert rois.shape == (49, 4)
    # token k = i * 7 + j: x from i, y from j, boxes half the image
    torch.testing.assert_close(rois[0], torch.tensor([0.0, 0.0, 0.5, 0.5]))
    torch.testing.assert_close(rois[1], torch.tensor([0.0, 1 / 12, 0.5, 0.5 + 1 / 12]))
    torch.testing.assert_close(rois[7], torch.tensor([1 / 12, 0.0, 0.5 + 1 / 12, 0.5]))
    torch.testing.assert_close(rois[48], torch.tensor([0.5, 0.5, 1.0, 1.0]))
    # one token: the centred box (it started on the top-left quarter)
    torch.testing.assert_close(grid_rois(1), torch.tensor([[0.25, 0.25, 0.75, 0.75]]))


def test_grid_offsets_x_fastest():
    off = grid_offsets(36)
    ticks = (torch.arange(6) + 0.5) / 6 - 0.5
    torch.testing.assert_close(off[:6, 0], ticks)
    torch.testing.assert_close(off[:6, 1], torch.full((6,), ticks[0].item()))
    assert grid_offsets(4, 3)[:, 2].abs().sum() == 0


def test_standardized_grid_points_stay_a_grid_over_the_roi():
    off = standardize_offsets(grid_offsets(16).expand(1, 1, 16, 2))
    torch.testing.assert_close(off.mean(dim=2), torch.zeros(1, 1, 2), atol=1e-6, rtol=0)
    torch.testing.assert_close(off.std(dim=2), torch.full((1, 1, 2), 1 / 3), atol=1e-6, rtol=0)
    rois = torch.tensor([[[0.2, 0.4, 0.6, 0.6]]])
    pts = sampling_points(rois, off)
    assert torch.allclose(pts.mean(dim=2), torch.tensor([[[0.4, 0.5]]]))


def test_adjust_rois_identity_and_scaling():
    rois = torch.tensor([[[0.1, 0.2, 0.5, 0.4]]])
    torch.testing.assert_close(adjust_rois(rois, torch.zeros(1, 1, 4)), rois)
    delta = torch.tensor([[[0.5, 0.0, 0.0, torch.log(torch.tensor(2.0))]]])
    # centre x moves by half the width (0.4 * 0.5), height doubles around the centre
    torch.testing.assert_close(adjust_rois(rois, delta), torch.tensor([[[0.3, 0.1, 0.7, 0.5]]]))
