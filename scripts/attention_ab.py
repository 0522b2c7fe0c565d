"""Narrow-head attention on the CPU: PyTorch's fused kernel against two batched products.

    python scripts/attention_ab.py                         # one attention, fp32 and bf16
    python scripts/attention_ab.py --dtype bf16 --step     # and a bf16 training step, both ways

``sparseformer.layers.attention.attention`` chooses between ``scaled_dot_product_attention``
and two batched products with a softmax. The first part times that function with its choice
forced each way, at SparseFormer-T's shapes (batch 32: 8-channel heads over 49 tokens,
4-channel heads, and the video model's 196 tokens), forward alone and forward with backward,
median of 5 after warm-up.
With ``--step`` it then times SparseFormer-T's whole training step (forward, cross-entropy,
backward, the trainer's AdamW; autocast in bf16) with every attention fused, then as the
library chooses, alternated in one process.
"""

from __future__ import annotations

import argparse
import statistics
import time
from unittest import mock

import torch
import torch.nn.functional as F

import sparseformer.layers.attention as attention_module
from sparseformer.bench.throughput import build_model
from sparseformer.engine.optim import build_optimizer
from sparseformer.layers.attention import attention

SHAPES = {  # (batch, heads, tokens, head width): SparseFormer-T's cortex (512 wide), its
    # focusing units (256 wide) and the video model's cortex over 196 tokens
    "8-channel heads, 49 tokens": (32, 64, 49, 8),
    "4-channel heads, 49 tokens": (32, 64, 49, 4),
    "8-channel heads, 196 tokens": (32, 64, 196, 8),
}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# attention's choice, forced one way: the library's own two paths are what is timed
RULES = {"fused": lambda q, k, v: False, "two products": lambda q, k, v: True}


def median_ms(fn, repeats: int = 5) -> float:
    fn(), fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def one_attention(shape, dtype) -> None:
    q, k, v = (torch.randn(shape, dtype=dtype) for _ in range(3))
    for backward in (False, True):
        row = []
        for name, rule in RULES.items():
            with mock.patch.object(attention_module, "_two_products", rule):
                if backward:
                    leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                    ms = median_ms(lambda leaves=leaves: attention(*leaves).sum().backward())
                else:
                    with torch.no_grad():
                        ms = median_ms(lambda: attention(q, k, v))
            row.append(f"{name} {ms:.2f} ms")
        print(f"  {'forward and backward' if backward else 'forward'}: {', '.join(row)}")


def training_step(dtype, rounds: int) -> None:
    model = build_model("sparseformer_v1_tiny").train()
    optimizer = build_optimizer(model, lr=1e-5, weight_decay=0.05)
    x, y = torch.randn(32, 3, 224, 224), torch.randint(0, 1000, (32,))

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(model(x), y)
        loss.backward()
        optimizer.step()

    rules = {"fused": RULES["fused"], "chosen": attention_module._two_products}
    times = {name: [] for name in rules}
    for r in range(rounds):
        for name, rule in rules.items():
            with mock.patch.object(attention_module, "_two_products", rule):
                step()  # warm-up of this path
                start = time.perf_counter()
                step()
                times[name].append((time.perf_counter() - start) * 1e3)
        print(
            f"  round {r}: fused {times['fused'][-1]:.0f} ms, chosen {times['chosen'][-1]:.0f} ms"
        )
    fused, chosen = (statistics.median(times[n]) for n in rules)
    ratios = [f / c for f, c in zip(times["fused"], times["chosen"], strict=True)]
    print(
        f"training step median: fused {fused:.0f} ms, as chosen {chosen:.0f} ms "
        f"({min(ratios):.2f}-{max(ratios):.2f}x per round)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dtype", choices=DTYPES, nargs="+", default=list(DTYPES))
    p.add_argument("--step", action="store_true", help="also time SparseFormer-T's training step")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"{torch.backends.cpu.get_cpu_capability()}, {args.threads} threads")
    for dtype in args.dtype:
        for label, shape in SHAPES.items():
            print(f"{dtype}, batch {shape[0]}, {label}:")
            one_attention(shape, DTYPES[dtype])
        if args.step:
            print(f"SparseFormer-T, {dtype}, batch 32:")
            training_step(DTYPES[dtype], args.rounds)


if __name__ == "__main__":
    main()
