"""CPU training's narrow-head attention: autograd's product order against a transposed one.

    python scripts/transposed_attention_ab.py [--model sparseformer_v1_tiny] [--rounds 8]
    python scripts/transposed_attention_ab.py --one    # one attention's forward and backward

In float training, heads of at most 16 channels over at most 64 tokens take two batched
products and a softmax (``sparseformer.layers.attention``), recorded op by op: four of the
six products of forward and backward have d-wide output rows (``(N, N) x (N, d)``), which
MKL's batched kernel runs slowly. ``_TransposedAttention`` below (tried, not kept: the
training step was no faster) makes all six with N-wide rows, the scores, weights and
gradients transposed. This times the two alternated in one process: one attention at
SparseFormer-T's shapes (batch 32, 64 heads of 8 and of 4 channels over 49 tokens) with
``--one``, else the whole training step (forward, backward, the trainer's AdamW).
"""

from __future__ import annotations

import contextlib
import time
from unittest import mock

import torch
from alternated import alternate, start, step_arguments, summary, training_step
from torch import Tensor

import sparseformer.layers.attention as attention_module
from sparseformer import create_model


class _TransposedAttention(torch.autograd.Function):
    """``softmax(q k^T) v`` for ``(G, N, d)`` inputs (``q`` scaled already), every product's
    output with N-wide rows: the scores and weights as ``(G, N keys, N queries)``, the output
    and the input gradients as ``(G, d, N)``, returned as transposed views."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor) -> Tensor:  # type: ignore[override]
        scores_t = torch.bmm(k, q.transpose(1, 2))  # (G, N keys, N queries)
        weights_t = torch.softmax(scores_t, dim=1, out=scores_t)
        out_t = torch.bmm(v.transpose(1, 2), weights_t)  # (G, d, Nk) x (G, Nk, Nq)
        ctx.save_for_backward(q, k, v, weights_t)
        return out_t.transpose(1, 2)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        q, k, v, weights_t = ctx.saved_tensors
        grad_t = grad.transpose(1, 2)  # (G, d, Nq)
        grad_v = torch.bmm(grad_t, weights_t.transpose(1, 2))  # (G, d, Nk)
        grad_weights_t = torch.bmm(v, grad_t)  # (G, Nk, Nq)
        grad_scores_t = torch.ops.aten._softmax_backward_data(
            grad_weights_t, weights_t, 1, weights_t.dtype
        )
        grad_q = torch.bmm(k.transpose(1, 2), grad_scores_t)  # (G, d, Nq)
        grad_k = torch.bmm(q.transpose(1, 2), grad_scores_t.transpose(1, 2))  # (G, d, Nk)
        return grad_q.transpose(1, 2), grad_k.transpose(1, 2), grad_v.transpose(1, 2)


_library_products = attention_module._products


def _transposed_products(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
    """The library's ``_products``, with gradients by ``_TransposedAttention``."""
    if not (torch.is_grad_enabled() and q.requires_grad):
        return _library_products(q, k, v)
    B, h, N, d = q.shape
    q = q.reshape(B * h, N, d) * d**-0.5
    k, v = k.reshape(B * h, N, d), v.reshape(B * h, N, d)
    return _TransposedAttention.apply(q, k, v).view(B, h, N, d)


WAYS = {
    "autograd order": contextlib.nullcontext,
    "transposed": lambda: mock.patch.object(attention_module, "_products", _transposed_products),
}


def one_attention(rounds: int) -> None:
    for d in (8, 4):
        qkv = torch.randn(32, 49, 3, 64, d, requires_grad=True)  # (B, N, 3, heads, d)
        grad = torch.randn(32, 64, 49, d)

        def call(qkv=qkv, grad=grad):
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # as Attention.forward makes them
            attention_module.attention(q, k, v).backward(grad)
            qkv.grad = None

        times = alternate(WAYS, lambda call=call: [call() for _ in range(5)], rounds)
        print(summary(times, f"{d}-channel heads, 5 forward and backward passes"))


def main() -> None:
    parser = step_arguments(__doc__)
    parser.add_argument("--one", action="store_true", help="time one attention, not a step")
    args = start(parser)
    print(f"{torch.backends.cpu.get_cpu_capability()}, {args.threads} threads, {time.ctime()}")
    if args.one:
        one_attention(args.rounds)
        return
    step = training_step(create_model(args.model), args.batch_size)
    print(summary(alternate(WAYS, step, args.rounds, args.calls)))


if __name__ == "__main__":
    main()
