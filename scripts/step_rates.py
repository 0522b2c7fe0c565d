"""Where a training step's matrix products lose time: each product's shape, its rate inside
one profiled step (``torch.profiler``) and the rate of a plain ``mm`` or ``bmm`` of that shape
alone, called again and again on contiguous operands that stay in cache.

    python scripts/step_rates.py [--model sparseformer_v1_tiny] [--top 15] [--threads 2]

The gap between the two columns is what the step's memory traffic costs the products (their
operands come from memory there); the product's own kernel is the ceiling of the second.
"""

from __future__ import annotations

import argparse
import math
import statistics

import torch
from alternated import training_step
from torch.profiler import profile

from sparseformer import create_model
from sparseformer.bench.timing import timed

# operator -> which of its inputs are the two factors (oneDNN's fused linear: the input and
# the weight, (out, in), timed alone as its transpose)
_PRODUCTS = {
    "aten::mm": (0, 1),
    "aten::addmm": (1, 2),
    "aten::addmm_": (1, 2),
    "aten::bmm": (0, 1),
    "aten::baddbmm": (1, 2),
    "mkldnn::_linear_pointwise": (0, 1),
}


def _factors(key: str, shapes: list) -> tuple[list[int], list[int]]:
    """The product's two factors as ``a @ b`` shapes, ``(m, k) x (k, n)`` or batched."""
    i, j = _PRODUCTS[key]
    a, b = list(shapes[i]), list(shapes[j])
    if key == "mkldnn::_linear_pointwise":  # (..., in) x (out, in)
        return [math.prod(a[:-1]), a[-1]], b[::-1]
    return a, b


def _flops(a: list[int], b: list[int]) -> int:
    batch = a[0] if len(a) == 3 else 1
    return 2 * batch * a[-2] * a[-1] * b[-1]


def _alone_ms(a: list[int], b: list[int]) -> float:
    """Milliseconds of one ``a @ b`` product alone: after a warm-up call, the median of its
    calls over a tenth of a second (``bench.timing.timed``)."""
    x, y = torch.randn(a), torch.randn(b)
    product = torch.bmm if len(a) == 3 else torch.mm
    product(x, y)
    return statistics.median(timed(lambda: product(x, y), "cpu", 0.1)) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sparseformer_v1_tiny")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    step = training_step(create_model(args.model), args.batch_size)
    for _ in range(3):
        step()
    with profile(record_shapes=True) as prof:
        step()
    rows, step_ms = [], 0.0
    for event in prof.key_averages(group_by_input_shape=True):
        step_ms += event.self_cpu_time_total / 1e3
        if event.key in _PRODUCTS:
            a, b = _factors(event.key, event.input_shapes)
            ms = event.self_cpu_time_total / 1e3
            rows.append((ms, event.key, a, b, event.count, _flops(a, b)))
    rows.sort(key=lambda row: -row[0])
    total_ms = sum(row[0] for row in rows)
    total_gflop = sum(row[5] * row[4] for row in rows) / 1e9
    print(f"profiled step: {step_ms:.0f} ms of operator time; matrix products {total_ms:.0f} ms,")
    print(f"{total_gflop:.1f} GFLOP, {total_gflop / total_ms * 1e3:.1f} GFLOP/s on average")
    print("| ms in step | calls | operator | shapes | GFLOP/s in step | GFLOP/s alone |")
    print("|---|---|---|---|---|---|")
    for ms, key, a, b, count, flops in rows[: args.top]:
        in_step = flops * count / ms / 1e6
        alone = flops / _alone_ms(a, b) / 1e6
        print(f"| {ms:.1f} | {count} | {key} | {a} x {b} | {in_step:.0f} | {alone:.0f} |")


if __name__ == "__main__":
    main()
