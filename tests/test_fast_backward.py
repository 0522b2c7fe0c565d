"""CPU training fast paths (fused forward and backward) against their plain-autograd references.

Each fast path is compared in float64 with ``gradcheck`` and, value for value, with the slow
reference beside it; the model-level gradients against the authors' are in
``test_conformance.py``.
"""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from torch import nn

from sparseformer.layers import AdaptiveMixing, mixing_fused
from sparseformer.layers.linear import pack_weight
from sparseformer.layers.mixing_fused import fused_mix
from sparseformer.layers.sampling import (
    sample_features,
    sample_features_gather,
    sample_features_grid,
)


def _mixing(bias: bool, inner: bool, activation: str, out_points: int | None) -> AdaptiveMixing:
    torch.manual_seed(0)
    mixing = AdaptiveMixing(
        dim=12,
        in_channels=4,
        num_points=3,
        activation=activation,
        out_points=out_points,
        bias=bias,
        inner_activation=inner,
    ).double()
    nn.init.normal_(mixing.generator.weight, std=0.3)  # token-dependent matrices
    if bias:
        nn.init.normal_(mixing.channel_bias, std=0.3)
        nn.init.normal_(mixing.point_bias, std=0.3)
    return mixing


VARIANTS = [
    (True, True, "gelu", None),  # v1
    (False, False, "quick_gelu", 5),  # bootstrapped: no biases, no inner act, more out points
    (True, False, "gelu", 5),
    (False, True, "quick_gelu", None),
]


@pytest.mark.parametrize("bias,inner,activation,out_points", VARIANTS)
def test_fused_mix_gradcheck(bias, inner, activation, out_points):
    mixing = _mixing(bias, inner, activation, out_points)
    C, P, Q = mixing.in_channels, mixing.num_points, mixing.out_points
    M = 7  # chunks of 3: two full and a remainder
    hidden = torch.randn(M, mixing.generator.in_features, dtype=torch.float64, requires_grad=True)
    sampled = torch.randn(M, P, C, dtype=torch.float64, requires_grad=True)
    weight = mixing.generator.weight.detach().clone().requires_grad_()
    gen_bias = mixing.generator.bias.detach().clone().requires_grad_()
    bc = bp = None
    if bias:
        bc = mixing.channel_bias.detach().clone().requires_grad_()
        bp = mixing.point_bias.detach().clone().requires_grad_()

    def fn(hidden, weight, gen_bias, sampled, bc, bp):
        return fused_mix(
            hidden, weight, gen_bias, sampled, bc, bp, (C, P, Q), activation, inner, chunk=3
        )

    assert torch.autograd.gradcheck(fn, (hidden, weight, gen_bias, sampled, bc, bp))


@pytest.mark.parametrize("bias,inner,activation,out_points", VARIANTS)
def test_fused_decode_matches_reference(bias, inner, activation, out_points):
    """Training takes the fused path; its output and every gradient equal the reference's."""
    mixing = _mixing(bias, inner, activation, out_points)
    B, N = 3, 5
    tokens = torch.randn(B, N, 12, dtype=torch.float64, requires_grad=True)
    # grid_sample's layout, permuted, as the model passes it
    sampled = torch.randn(B, 4, N, 3, dtype=torch.float64).permute(0, 2, 3, 1).requires_grad_()
    grad = torch.randn(B, N, 12, dtype=torch.float64)
    inputs = (tokens, sampled, *mixing.parameters())

    expected = mixing._decode(tokens, sampled)
    expected_grads = torch.autograd.grad(expected, inputs, grad)
    with (
        mock.patch("sparseformer.layers.mixing.fused_mix", wraps=fused_mix) as spy,
        mock.patch("sparseformer.layers.mixing_fused._FUSED_MIN_FLOATS", 0),
    ):
        out = mixing(tokens, sampled)
    assert spy.called
    grads = torch.autograd.grad(out, inputs, grad)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def _float32_case(batch: int):
    """A float32 mixing of 16 tokens per image, its inputs and the plain-autograd gradients."""
    mixing = AdaptiveMixing(dim=32, in_channels=8, num_points=4)
    nn.init.normal_(mixing.generator.weight, std=0.1)
    tokens = torch.randn(batch, 16, 32, requires_grad=True)
    sampled = torch.randn(batch, 16, 4, 8, requires_grad=True)
    inputs = (tokens, sampled, *mixing.parameters())
    expected = torch.autograd.grad(mixing._decode(tokens, sampled).square().sum(), inputs)
    return mixing, tokens, sampled, inputs, expected


def test_fused_decode_float32_matches_reference():
    mixing, tokens, sampled, inputs, expected = _float32_case(9)
    with mock.patch("sparseformer.layers.mixing_fused._FUSED_MIN_FLOATS", 0):
        grads = torch.autograd.grad(mixing(tokens, sampled).square().sum(), inputs)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(pack_weight(torch.ones(2, 2)) is None, reason="no oneDNN reorder kernel")
def test_fused_decode_float32_generates_from_one_packed_weight():
    """In float32 the generator's weight is laid out for oneDNN once per layer call, and every
    chunk's matrices, in forward and again in backward, are made from that copy."""
    mixing, tokens, sampled, inputs, expected = _float32_case(3)
    copies = []
    pack = lambda weight: copies.append(pack_weight(weight)) or copies[-1]  # noqa: E731
    with (
        mock.patch("sparseformer.layers.mixing_fused._FUSED_MIN_FLOATS", 0),
        mock.patch.object(mixing_fused, "_CHUNK_FLOATS", 10 * (8 * 8 + 4 * 4)),  # 10 tokens
        mock.patch.object(mixing_fused, "pack_weight", side_effect=pack),
        mock.patch.object(mixing_fused, "packed_linear", wraps=mixing_fused.packed_linear) as calls,
    ):
        out = mixing(tokens, sampled)
        grads = torch.autograd.grad(out.square().sum(), inputs)
    assert len(copies) == 1 and calls.call_count == 2 * 5  # 48 tokens: 5 chunks, twice
    assert all(call.args[1] is copies[0] for call in calls.call_args_list)
    torch.testing.assert_close(out, mixing._decode(tokens, sampled), rtol=1e-5, atol=1e-5)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(("channels", "points", "fused"), [(32, 16, False), (96, 36, True)])
def test_fused_decode_only_for_large_generated_matrices(channels, points, fused):
    """CPU training decodes by mixing_fused when each token's matrices hold >= 4096 floats
    (SparseFormer v1: 96^2 + 36^2), by plain autograd under (the demo's micro model: 1,280)."""
    mixing = AdaptiveMixing(dim=16, in_channels=channels, num_points=points)
    tokens = torch.randn(1, 2, 16, requires_grad=True)
    sampled = torch.randn(1, 2, points, channels)
    with mock.patch("sparseformer.layers.mixing.fused_mix", wraps=fused_mix) as spy:
        mixing(tokens, sampled).sum().backward()
    assert spy.called == fused


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_gather_sampling_matches_grid_sample(dims, padding_mode):
    """Values and gradients (features and points) of the embedding-bag sampler equal
    ``grid_sample``'s, points inside, on the edges and outside the map."""
    torch.manual_seed(0)
    spatial = (5, 6) if dims == 2 else (3, 5, 6)
    feats = torch.randn(2, 4, *spatial, dtype=torch.float64, requires_grad=True)
    points = (torch.rand(2, 3, 7, dims, dtype=torch.float64) * 1.6 - 0.3).requires_grad_()
    grad = torch.randn(2, 3, 7, 4, dtype=torch.float64)
    out = sample_features_gather(feats, points, padding_mode)
    expected = sample_features_grid(feats, points, padding_mode)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-12)
    grads = torch.autograd.grad(out, (feats, points), grad)
    expected_grads = torch.autograd.grad(expected, (feats, points), grad)
    for a, b in zip(grads, expected_grads):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
def test_gather_sampling_gradcheck(dims, padding_mode):
    torch.manual_seed(1)
    spatial = (4, 5) if dims == 2 else (2, 4, 5)
    feats = torch.randn(1, 3, *spatial, dtype=torch.float64, requires_grad=True)
    # away from pixel centres, where bilinear sampling has no derivative
    points = (torch.rand(1, 2, 3, dims, dtype=torch.float64) * 1.4 - 0.2).requires_grad_()
    assert torch.autograd.gradcheck(
        lambda f, p: sample_features_gather(f, p, padding_mode), (feats, points)
    )


def test_cpu_training_and_large_batches_sample_by_gather_few_points_by_grid_sample():
    feats = torch.randn(2, 64, 32, 32).contiguous(memory_format=torch.channels_last)
    points = torch.rand(2, 3, 4, 2)
    many = torch.rand(2, 3, 4096, 2)  # 24,576 points
    with mock.patch(
        "sparseformer.layers.sampling.sample_features_gather", wraps=sample_features_gather
    ) as spy:
        sample_features(feats, points)
        assert spy.call_count == 0  # inference on few points: grid_sample
        torch.testing.assert_close(
            sample_features(feats, many), sample_features_grid(feats, many), rtol=0, atol=1e-5
        )
        assert spy.call_count == 1  # inference on many points
        out = sample_features(feats, points.requires_grad_())
        assert spy.call_count == 2  # training
    assert out.is_contiguous()  # (B, N, P, C) in memory: mixing reads it without a copy


def test_narrow_or_small_maps_sample_by_grid_sample():
    """grid_sample, whose cost grows with the channels, on maps under 64 channels, and in
    training on maps under 32 x 32 pixels."""
    narrow = torch.randn(2, 32, 32, 32).contiguous(memory_format=torch.channels_last)
    small = torch.randn(2, 64, 16, 16, requires_grad=True)
    many = torch.rand(2, 3, 4096, 2, requires_grad=True)
    with mock.patch(
        "sparseformer.layers.sampling.sample_features_gather", wraps=sample_features_gather
    ) as spy:
        sample_features(narrow, many.detach())  # inference
        sample_features(narrow.requires_grad_(), many)  # training
        sample_features(small, many)  # training on a small map
        assert spy.call_count == 0
        with torch.no_grad():
            sample_features(small, many)  # inference on many points of a wide map: the gather
        assert spy.call_count == 1


@pytest.mark.parametrize("head_width", [1, 4, 8, 16, 32])
def test_narrow_head_attention_matches_sdpa(head_width):
    """Two batched products for heads of <= 16 channels on AVX2 CPUs (SDPA above): same values
    and gradients as ``scaled_dot_product_attention``, in inference and under autograd."""
    from sparseformer.layers.attention import attention

    torch.manual_seed(0)
    qkv = torch.randn(3, 5, 3, 4, head_width, dtype=torch.float64)  # (B, N, 3, heads, d)
    q, k, v = (t.requires_grad_() for t in qkv.permute(2, 0, 3, 1, 4).unbind(0))
    expected = torch.nn.functional.scaled_dot_product_attention(q, k, v)
    with (
        mock.patch.object(torch.backends.cpu, "get_cpu_capability", return_value="AVX2"),
        mock.patch("sparseformer.layers.attention._products_win", return_value=True),
    ):
        torch.testing.assert_close(attention(q, k, v), expected, rtol=0, atol=1e-12)
        with torch.inference_mode():
            torch.testing.assert_close(attention(q, k, v), expected.detach(), rtol=0, atol=1e-12)
        assert torch.autograd.gradcheck(attention, (q, k, v))
        if head_width <= 16:  # (SDPA's CPU backward is not differentiable)
            assert torch.autograd.gradgradcheck(attention, (q, k, v))  # gradient penalties
        with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention") as fused:
            attention(q, k, v)  # 5 tokens
            attention(*(t.repeat(1, 1, 13, 1) for t in (q, k, v)))  # 65 tokens: the fused kernel
    assert fused.call_count == (1 if head_width <= 16 else 2)


@pytest.mark.parametrize("capability", ["AVX512", "AVX2", "DEFAULT"])
def test_attention_with_gradients_takes_two_products_on_every_cpu(capability):
    """With gradients narrow heads over few tokens take the two products whatever the CPU (an
    AMD EPYC reporting AVX-512's training step 1.01-1.08x faster with them, a Xeon's as fast): one
    kernel, so that a resumed run computes as the run it continues; wide heads and longer
    sequences the fused kernel."""
    from sparseformer.layers.attention import attention

    narrow = torch.randn(2, 4, 5, 8, requires_grad=True)
    wide = torch.randn(2, 2, 5, 32, requires_grad=True)
    long = torch.randn(1, 2, 65, 8, requires_grad=True)
    with (
        mock.patch.object(torch.backends.cpu, "get_cpu_capability", return_value=capability),
        mock.patch.object(torch.nn.functional, "scaled_dot_product_attention") as fused,
    ):
        attention(narrow, narrow, narrow)
        assert fused.call_count == 0
        attention(wide, wide, wide)
        attention(long, long, long)
    assert fused.call_count == 2


@pytest.mark.parametrize("products_faster", [False, True])
def test_inference_attention_takes_the_kernel_measured_faster_on_each_shape(products_faster):
    """The CPU's build does not say which is faster (an AMD EPYC reporting AVX-512 ran the two
    products in half the fused kernel's time, a Xeon's the other way round): inference times
    both on a shape's first call and keeps the faster; a run's validation, inside
    one_linear_kernel, takes the build's rule, as training does."""
    import sparseformer.layers.attention as module
    from sparseformer.layers.linear import one_linear_kernel

    q = torch.randn(3, 4, 7, 8)
    with (
        mock.patch.object(module, "_CHOSEN", {}),
        mock.patch.object(torch.backends.cpu, "get_cpu_capability", return_value="AVX512"),
        mock.patch.object(module, "faster", return_value=int(products_faster)) as race,
        mock.patch.object(module, "_products", wraps=module._products) as products,
        torch.no_grad(),
    ):
        for _ in range(3):
            torch.testing.assert_close(
                module.attention(q, q, q), torch.nn.functional.scaled_dot_product_attention(q, q, q)
            )
        assert race.call_count == 1 and products.call_count == (3 if products_faster else 0)
        module.attention(q[:1], q[:1], q[:1])  # another batch size: measured on its own
        assert race.call_count == 2
        with one_linear_kernel():
            module.attention(q, q, q)
        assert race.call_count == 2  # the AVX-512 rule: fused
        assert products.call_count == (4 if products_faster else 0)


@pytest.mark.parametrize("capability", ["AVX512", "AVX2"])
def test_reduced_precision_attention_with_gradients_takes_two_products(capability):
    """In bf16 and fp16 with gradients narrow heads over up to 256 tokens take the two products
    on any CPU (the fused kernel's reduced-precision backward is slow), with SDPA's values and
    gradients; without gradients, for wide heads and longer sequences the fused kernel."""
    from sparseformer.layers.attention import attention

    torch.manual_seed(0)
    reference = [
        torch.randn(2, 4, 100, 8, dtype=torch.float64, requires_grad=True) for _ in range(3)
    ]
    expected = torch.nn.functional.scaled_dot_product_attention(*reference)  # 100 tokens
    expected_grads = torch.autograd.grad(expected.square().sum(), reference)
    with mock.patch.object(torch.backends.cpu, "get_cpu_capability", return_value=capability):
        for dtype in (torch.bfloat16, torch.float16):
            q, k, v = (t.detach().to(dtype).requires_grad_() for t in reference)
            with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention") as fused:
                out = attention(q, k, v)
            assert fused.call_count == 0
            torch.testing.assert_close(out.double(), expected.detach(), rtol=0, atol=0.05)
            out.float().square().sum().backward()
            for t, grad in zip((q, k, v), expected_grads, strict=True):
                assert t.grad.dtype == dtype
                torch.testing.assert_close(t.grad.double(), grad, rtol=0.05, atol=0.05)
            with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention") as fused:
                with torch.no_grad():
                    attention(q, k, v)  # no gradients: the fused kernel
                wide = torch.randn(2, 2, 5, 32, dtype=dtype, requires_grad=True)
                attention(wide, wide, wide)  # 32-channel heads: the fused kernel
                long = torch.randn(1, 2, 257, 8, dtype=dtype, requires_grad=True)
                attention(long, long, long)  # over 256 tokens: the fused kernel
            assert fused.call_count == 3


def test_gather_counts_a_clips_pixels_and_takes_empty_batches():
    """In training a video map's size is T x H x W (4 x 16 x 16 gathers, 2 x 16 x 16 does not);
    an empty batch samples to an empty result."""
    from sparseformer.layers.sampling import _gather_applies

    points = torch.rand(1, 2, 3, 3, requires_grad=True)
    assert _gather_applies(torch.randn(1, 64, 4, 16, 16), points)
    assert not _gather_applies(torch.randn(1, 64, 2, 16, 16), points)
    feats = torch.randn(0, 64, 32, 32, requires_grad=True)
    out = sample_features(feats, torch.rand(0, 2, 3, 2, requires_grad=True))
    assert out.shape == (0, 2, 3, 64)


@pytest.mark.parametrize("rate, batch, seed", [(0.5, 16, 3), (0.9, 1, 0)])  # seed 0: none kept
def test_residual_drop_path_runs_only_the_kept_samples(rate, batch, seed):
    """The same draws, outputs and gradients as ``x + drop_path(branch(x))``; the branch
    sees the kept samples only, and when none is kept its parameters get zero gradients, as
    multiplied by zero (AdamW then still decays them, as it would)."""
    from sparseformer.layers import drop_path, residual_drop_path

    mlp = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)).double()
    seen = []
    mlp.register_forward_pre_hook(lambda m, args: seen.append(args[0].shape[0]))
    x = torch.randn(batch, 5, 8, dtype=torch.float64, requires_grad=True)
    results = []
    for fast in (False, True):
        mlp.zero_grad(set_to_none=True)
        x.grad = None
        torch.manual_seed(seed)
        if fast:
            out = residual_drop_path(x, mlp, rate, training=True)
        else:
            out = x + drop_path(mlp(x), rate, training=True)
        out.sin().sum().backward()
        results.append((out, x.grad, [p.grad for p in mlp.parameters()]))
    (ref, ref_x, ref_p), (got, got_x, got_p) = results
    torch.testing.assert_close(got, ref)
    torch.testing.assert_close(got_x, ref_x)
    for a, b in zip(got_p, ref_p):
        torch.testing.assert_close(a, b)
    kept = int((ref - x).abs().amax(dim=(1, 2)).gt(0).sum())  # samples the branch changed
    assert seen == [batch, kept] and (0 < kept < batch if batch > 1 else kept == 0)
    if kept == 0:  # zero gradients, not none: AdamW still updates them as it would
        assert all(g is not None and not g.any() for g in got_p)
    torch.manual_seed(3)
    assert torch.equal(residual_drop_path(x, mlp, rate, training=False), x + mlp(x))


def test_a_full_measurement_cache_keeps_the_kernels_it_measured():
    """Shapes first seen once the cache is full take the build's rule; a shape measured before
    keeps its kernel (a process must not switch kernels, and last bits, part way)."""
    import sparseformer.layers.attention as module

    q, other = torch.randn(3, 4, 7, 8), torch.randn(3, 4, 9, 8)
    full = {("another shape", i): False for i in range(module._MAX_CHOSEN - 1)}
    with (
        mock.patch.object(module, "_CHOSEN", full),
        mock.patch.object(torch.backends.cpu, "get_cpu_capability", return_value="AVX512"),
        mock.patch.object(module, "faster", return_value=1) as race,
        mock.patch.object(module, "_products", wraps=module._products) as products,
        torch.no_grad(),
    ):
        module.attention(q, q, q)  # measured: the products; the cache now full
        module.attention(q, q, q)
        module.attention(other, other, other)  # unmeasured: AVX-512's rule, fused
    assert race.call_count == 1 and products.call_count == 2


@pytest.mark.parametrize("grad", [False, True])
def test_cross_attention_takes_the_fused_kernel(grad):
    """Keys and values over another number of tokens than the queries (or another batch) are
    for the fused kernel: the two products reshape them by the queries' shape."""
    from sparseformer.layers.attention import attention

    q = torch.randn(2, 3, 5, 8, requires_grad=grad)
    for kv in (torch.randn(2, 3, 7, 8), torch.randn(1, 3, 5, 8)):
        with torch.set_grad_enabled(grad):
            expected = torch.nn.functional.scaled_dot_product_attention(q, kv, kv)
            torch.testing.assert_close(attention(q, kv, kv), expected)
