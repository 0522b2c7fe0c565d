"""CPU fast paths (fused linear, channels-last stem) keep the authors' numbers."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from sparseformer import SparseFormer, count_flops, create_model, load_checkpoint
from sparseformer.layers import AdaptiveMixing, EarlyConvolution, channel_normalize, mixing_fused
from sparseformer.layers import linear as linear_module
from sparseformer.layers.linear import faster, fused_linear_available, linear, packed_weights

from .test_conformance import fixture, fixture_config, layout  # noqa: F401  (fixture)


@pytest.mark.parametrize("kernel", ["always", "never", "packed"])
@pytest.mark.parametrize("batch", ["a", "b"])
def test_inference_mode_matches_official_outputs(fixture, batch, kernel, monkeypatch):  # noqa: F811
    """Inference takes the fast paths; with either linear kernel, and with the fused one's
    weights packed, logits and RoIs still match the authors' code."""
    monkeypatch.setattr(linear_module, "FUSED_LINEAR", "always" if kernel == "packed" else kernel)
    model = SparseFormer(fixture_config()).eval()
    load_checkpoint(model, {"model": layout(fixture, "imagenet")})
    x = fixture[f"input_{batch}"]
    packing = packed_weights() if kernel == "packed" else contextlib.nullcontext()
    with torch.inference_mode(), packing:
        assert fused_linear_available(x, model.head.weight) or not torch.backends.mkldnn.enabled
        out = model.forward_with_details(x)
    torch.testing.assert_close(out.logits, fixture[f"logits_{batch}"], rtol=0, atol=1e-5)
    torch.testing.assert_close(out.rois[-1], fixture[f"rois_{batch}"], rtol=0, atol=1e-5)


@pytest.mark.parametrize("gelu", [False, True])
def test_linear_matches_module_with_and_without_grad(gelu):
    layer = nn.Linear(48, 80)
    x = torch.randn(2, 7, 48)
    expected = F.gelu(layer(x)) if gelu else layer(x)
    with torch.no_grad():
        torch.testing.assert_close(linear(x, layer, gelu), expected, rtol=0, atol=1e-5)
    y = linear(x, layer, gelu)  # with grad: the plain path, gradients flow
    assert not fused_linear_available(x, layer.weight)
    y.sum().backward()
    assert layer.weight.grad is not None


@pytest.mark.parametrize("kernel", ["always", "auto"])
def test_a_trainable_bias_alone_gets_its_gradient(kernel, monkeypatch):
    """Bias-only fine-tuning: the weight frozen, the input wanting no gradient. The fused
    kernel has no derivative, so the bias's gradient would be lost (or, with the layer applied
    twice, wrong); the plain path runs."""
    monkeypatch.setattr(linear_module, "FUSED_LINEAR", kernel)
    layer = nn.Linear(48, 80)
    layer.weight.requires_grad_(False)
    x = torch.randn(2, 7, 48)
    linear(F.gelu(linear(x, layer)[..., :48]), layer, gelu=True).sum().backward()
    got, layer.bias.grad = layer.bias.grad, None
    F.gelu(layer(F.gelu(layer(x)[..., :48]))).sum().backward()
    assert got is not None
    torch.testing.assert_close(got, layer.bias.grad)
    assert not fused_linear_available(x, layer.weight, layer.bias)


def test_forward_mode_tangents_pass_through_linear(monkeypatch):
    """``torch.autograd.forward_ad``: dual tensors require no grad, but the fused kernel would
    drop their tangents; the plain path carries them."""
    import torch.autograd.forward_ad as fwAD

    monkeypatch.setattr(linear_module, "FUSED_LINEAR", "always")
    layer = nn.Linear(48, 80).eval()
    x, v = torch.randn(2, 7, 48), torch.randn(2, 7, 48)
    with torch.no_grad(), fwAD.dual_level():
        tangent = fwAD.unpack_dual(linear(fwAD.make_dual(x, v), layer, gelu=True)).tangent
    expected = torch.func.jvp(lambda x: F.gelu(layer(x)), (x,), (v,))[1]
    assert tangent is not None
    torch.testing.assert_close(tangent, expected)
    with torch.no_grad():  # outside the dual level, the fused kernel again
        assert fused_linear_available(x, layer.weight, layer.bias) or not linear_module._HAS_KERNEL


def test_each_shape_takes_the_linear_kernel_measured_faster_once(monkeypatch):
    """Neither kernel wins on every machine: each shape races them once and keeps the faster."""
    if not linear_module._HAS_KERNEL:
        pytest.skip("this torch has no oneDNN fused linear")
    monkeypatch.setattr(linear_module, "_CHOSEN", {})
    winner, races, fused_calls = [1], [], []
    fused = linear_module._fused
    monkeypatch.setattr(linear_module, "faster", lambda *c: races.append(1) or winner[0])
    monkeypatch.setattr(linear_module, "_fused", lambda *a: fused_calls.append(1) or fused(*a))
    layer = nn.Linear(48, 80)
    x = torch.randn(2, 7, 48)
    with torch.inference_mode():
        for _ in range(3):  # the plain kernel won the race: taken, and no second race
            torch.testing.assert_close(linear(x, layer, gelu=True), F.gelu(layer(x)))
        assert (len(races), len(fused_calls)) == (1, 0)
        winner[0] = 0
        linear(x, layer, gelu=True)  # the same shape: the race stands
        linear(torch.randn(15, 48), layer, gelu=True)  # 15 rows: as 14 (within a power of 2)
        assert (len(races), len(fused_calls)) == (1, 0)
        linear(x[:1], layer, gelu=True)  # other rows: raced, the fused kernel won
        linear(x[:1], layer, gelu=True)
        assert (len(races), len(fused_calls)) == (2, 2)
        with packed_weights():  # a packed weight may win where a plain one lost: raced again
            linear(x[:1], layer, gelu=True)
        assert len(races) == 3
        monkeypatch.setattr(linear_module, "FUSED_LINEAR", "never")
        linear(torch.randn(5, 48), layer)
    assert len(races) == 3 and len(fused_calls) == 3


def test_one_linear_kernel_holds_in_its_own_thread_only():
    """A run's validation takes one kernel; a server's inference in another thread meanwhile
    keeps the faster per shape."""
    import threading

    seen = {}
    inside, checked = threading.Event(), threading.Event()

    def other_thread():
        inside.wait(10)
        seen["other"] = linear_module.kernel_setting()
        checked.set()

    thread = threading.Thread(target=other_thread)
    thread.start()
    with linear_module.one_linear_kernel():
        seen["own"] = linear_module.kernel_setting()
        inside.set()
        checked.wait(10)
    thread.join()
    assert seen == {"own": "always", "other": "auto"}
    assert linear_module.kernel_setting() == "auto"


needs_packing = pytest.mark.skipif(
    not linear_module._CAN_PACK, reason="this torch has no oneDNN weight reorder"
)


def _packs() -> dict:
    """The packed copies held now: weight key -> the copy."""
    return {key: held[2] for key, held in (linear_module._PACKS.get() or {}).items()}


@needs_packing
def test_packed_weights_are_made_once_per_weight_and_dropped_with_the_block(monkeypatch):
    monkeypatch.setattr(linear_module, "FUSED_LINEAR", "always")
    model = create_model("sparseformer_v1_nano").eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        plain = model(x)
        with packed_weights():
            first = model(x)
            packs = _packs()
            second = model(x)
            assert _packs().keys() == packs.keys()
            assert all(_packs()[key] is copy for key, copy in packs.items())  # not made again
        assert not _packs()
    packed_ids = [key[0] for key in packs]
    assert len(packs) > 2
    mixing = next(m for m in model.modules() if isinstance(m, AdaptiveMixing))
    assert packed_ids.count(id(mixing.generator.weight)) == 2  # linear_split's two parts
    torch.testing.assert_close(first, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(second, plain, rtol=0, atol=1e-6)


@needs_packing
def test_a_weight_changed_inside_the_block_is_packed_again(monkeypatch):
    monkeypatch.setattr(linear_module, "FUSED_LINEAR", "always")
    layer = nn.Linear(48, 80)
    x = torch.randn(14, 48)
    with torch.no_grad(), packed_weights():
        linear(x, layer)
        layer.weight.mul_(2)  # as an optimizer's step does: the weight's version moves
        doubled = linear(x, layer)
        expected = F.linear(x, layer.weight, layer.bias)
        layer.load_state_dict({"weight": torch.ones(80, 48), "bias": torch.zeros(80)})
        loaded = linear(x, layer)
    torch.testing.assert_close(doubled, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(loaded, x.sum(-1, keepdim=True).expand(14, 80), rtol=0, atol=1e-5)


@needs_packing
@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_each_block_packs_its_own_copies_and_drops_them(monkeypatch):
    """A nested block (an evaluation inside a caller's block) reads the weights as they are
    now; a freed weight's copy goes with it; the block's copies go when it ends."""
    monkeypatch.setattr(linear_module, "FUSED_LINEAR", "always")
    layer = nn.Linear(48, 80)
    x = torch.randn(14, 48)
    with torch.no_grad(), packed_weights():
        linear(x, layer)
        outer = linear_module._PACKS.get()
        layer.weight.data.mul_(2)  # not seen through .data: the outer block's copy is stale
        with packed_weights():
            torch.testing.assert_close(linear(x, layer), layer(x), rtol=0, atol=1e-5)
        other = nn.Linear(48, 80)
        linear(x, other)
        assert len(outer) == 2
        del other
        assert len(outer) == 1
        torch.testing.assert_close(linear(x, nn.Linear(48, 0)), x.new_empty(14, 0))
    assert not outer


@needs_packing
def test_weights_made_in_inference_mode_are_not_packed(monkeypatch):
    """They keep no version, so a change to them could not be seen."""
    monkeypatch.setattr(linear_module, "FUSED_LINEAR", "always")
    with torch.inference_mode():
        layer = nn.Linear(48, 80)
        with packed_weights():
            linear(torch.randn(14, 48), layer)
            assert not _packs()


@pytest.mark.parametrize("gelu", [False, True])
@pytest.mark.parametrize("packing", [False, True])
def test_fused_kernel_takes_a_strided_bias(gelu, packing):
    """oneDNN reads the bias as contiguous: a strided one (a view, or a Parameter put in by
    ``load_state_dict(assign=True)``) is made contiguous first, not read past its values."""
    if linear_module.pack_weight(torch.ones(2, 2)) is None:
        pytest.skip("this torch has no oneDNN fused linear")
    x, weight = torch.randn(6, 16), torch.randn(24, 16)
    for bias in (torch.randn(48)[::2], torch.randn(1).expand(24)):
        packed = linear_module.pack_weight(weight) if packing else weight
        expected = F.linear(x, weight, bias)
        expected = F.gelu(expected) if gelu else expected
        out = linear_module.packed_linear(x, packed, bias, gelu)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_the_race_between_kernels_leaves_out_the_warm_up_call():
    now, costs = [0.0], {"a": [50.0, 3.0, 3.0], "b": [2.0, 2.5, 2.0]}

    def call(name):
        return lambda: now.__setitem__(0, now[0] + costs[name].pop(0))

    assert faster(call("a"), call("b"), clock=lambda: now[0]) == 1  # b: 2.0 against 3.0
    costs = {"a": [50.0, 1.0, 9.0], "b": [2.0, 2.5, 2.0]}  # a's best of its two: 1.0
    assert faster(call("a"), call("b"), clock=lambda: now[0]) == 0


def test_the_race_times_short_calls_until_each_had_its_time():
    """Two turns let one interruption choose between calls of a tenth of a millisecond: the
    race goes on until each call has taken its share (5 ms), here the most turns (10)."""
    now = [0.0]
    costs = {"a": [1e-4, 6e-4, 6e-4] + [1e-4] * 8, "b": [1e-4] + [2e-4] * 10}

    def call(name):
        return lambda: now.__setitem__(0, now[0] + costs[name].pop(0))

    assert faster(call("a"), call("b"), clock=lambda: now[0]) == 0  # a's 0.1 against b's 0.2
    assert costs == {"a": [], "b": []}  # warm-up and 10 turns each


def test_flop_counter_sees_the_linear_without_grad():
    """The fused kernel must not hide matrix products from the FLOP counter."""
    layer = nn.Linear(48, 80)
    x = torch.randn(14, 48)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        linear(x, layer, gelu=True)
    assert counter.get_total_flops() == 2 * 14 * 48 * 80
    assert count_flops(create_model("sparseformer_v1_nano"), (3, 32, 32)).by_op["addmm"] > 0


def test_stem_equals_relu_then_pool_in_contiguous_layout():
    stem = EarlyConvolution(3, 16)
    x = torch.randn(2, 3, 40, 40)
    expected = channel_normalize(F.max_pool2d(F.relu(stem.conv(x)), 3, 2, 1), stem.eps)
    # the channels-last convolution sums in another order than the contiguous one: float32
    # rounding (1.5e-6 measured on an AMD EPYC), where a wrong layout or order of ops is O(1)
    torch.testing.assert_close(stem(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("video", [False, True])
def test_chunked_stem_equals_one_pass(monkeypatch, video):
    """The CPU stem runs a few images (or frames) at a time: same values and gradients."""
    import sparseformer.layers.stem as stem_module

    torch.manual_seed(0)
    stem = EarlyConvolution(3, 8, video=video).double()
    shape = (2, 3, 4, 21, 26) if video else (7, 3, 21, 26)  # 8 frames or 7 images
    x = torch.randn(shape, dtype=torch.float64, requires_grad=True)
    g = torch.randn(stem(x).shape, dtype=torch.float64)
    whole = stem(x)  # 8 * 11 * 13 outputs per image: one chunk under the default budget
    expected = torch.autograd.grad(whole, (x, stem.conv.weight, stem.conv.bias), g)
    calls = []
    one_pass = stem._stem_chunk
    monkeypatch.setattr(stem, "_stem_chunk", lambda *a: calls.append(a[0].shape[0]) or one_pass(*a))
    monkeypatch.setattr(stem_module, "_CHUNK_FLOATS", 3 * 8 * 11 * 13)  # three images a chunk
    chunked = stem(x)
    assert calls == ([3, 3, 2] if video else [3, 3, 1])
    assert chunked.is_contiguous(
        memory_format=torch.channels_last_3d if video else torch.channels_last
    )
    torch.testing.assert_close(chunked, whole, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(chunked, (x, stem.conv.weight, stem.conv.bias), g)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_chunked_mixing_equals_one_pass(monkeypatch):
    """The CPU inference chunking over the batch computes every token as one pass does."""
    mixing = AdaptiveMixing(dim=32, in_channels=8, num_points=4)
    nn.init.normal_(mixing.generator.weight, std=0.1)
    B, N = 60, 16  # 80 floats of matrices per token: 24 images per chunk, three chunks
    monkeypatch.setattr(mixing_fused, "_CHUNK_FLOATS", 24 * N * (8 * 8 + 4 * 4) + 5)
    tokens = torch.randn(B, N, 32, requires_grad=True)
    sampled = torch.randn(B, 8, N, 4).permute(0, 2, 3, 1)  # grid_sample's layout, permuted
    whole = mixing._decode(tokens, sampled)
    (grad_whole,) = torch.autograd.grad(whole.square().sum(), tokens)
    trained = mixing(tokens, sampled)  # with grad: one pass, same gradients
    (grad,) = torch.autograd.grad(trained.square().sum(), tokens)
    torch.testing.assert_close(grad, grad_whole, rtol=0, atol=1e-6)
    with torch.inference_mode(), mock.patch.object(mixing, "_decode", wraps=mixing._decode) as spy:
        torch.testing.assert_close(mixing(tokens, sampled), whole.detach(), rtol=0, atol=1e-5)
    assert [call.args[0].shape[0] for call in spy.call_args_list] == [24, 24, 12]
    with (
        torch.inference_mode(),
        torch.autocast("cpu", dtype=torch.bfloat16),
        mock.patch.object(mixing, "_decode", wraps=mixing._decode) as spy,
    ):
        mixing(tokens, sampled)  # autocast converts the weights per chunk: one pass
    assert [call.args[0].shape[0] for call in spy.call_args_list] == [60]


@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_channel_normalize_matches_unbiased_definition(layout):
    x = (3 * torch.randn(2, 24, 9, 7) + 1).contiguous(memory_format=layout)
    var, mean = torch.var_mean(x.double(), dim=1, keepdim=True, correction=1)
    expected = ((x.double() - mean) / (var + 1e-7).sqrt()).float()
    torch.testing.assert_close(channel_normalize(x), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_split_makes_each_part_contiguous_with_the_layers_values(bias):
    """Each part by its own product: the values and gradients of ``layer(x).split``, every
    part contiguous; with hooks on the layer, the layer itself is called."""
    from sparseformer.layers.linear import linear_split

    layer = nn.Linear(8, 7, bias=bias).double()
    x = torch.randn(2, 3, 8, dtype=torch.float64, requires_grad=True)
    parts = linear_split(x, layer, [4, 3])
    expected = layer(x).split([4, 3], dim=-1)
    assert [tuple(p.shape) for p in parts] == [(2, 3, 4), (2, 3, 3)]
    assert all(p.is_contiguous() for p in parts) and not expected[0].is_contiguous()
    for part, want in zip(parts, expected, strict=True):
        torch.testing.assert_close(part, want, rtol=0, atol=1e-12)
    assert torch.autograd.gradcheck(lambda x, w: linear_split(x, layer, [4, 3]), (x, layer.weight))
    with torch.inference_mode():  # the fused kernel, in float32
        layer32 = layer.float()
        parts = linear_split(x.detach().float(), layer32, [4, 3])
        expected = layer32(x.detach().float()).split([4, 3], dim=-1)
        for part, want in zip(parts, expected, strict=True):
            torch.testing.assert_close(part, want, rtol=0, atol=1e-5)
    seen = []
    layer32.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    linear_split(x.detach().float(), layer32, [4, 3])
    assert seen == [torch.Size([2, 3, 7])]


def test_a_linear_subclass_with_its_own_forward_is_always_called():
    """QAT or LoRA layers replace ``forward``: ``linear`` and ``linear_split`` call them, in
    training and in inference, instead of using their weight and bias directly."""
    from sparseformer.layers.linear import linear_split

    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    layer, plain = Doubled(8, 6), nn.Linear(8, 6)
    plain.load_state_dict(layer.state_dict())
    x = torch.randn(3, 8, requires_grad=True)
    for grad in (True, False):
        with torch.set_grad_enabled(grad):
            torch.testing.assert_close(linear(x, layer), 2 * plain(x))
            torch.testing.assert_close(linear(x, layer, gelu=True), F.gelu(2 * plain(x)))
            torch.testing.assert_close(torch.cat(linear_split(x, layer, [2, 4]), -1), 2 * plain(x))


def test_linear_forward_hooks_still_fire_in_inference():
    layer = nn.Linear(8, 4)
    seen = []
    layer.register_forward_hook(lambda module, args, out: seen.append(out.shape))
    with torch.inference_mode():
        linear(torch.randn(3, 8), layer, gelu=True)
    assert seen == [torch.Size([3, 4])]


def test_video_stem_per_frame_matches_3d_convolution_and_pooling():
    """The video stem folds frames into the batch; same values and gradients as 1x7x7 conv3d."""
    torch.manual_seed(0)
    stem = EarlyConvolution(3, 8, video=True).double()
    x = torch.randn(2, 3, 3, 21, 26, dtype=torch.float64, requires_grad=True)
    y = stem(x)
    pooled = F.max_pool3d(stem.conv(x), (1, 3, 3), (1, 2, 2), (0, 1, 1))
    reference = channel_normalize(F.relu(pooled), stem.eps)
    assert y.shape == reference.shape == (2, 8, 3, 6, 7)
    torch.testing.assert_close(y, reference, rtol=0, atol=1e-12)
    g = torch.randn_like(y)
    grads = torch.autograd.grad(y, (x, stem.conv.weight), g)
    expected = torch.autograd.grad(reference, (x, stem.conv.weight), g)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)
