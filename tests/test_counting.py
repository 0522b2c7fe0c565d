"""FLOP counting in both conventions, pinned on the paper's figures and a tiny config."""

from __future__ import annotations

import pytest
import timm
import torch

from sparseformer import count_flops, create_model


def test_tiny_flops_match_the_paper():
    model = create_model("sparseformer_v1_tiny")
    flops = count_flops(model, (3, 224, 224))
    assert flops.gflops_paper == pytest.approx(2.07, rel=0.01)
    assert flops.gflops_complete == pytest.approx(2.18, rel=0.01)
    assert flops.by_op["baddbmm"] == flops.complete - flops.paper
    assert flops.by_op["grid_sampler_2d"] > 0  # the explicit rule is applied
    # attention through SDPA is counted (2 * N^2 * D MACs per application)
    attn = sum(v for k, v in flops.by_op.items() if "scaled_dot_product" in k or k == "bmm")
    assert attn == 4 * 2 * 49 * 49 * 256 + 8 * 2 * 49 * 49 * 512


def test_nano_flops_pinned():
    model = create_model("sparseformer_v1_nano")
    flops = count_flops(model, (3, 32, 32))
    c = model.config
    # the stem conv alone: C_out * C_in * 7 * 7 per output pixel of a 16 x 16 map
    assert flops.by_op["convolution"] == 16 * 3 * 49 * 16 * 16
    # baddbmm: per sampling step, N * P * C * (C + P)
    steps = 2 + 1
    assert flops.by_op["baddbmm"] == steps * c.num_tokens * 4 * 16 * (16 + 4)
    assert flops.by_op["grid_sampler_2d"] == steps * c.num_tokens * 4 * 16 * 4
    # an example input counts as its shape; a shape without channels is named, not run
    assert count_flops(model, torch.randn(2, 3, 32, 32)).complete == 2 * flops.complete
    with pytest.raises(ValueError, match=r"input_size \(32, 32\) is not a shape"):
        count_flops(model, (32, 32))
    with pytest.raises(ValueError, match=r"input_size 32 is not a shape"):  # was a TypeError
        count_flops(model, 32)


def test_flops_grow_only_with_the_stem():
    model = create_model("sparseformer_v1_tiny")
    small = count_flops(model, (3, 224, 224))
    big = count_flops(model, (3, 448, 448))
    assert big.by_op["convolution"] == 4 * small.by_op["convolution"]
    assert big.complete - big.by_op["convolution"] == small.complete - small.by_op["convolution"]


def test_counts_timm_models_too():
    with torch.device("cpu"):
        model = timm.create_model("deit_tiny_patch16_224")
    flops = count_flops(model, (3, 224, 224))
    assert flops.gflops_complete == pytest.approx(1.26, rel=0.05)


def test_the_default_input_follows_the_model():
    nano = create_model("sparseformer_v1_nano")
    gray = create_model("sparseformer_v1_nano", in_chans=1)
    assert count_flops(nano).complete == count_flops(nano, (3, 224, 224)).complete
    assert count_flops(gray).complete < count_flops(nano).complete  # a 1-channel stem
    video = create_model("video_sparseformer_v1_micro", num_frames=4)
    assert count_flops(video).complete == count_flops(video, (3, 4, 224, 224)).complete
    half = count_flops(nano.to(torch.bfloat16))  # the input takes the weights' dtype
    assert half.complete == count_flops(nano.float()).complete


def test_counting_inside_no_grad_or_inference_mode_counts_the_same():
    """Where people count (under no_grad or inference_mode), the same figures."""
    model = create_model("sparseformer_v1_nano")
    plain = count_flops(model, (3, 64, 64))
    for mode in (torch.no_grad, torch.inference_mode):
        with mode():
            counted = count_flops(model, (3, 64, 64))
        assert (counted.complete, counted.paper) == (plain.complete, plain.paper)


def test_a_shape_the_model_cannot_run_on_is_named():
    nn = torch.nn
    conv3d = nn.Sequential(
        nn.Conv3d(3, 4, 3), nn.AdaptiveAvgPool3d(1), nn.Flatten(1), nn.Linear(4, 2)
    )
    with pytest.raises(ValueError, match=r"shape \(3, 4, 32, 32\) .*batch first"):
        count_flops(conv3d, (3, 4, 32, 32))  # read as (B, C, H, W): a clip model needs B
    assert count_flops(conv3d, (1, 3, 4, 32, 32)).complete > 0
    video = create_model("video_sparseformer_v1_micro")  # was told to give the batch first
    with pytest.raises(ValueError, match=r"a video model takes clips; give \(C, T, H, W\)"):
        count_flops(video, (3, 32, 32))
