"""CPU training's fused mixing: its matrices made again in backward, or kept from forward.

    python scripts/mixing_keep_ab.py                          # SparseFormer-T, batch 32, fp32
    python scripts/mixing_keep_ab.py --model sparseformer_v1_small --rounds 4

``sparseformer.layers.mixing_fused`` generates each chunk of tokens' matrices in forward, uses
them at once and generates them again in backward, keeping nothing of size ``tokens x (C*C +
Q*P)``. The alternative timed here keeps each chunk's generated matrices and pre-activations
from forward for backward instead (SparseFormer-T: 8 MB a chunk, 16 chunks a layer, 5 layers).
The model's whole training step (forward, cross-entropy, backward, the trainer's AdamW) is timed
both ways, alternated in one process (after two warm-up steps each, one more and one timed step
per way and round).
"""

from __future__ import annotations

import argparse
from unittest import mock

import torch
from alternated import alternate, summary, training_step
from torch.autograd.function import once_differentiable

import sparseformer.layers.mixing_fused as fused
from sparseformer import create_model


class _KeptMix(torch.autograd.Function):
    """``fused._FusedMix`` with each chunk's matrices and pre-activations kept for backward."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, sampled, bc, bp, dims, activation, inner, chunk):  # type: ignore[override]
        C, P, Q = dims
        out, kept = sampled.new_empty(hidden.shape[0], Q, C), []
        packed = fused.pack_weight(weight)
        for s in range(0, hidden.shape[0], chunk):
            mc, mp = fused._generate(hidden[s : s + chunk], weight, packed, bias, C, P, Q)
            x1, a1, x2 = fused._mix(sampled[s : s + chunk], mc, mp, bc, bp, activation, inner)
            out[s : s + chunk] = fused._act(x2, activation)
            kept.append((mc, mp, x1, a1, x2))
        ctx.save_for_backward(hidden, weight, bias, sampled, bc, bp)
        ctx.kept, ctx.config = kept, (activation, inner, chunk)
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):  # type: ignore[override]
        hidden, weight, bias, sampled, bc, bp = ctx.saved_tensors
        activation, inner, chunk = ctx.config
        grad_out = grad_out.contiguous()
        grads = [torch.empty_like(hidden), torch.zeros_like(weight), torch.zeros_like(bias)]
        grad_sampled = torch.empty_like(sampled)
        grad_bc = torch.zeros_like(bc) if bc is not None else None
        grad_bp = torch.zeros_like(bp) if bp is not None else None
        for i, s in enumerate(range(0, hidden.shape[0], chunk)):
            e = s + chunk
            mc, mp, x1, a1, x2 = ctx.kept[i]
            g2 = fused._act_grad(grad_out[s:e], x2, activation)
            grad_mp = torch.bmm(g2, a1.transpose(1, 2))
            g1 = torch.bmm(mp.transpose(1, 2), g2)
            if inner:
                g1 = fused._act_grad(g1, x1, activation)
            grad_mc = torch.bmm(sampled[s:e].transpose(1, 2), g1)
            torch.bmm(g1, mc.transpose(1, 2), out=grad_sampled[s:e])
            if bc is not None:
                grad_bc += g1.sum((0, 1))
                grad_bp += g2.sum((0, 2))
            params = torch.cat([grad_mc.flatten(1), grad_mp.flatten(1)], dim=1)
            torch.mm(params, weight, out=grads[0][s:e])
            grads[1].addmm_(params.t(), hidden[s:e])
            grads[2] += params.sum(0)
        ctx.kept = None
        return (*grads, grad_sampled, grad_bc, grad_bp, None, None, None, None)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sparseformer_v1_tiny")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = create_model(args.model)
    step = training_step(model, args.batch_size)
    print(f"{args.model}, batch {args.batch_size}, threads {args.threads}, torch "
          f"{torch.__version__} ({torch.backends.cpu.get_cpu_capability()})")  # fmt: skip
    ways = {
        name: lambda function=function: mock.patch.object(fused, "_FusedMix", function)
        for name, function in (("made again", fused._FusedMix), ("kept", _KeptMix))
    }
    print(summary(alternate(ways, step, args.rounds)))


if __name__ == "__main__":
    main()
