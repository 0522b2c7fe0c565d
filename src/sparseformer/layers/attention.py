"""Multi-head self-attention and MLP with timm's parameter names.

SparseFormer (Gao et al., ICLR 2024) mixes its N latent tokens with a standard transformer; the
official code used ``nn.MultiheadAttention`` (packed ``in_proj``), which the converter renames to
``qkv`` / ``proj``. Attention runs through ``scaled_dot_product_attention``, except on CPU
with narrow heads, which take two batched products in training and, where they are the
faster, in inference (see :func:`attention`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import _get_current_dispatch_mode

import sparseformer.layers.linear as linear_module
from sparseformer.layers.linear import faster, is_tracing, linear, measured_once

__all__ = ["Attention", "Mlp", "attention"]


class Attention(nn.Module):
    """Self-attention over tokens with a packed qkv projection.

    Args:
        dim: token width D.
        num_heads: heads; the head width is ``D / num_heads``.
    """

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, N, D) -> (B, N, D)``."""
        B, N, D = x.shape
        qkv = linear(x, self.qkv).reshape(B, N, 3, self.num_heads, D // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, N, 3, h, d) -> 3 x (B, h, N, d)
        x = attention(q, k, v)  # (B, h, N, d)
        return linear(x.transpose(1, 2).reshape(B, N, D), self.proj)  # (B, h, N, d) -> (B, N, D)


# Heads up to this wide, over up to this many tokens, may take two batched products on CPU
# (SparseFormer v1: 64 heads of 4 and 8 channels over 49 tokens)
_NARROW_HEAD = 16
_FEW_TOKENS = 64
# ... without gradients and unmeasured (a run's validation), on CPUs whose ATen kernels are
# these builds: faster on AVX2 (2-core AMD EPYC); on AVX-512 (2-core Xeon) the fused kernel
_NARROW_CAPABILITIES = frozenset({"AVX2"})


def _narrow_pays() -> bool:
    """Whether this CPU's build runs narrow heads faster as two batched products than fused,
    as measured on the CPUs of :data:`_NARROW_CAPABILITIES`."""
    return torch.backends.cpu.get_cpu_capability() in _NARROW_CAPABILITIES


# ... and in bf16 or fp16 training on every CPU, over up to this many tokens (the backward
# keeps B x h x N x N attention weights: 79 MB in bf16 for 32 heads over 196 tokens, batch 32)
_HALF_TRAINING_TOKENS = 256

_CHOSEN: dict[tuple, bool] = {}  # inference's shape -> whether the two products were faster
_MAX_CHOSEN = 256  # shapes measured at most; the next take the rule of the CPU's build


def _two_products(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether :func:`attention` takes the two batched products for these CPU inputs."""
    if q.shape[-1] > _NARROW_HEAD or not q.shape == k.shape == v.shape:  # self-attention's
        return False
    grad = _with_gradients(q, k, v)
    if grad and q.dtype in (torch.bfloat16, torch.float16):
        if q.shape[-2] <= _HALF_TRAINING_TOKENS:
            return True  # the fused kernel's reduced-precision backward is 2-7x slower
    if q.shape[-2] > _FEW_TOKENS:
        return False
    if grad:  # each CPU's training step measured faster or as fast; one kernel on resuming
        return True
    # inference inside one_linear_kernel (a run's validation) takes the rule of the CPU's
    # build, unmeasured: a resumed run scores as the run it continues
    if linear_module.kernel_setting() != "auto":
        return _narrow_pays()
    return _products_win(q, k, v)


def _products_win(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether the two products are the faster for this inference shape, measured on its
    first call (the CPU's build does not tell: on the 2-core AMD EPYC that reports AVX-512
    they took 7.1 ms where the fused kernel took 16.8, on the 2-core Xeon the fused one won).
    A shape first seen with :data:`_MAX_CHOSEN` measured takes the build's rule, unmeasured."""
    B, h, N, d = q.shape
    key = ((B * h).bit_length(), N, d, q.dtype, torch.get_num_threads())
    fused = lambda: F.scaled_dot_product_attention(q, k, v)  # noqa: E731
    race = lambda: faster(fused, lambda: _products(q, k, v)) == 1  # noqa: E731
    return measured_once(_CHOSEN, key, _MAX_CHOSEN, race, unmeasured=_narrow_pays)


def attention(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """``softmax(q k^T / sqrt(d)) v`` for ``(B, h, N, d)`` queries, keys and values.

    ``scaled_dot_product_attention``, but on CPUs, for self-attention with heads of at most 16
    channels over at most 64 tokens, two batched matrix products and a softmax (in training,
    and in inference where they are the faster):
    PyTorch's CPU kernel works head by head, which for SparseFormer-T's 64 heads of 4 and 8
    channels over 49 tokens is mostly overhead on some CPUs (2-core AMD EPYC, AVX2, 2 threads,
    batch 32, 8-channel heads: 16.0 -> 9.3 ms forward, 57 -> 26 ms forward and backward; the
    whole training step 3-9% faster). Over longer sequences the fused kernel wins (video: 196
    tokens, 36 against 46 ms forward), and on the 2-core Xeon's AVX-512 at any length
    (SparseFormer-T alternated in one process: the fused kernel 5% faster at batch 32 and
    batch 1, the training step the same), but not on an AMD EPYC that reports AVX-512 (8-channel
    heads, forward 16.8 against 7.1 ms; SparseFormer-T's training step 3202 against 3006 ms).
    Inference measures the two on each shape's first call and keeps the faster
    (:func:`_products_win`). With gradients narrow heads over few tokens take the two products
    on every CPU (each CPU's training step measured faster or as fast with them, though on the
    AMD EPYC with AVX-512 one 4-channel attention's forward and backward alone took 32.5
    against 30.2 ms), and one kernel, so that a resumed run
    computes as the run it continues; a run's validation takes the rule of the CPU's build
    (:func:`_narrow_pays`). In bf16 or fp16 with gradients, narrow heads take the two products
    over up to 256 tokens: the fused kernel's reduced-precision backward is slow (2-core Xeon,
    2 threads, batch 32, 64 heads, bf16, forward and backward: 8-channel heads over 49 tokens
    158 -> 14-21 ms, 4-channel 89-106 -> 13-20 ms, video's 196 tokens 434 -> 271-283 ms). The
    backward keeps the attention weights (B x h x N x N values) where the fused kernel
    recomputes them. Tracing, export and FLOP counting see the fused operator.
    """
    if not (
        q.device.type == "cpu"
        and not is_tracing()
        and _get_current_dispatch_mode() is None
        and _two_products(q, k, v)  # after the tracing checks: compilers need not read the CPU
    ):
        return F.scaled_dot_product_attention(q, k, v)
    return _products(q, k, v)


def _with_gradients(q: Tensor, k: Tensor, v: Tensor) -> bool:
    """Whether autograd records attention over these inputs (training's path, not inference's)."""
    return torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)


def _products(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """:func:`attention` by two batched products and a softmax."""
    B, h, N, d = q.shape
    q = q.reshape(B * h, N, d) * d**-0.5  # (B, h, N, d) -> (B*h, N, d)
    k, v = k.reshape(B * h, N, d), v.reshape(B * h, N, d)
    if _with_gradients(q, k, v):
        weights = torch.softmax(torch.bmm(q, k.transpose(1, 2)), dim=-1)  # (B*h, N, N)
        return torch.bmm(weights, v).view(B, h, N, d)
    # Without gradients transposed throughout: the scores k q^T (a query's down a column), the
    # softmax down the columns, then v^T weights^T, whose output has d-wide rows, not d-wide
    # columns (MKL's batched kernel ran those at half the speed), with neither product reading
    # the weights transposed; the output projection reads the result as (B, N, h*d) without a
    # copy of its own. (Training keeps the first order: its backward would get the weights'
    # gradient transposed, and the softmax's backward copy it.)
    scores_t = torch.bmm(k, q.transpose(1, 2))  # (B*h, N keys, N queries)
    weights_t = torch.softmax(scores_t, dim=1, out=scores_t)
    out = torch.bmm(v.transpose(1, 2), weights_t)  # (B*h, d, N)
    return out.view(B, h, d, N).transpose(2, 3)  # (B*h, d, N) -> (B, h, N, d), a view


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))`` with hidden width ``hidden_dim``."""

    def __init__(self, dim: int, hidden_dim: int, activation: str = "gelu") -> None:
        super().__init__()
        self.activation = activation
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        """``(B, N, D) -> (B, N, D)``."""
        if self.activation == "gelu":
            x = linear(x, self.fc1, gelu=True)
        else:
            x = linear(x, self.fc1)
            x = x * (1.702 * x).sigmoid()
        return linear(x, self.fc2)
