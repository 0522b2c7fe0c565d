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
from sparseformer.layers import AdaptiveMixing, Attention
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
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
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


def test_training_matches_tokens_per_image_on_the_fast_paths():
    """SparseFormer-T's width at 128 px: CPU training's gathered sampling and fused mixing."""
    torch.manual_seed(0)
    model = create_model("sparseformer_v1_tiny", num_classes=10).double().train()
    _same_as_per_image(model, torch.randn(2, 3, 128, 128).double())


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


def _first_attention_batches(model, x):
    """The batch of the tokens each attention application of the first unit takes."""
    seen = []

    def spy(self, tokens):
        seen.append(tokens.shape[0])
        return _attention_forward(self, tokens)

    with torch.inference_mode(), mock.patch.object(Attention, "forward", spy):
        model(x)
    return seen[: model.config.stages[0].repeats]


_attention_forward = Attention.forward


def test_shared_work_runs_once_per_batch():
    """The first unit's attention runs on one set of tokens whatever the batch; a hook, or a
    user's layer in the unit, has it run per image."""
    model = create_model("sparseformer_v1_nano").eval()
    x = torch.randn(5, 3, 32, 32)
    assert _first_attention_batches(model, x) == [1, 5]  # the first application shared
    handle = model.stages[0].units[0].mlp.fc1.register_forward_hook(lambda *args: None)
    assert _first_attention_batches(model, x) == [5, 5]
    handle.remove()
    assert _first_attention_batches(model, x) == [1, 5]


class _DropoutAdapter(torch.nn.Linear):
    """A LoRA-like layer: a low-rank branch on dropped-out input, a mask per call."""

    def __init__(self, base: torch.nn.Linear) -> None:
        super().__init__(base.in_features, base.out_features, bias=base.bias is not None)
        self.load_state_dict(base.state_dict())
        self.down = torch.nn.Linear(base.in_features, 2, bias=False)
        self.up = torch.nn.Linear(2, base.out_features, bias=False)
        torch.nn.init.normal_(self.up.weight)
        self.dropout = torch.nn.Dropout(0.5)

    def forward(self, x):
        return super().forward(x) + self.up(self.down(self.dropout(x)))


def test_a_users_layer_runs_per_image():
    """A user's layer in the first unit (here one that draws dropout) sees every image, as
    when the tokens are per image: each image draws its own mask."""
    torch.manual_seed(0)
    model = create_model("sparseformer_v1_nano").double().train()
    op = model.stages[0].units[0].sample_mix
    op.offset_proj = _DropoutAdapter(op.offset_proj).double()
    x = torch.randn(4, 3, 32, 32).double()
    out = _same_as_per_image(model, x)
    points = out.sampling_points[0]
    assert not torch.allclose(points[0], points[1])


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::torch.jit.TracerWarning")
def test_a_batch_1_trace_runs_other_batches():
    """torch.jit.trace of a batch-1 example records the tokens per image, so the graph
    takes any batch."""
    model = create_model("sparseformer_v1_nano").eval()
    with torch.no_grad():
        traced = torch.jit.trace(model, torch.randn(1, 3, 32, 32))
        x = torch.randn(3, 3, 32, 32)
        torch.testing.assert_close(traced(x), model(x))


def test_details_are_per_image_and_writable():
    model = create_model("sparseformer_v1_nano").eval()
    with torch.no_grad():
        out = model.forward_with_details(torch.randn(3, 3, 32, 32))
    for t in [*out.rois, *out.sampling_points]:
        assert t.shape[0] == 3
        t.clamp_(0, 1)  # not a view shared by the images
