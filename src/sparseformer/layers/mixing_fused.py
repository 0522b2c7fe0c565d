"""Adaptive mixing's decode, forward and backward, a few tokens at a time (CPU training).

SparseFormer (Gao et al., ICLR 2024), Sec. 3.3. Under plain autograd, :class:`AdaptiveMixing`
writes every token's generated ``C x C`` and ``P x P`` matrices (66 MB per batch of 32 for
SparseFormer-T) to memory, keeps them and both pre-activations for backward, and in backward
writes their gradient, concatenates it (another 66 MB) and reads it twice for the generator's
two matrix products. Here the matrices are generated per chunk of tokens, used at once while in
cache, and generated again in backward, where their gradient is made, used (for the generator's
input and weight gradients) and dropped chunk by chunk: nothing of size ``tokens x (C*C + Q*P)``
is ever stored. The slow, obviously correct reference is ``AdaptiveMixing._decode`` under
autograd; ``tests/test_fast_backward.py`` compares the two in float64 with ``gradcheck`` and
value for value, and in float32, where the generator's products take oneDNN's fused kernel from
a weight laid out once per call (:func:`~sparseformer.layers.linear.pack_weight`; float64 takes
``addmm``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable
from torch.utils._python_dispatch import _get_current_dispatch_mode

from sparseformer.layers.linear import is_tracing, pack_weight, packed_linear

__all__ = ["fused_mix", "fused_mix_applies", "tokens_per_chunk"]

# Floats per chunk of generated matrices (and again of their gradient): 98 tokens of
# SparseFormer-T (C*C + Q*P = 10,512 floats each, 4 MB). Narrower models take more tokens per
# chunk: each chunk costs a dozen operator calls whatever its size. CPU inference
# (AdaptiveMixing.forward) chunks whole images by the same budget.
_CHUNK_FLOATS = 98 * 10_512
# CPU training decodes here (no generated matrices stored, generated again in
# backward) when each token's matrices hold at least this many floats: SparseFormer v1's 10,512
# (66 MB per layer not kept for SparseFormer-T's batch of 32, the same time). Under it autograd
# is faster and the matrices are small to keep: the demo's micro model, 1,280 floats per token,
# trains 7% faster (2-core Xeon, 2 threads, alternated in one process: 183.7 -> 170.7 ms).
_FUSED_MIN_FLOATS = 4096


def tokens_per_chunk(floats_per_token: int) -> int:
    """Tokens whose generated matrices (``floats_per_token`` each) fit one chunk, at least one."""
    return max(1, _CHUNK_FLOATS // max(1, floats_per_token))


def _act(x: Tensor, activation: str) -> Tensor:
    return F.gelu(x) if activation == "gelu" else x * torch.sigmoid(1.702 * x)


def _act_grad(grad: Tensor, x: Tensor, activation: str) -> Tensor:
    """``grad * act'(x)``."""
    if activation == "gelu":
        return torch.ops.aten.gelu_backward(grad, x)
    s = torch.sigmoid(1.702 * x)
    return grad * (s + 1.702 * x * s * (1 - s))


def fused_mix_applies(tokens: Tensor, sampled: Tensor, weight: Tensor) -> bool:
    """Whether :func:`fused_mix` takes over from plain autograd: CPU training in float32 or
    float64 (gradcheck) of a generator of at least ``_FUSED_MIN_FLOATS`` outputs per token,
    outside tracing, autocast and dispatch modes (FLOP counting sees the plain ops)."""
    return (
        weight.shape[0] >= _FUSED_MIN_FLOATS  # C*C + Q*P: each token's generated matrices
        and torch.is_grad_enabled()
        and tokens.device.type == "cpu"
        and tokens.dtype == sampled.dtype == weight.dtype
        and tokens.dtype in (torch.float32, torch.float64)
        and (tokens.requires_grad or sampled.requires_grad or weight.requires_grad)
        and not torch.is_autocast_enabled("cpu")
        and not is_tracing()
        and _get_current_dispatch_mode() is None
    )


class _FusedMix(torch.autograd.Function):
    """``(hidden, generator weight/bias, sampled, bc, bp) -> act(Mp @ act(F @ Mc + bc) + bp)``.

    Shapes: hidden ``(M, h)``, weight ``(C*C + Q*P, h)``, bias ``(C*C + Q*P,)``, sampled
    ``(M, P, C)``, bc ``(C,)`` and bp ``(Q,)`` or both ``None``; output ``(M, Q, C)``.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, sampled, bc, bp, dims, activation, inner, chunk):  # type: ignore[override]
        C, P, Q = dims
        M = hidden.shape[0]
        out = sampled.new_empty(M, Q, C)
        packed = pack_weight(weight)  # once per call: the weight is read once per chunk
        for s in range(0, M, chunk):
            e = min(s + chunk, M)
            mc, mp = _generate(hidden[s:e], weight, packed, bias, C, P, Q)
            *_, x2 = _mix(sampled[s:e], mc, mp, bc, bp, activation, inner)
            out[s:e] = _act(x2, activation)
        ctx.save_for_backward(hidden, weight, bias, sampled, bc, bp)
        ctx.config = (dims, activation, inner, chunk)
        ctx.packed = packed  # backward generates the same matrices again, by the same kernel
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, weight, bias, sampled, bc, bp = ctx.saved_tensors
        (C, P, Q), activation, inner, chunk = ctx.config
        M = hidden.shape[0]
        grad_out = grad_out.contiguous()
        grad_hidden = torch.empty_like(hidden)
        grad_sampled = torch.empty_like(sampled)
        grad_weight = torch.zeros_like(weight)
        grad_params_sum = torch.zeros_like(bias)
        grad_bc = torch.zeros_like(bc) if bc is not None else None
        grad_bp = torch.zeros_like(bp) if bp is not None else None
        for s in range(0, M, chunk):
            e = min(s + chunk, M)
            h = hidden[s:e]
            x = sampled[s:e]
            mc, mp = _generate(h, weight, ctx.packed, bias, C, P, Q)
            x1, a1, x2 = _mix(x, mc, mp, bc, bp, activation, inner)
            g2 = _act_grad(grad_out[s:e], x2, activation)  # (m, Q, C)
            grad_mp = torch.bmm(g2, a1.transpose(1, 2))  # (m, Q, C) x (m, C, P) -> (m, Q, P)
            g1 = torch.bmm(mp.transpose(1, 2), g2)  # (m, P, Q) x (m, Q, C) -> (m, P, C)
            if inner:
                g1 = _act_grad(g1, x1, activation)
            grad_mc = torch.bmm(x.transpose(1, 2), g1)  # (m, C, P) x (m, P, C) -> (m, C, C)
            torch.bmm(g1, mc.transpose(1, 2), out=grad_sampled[s:e])  # (m, P, C) x (m, C, C)
            if bc is not None:
                grad_bc += g1.sum((0, 1))
                grad_bp += g2.sum((0, 2))
            # (m, C, C), (m, Q, P) -> (m, C*C + Q*P), laid out as the generator's output
            grad_params = torch.cat([grad_mc.flatten(1), grad_mp.flatten(1)], dim=1)
            torch.mm(grad_params, weight, out=grad_hidden[s:e])  # (m, K) x (K, h) -> (m, h)
            grad_weight.addmm_(grad_params.t(), h)  # (K, m) x (m, h) -> (K, h)
            grad_params_sum += grad_params.sum(0)
        return (
            grad_hidden,
            grad_weight,
            grad_params_sum,
            grad_sampled,
            grad_bc,
            grad_bp,
            *[None] * 4,
        )


def _generate(h: Tensor, weight: Tensor, packed: Tensor | None, bias: Tensor, C, P, Q):
    """The chunk's matrices: ``(m, h) -> Mc (m, C_in, C_out), Mp (m, Q_out, P_in)``, from
    the weight's packed copy (:func:`pack_weight`) where there is one."""
    m = h.shape[0]
    # One kernel by a fixed rule (float32 packed, else addmm), not the faster per shape as in
    # inference: a resumed run must compute as the run it continues. oneDNN's fused kernel
    # from the packed weight, laid out once per call of the mixing, not per chunk: on the
    # 2-core AMD EPYC (AVX-512), SparseFormer-T's (98, 64) x (64, 10512), 0.82 ms against
    # addmm's 1.44 (unpacked, oneDNN lays the weight out per chunk: 1.20 ms).
    if packed is not None:
        params = packed_linear(h, packed, bias)  # (m, h) -> (m, C*C + Q*P)
    else:
        params = torch.addmm(bias, h, weight.t())
    mc, mp = params.split([C * C, Q * P], dim=1)
    return mc.reshape(m, C, C), mp.reshape(m, Q, P)  # rows of params -> per-token matrices


def _mix(x: Tensor, mc: Tensor, mp: Tensor, bc, bp, activation: str, inner: bool):
    """Pre-activations and the inner activation: ``x1 = x @ Mc + bc``, ``a1 = act(x1)``,
    ``x2 = Mp @ a1 + bp``; ``(m, P, C) -> (m, P, C), (m, P, C), (m, Q, C)``."""
    if bc is None:
        x1 = torch.bmm(x, mc)
    else:
        x1 = torch.baddbmm(bc, x, mc)
    a1 = _act(x1, activation) if inner else x1
    if bp is None:
        x2 = torch.bmm(mp, a1)
    else:
        x2 = torch.baddbmm(bp.unsqueeze(-1), mp, a1)  # (Q,) -> (Q, 1), one per output point
    return x1, a1, x2


def fused_mix(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor,
    sampled: Tensor,
    channel_bias: Tensor | None,
    point_bias: Tensor | None,
    dims: tuple[int, int, int],
    activation: str,
    inner_activation: bool,
    chunk: int | None = None,
) -> Tensor:
    """Decode with the generator ``(weight, bias)`` applied to ``hidden``, chunk by chunk.

    Args:
        hidden: ``(M, h)`` the generator's input (``reduce(norm(tokens))``, M = B*N).
        weight, bias: the generator, ``(C*C + Q*P, h)`` and ``(C*C + Q*P,)``.
        sampled: ``(M, P, C)``.
        channel_bias, point_bias: ``(C,)`` and ``(Q,)``, or both ``None``.
        dims: ``(C, P, Q)``.
        activation: ``"gelu"`` or ``"quick_gelu"``.
        inner_activation: apply the activation after the channel mixing too.
        chunk: tokens per chunk (``None``: as many as fit ``_CHUNK_FLOATS``).

    Returns:
        ``(M, Q, C)`` the decoded points, before the output projection.
    """
    sampled = sampled.contiguous()
    if chunk is None:
        C, P, Q = dims
        chunk = tokens_per_chunk(C * C + Q * P)
    return _FusedMix.apply(
        hidden,
        weight,
        bias,
        sampled,
        channel_bias,
        point_bias,
        dims,
        activation,
        inner_activation,
        chunk,
    )
