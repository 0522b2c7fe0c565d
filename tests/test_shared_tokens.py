"""The initial tokens are the same for every image: the model computes them once per batch.

SparseFormer keeps its initial tokens and RoIs ``(1, N, ...)`` until an op makes them differ
(sampling reads each image; stochastic depth draws per image in training). The reference is
the same model with the tokens expanded over the batch first, where every op runs per image.
"""

from __future__ import annotations

import dataclasses
from unittest import mock

import pytest
import torch

from sparseformer import create_model
from sparseformer.layers import AdaptiveMixing
from sparseformer.models.sparseformer import SparseFormer

_shared_embed = SparseFormer._embed


def _per_image_embed(self, x):
    feats, tokens, rois = _shared_embed(self, x)
    B = feats.shape[0]
    return feats, tokens.expand(B, -1, -1), rois.expand(B, -1, -1)


def _run(model, x, seed=0):
    """Logits, the sampling points and every parameter's gradient of a large loss (large
    enough that the coordinate-gradient clamp bounds some of the points' gradients)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    out = model.forward_with_details(x)
    (out.logits.square().sum() * 1e4).backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    return out, grads


def _same_as_per_image(model, x, seed=0):
    shared, shared_grads = _run(model, x, seed)
    with mock.patch.object(SparseFormer, "_embed", _per_image_embed):
        per_image, per_image_grads = _run(model, x, seed)
    torch.testing.assert_close(shared.logits, per_image.logits, rtol=1e-10, atol=1e-10)
    for a, b in zip(shared.sampling_points, per_image.sampling_points, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    for a, b in zip(shared.rois, per_image.rois, strict=True):
        assert a.shape == b.shape
    assert shared_grads.keys() == per_image_grads.keys()
    for name, grad in shared_grads.items():
        torch.testing.assert_close(grad, per_image_grads[name], rtol=1e-9, atol=1e-9, msg=name)
    return shared


@pytest.mark.parametrize(
    "name", ["sparseformer_v1_nano", "sparseformer_btsp_nano", "video_sparseformer_v1_micro"]
)
def test_training_matches_tokens_per_image(name):
    torch.manual_seed(0)
    model = create_model(name).double().train()
    x = torch.randn(3, *((3, 2, 32, 32) if "video" in name else (3, 32, 32))).double()
    _same_as_per_image(model, x)


def test_coordinate_clamp_bounds_each_image():
    """The sampling points are expanded to the batch before the clamp: each image's gradient
    is bounded on its own, not their sum (the loss is large enough that the clamp acts)."""
    torch.manual_seed(0)
    model = create_model("sparseformer_v1_nano").double().train()
    x = torch.randn(4, 3, 32, 32).double()
    _same_as_per_image(model, x)
    # the clamp acted: without it the offsets' gradient is another
    _, clamped = _run(model, x)
    model.config = dataclasses.replace(model.config, coord_grad_clamp=False)
    _, free = _run(model, x)
    name = "stages.0.units.0.sample_mix.offset_bias"
    assert not torch.allclose(clamped[name], free[name])


def test_stochastic_depth_draws_per_image():
    """A unit with stochastic depth expands the shared tokens first: each image draws its
    own mask, as when the tokens are per image (the same draws from the same seed)."""
    torch.manual_seed(0)
    model = create_model("sparseformer_v1_nano", drop_path_rate=0.5).double().train()
    model.drop_path_rates = (0.5,) * len(model.drop_path_rates)  # the first unit's too
    x = torch.randn(8, 3, 32, 32).double()
    out = _same_as_per_image(model, x, seed=3)
    assert not torch.allclose(out.tokens[0], out.tokens[1])


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"bias": False, "inner_activation": False, "out_points": 6},
        {"activation": "quick_gelu"},
    ],
)
def test_mixing_shared_tokens(options):
    """Mixing ``(1, N, D)`` tokens with every image's points equals mixing the expanded
    tokens, values and gradients."""
    torch.manual_seed(0)
    mixing = AdaptiveMixing(32, 8, 4, **options).double()
    torch.nn.init.normal_(mixing.generator.weight)
    tokens = torch.randn(1, 5, 32, dtype=torch.float64, requires_grad=True)
    sampled = torch.randn(3, 5, 4, 8, dtype=torch.float64, requires_grad=True)
    shared = mixing(tokens, sampled)
    grads = torch.autograd.grad(shared.square().sum(), [tokens, sampled, *mixing.parameters()])
    expanded = tokens.expand(3, -1, -1)
    per_image = mixing(expanded, sampled)
    ref = torch.autograd.grad(per_image.square().sum(), [tokens, sampled, *mixing.parameters()])
    torch.testing.assert_close(shared, per_image, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
    with torch.inference_mode():
        torch.testing.assert_close(mixing(tokens, sampled), per_image, rtol=1e-12, atol=1e-12)


def test_shared_work_runs_once_per_batch():
    """The first unit's attention runs on one set of tokens whatever the batch."""
    model = create_model("sparseformer_v1_nano").eval()
    attn = model.stages[0].units[0]["attn"]
    seen = []
    attn.register_forward_hook(lambda m, args, out: seen.append(out[0].shape[0]))
    with torch.inference_mode():
        model(torch.randn(5, 3, 32, 32))
    assert seen == [1, 5]  # its first application shared, its second per image
