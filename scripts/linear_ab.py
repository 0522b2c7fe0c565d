"""CPU inference's linear layers: oneDNN's fused kernel always, or the faster kernel per shape.

    python scripts/linear_ab.py                       # SparseFormer-T, batch 32 and 1, fp32
    python scripts/linear_ab.py --model sparseformer_v1_small --threads 1

``sparseformer.layers.linear`` takes oneDNN's ``_linear_pointwise`` (bias and GELU in the
product's epilogue) or ``F.linear`` and ``gelu``, whichever its first call of a shape measured
faster (``FUSED_LINEAR = "auto"``); ``"always"`` is the fused kernel on every shape, as before
the race. This times the model both ways, alternated in one process (a warm-up call, then the
median of a few calls per way and round), and prints the kernel each shape took.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

import sparseformer.layers.linear as linear_module
from sparseformer import create_model

WAYS = ("always", "auto")


def timed(call, calls: int) -> float:
    call()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def compare(name: str, call, calls: int, rounds: int) -> None:
    ms: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(rounds):
        for way in WAYS:
            linear_module.FUSED_LINEAR = way
            ms[way].append(timed(call, calls))
    ratios = [a / b for a, b in zip(ms["always"], ms["auto"], strict=True)]
    print(
        f"{name}: fused always {statistics.median(ms['always']):.1f} ms, faster per shape "
        f"{statistics.median(ms['auto']):.1f} ms (median of {rounds} rounds; "
        f"{min(ratios):.2f}-{max(ratios):.2f}x per round)"
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sparseformer_v1_tiny")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = create_model(args.model).eval()
    print(
        f"{args.model}, {args.img_size} px, threads: {args.threads}, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()} ({torch.backends.cpu.get_cpu_capability()})"
    )
    for batch, calls in ((32, 1), (1, 15)):
        x = torch.randn(batch, 3, args.img_size, args.img_size)
        with torch.inference_mode():
            compare(f"inference, batch {batch}", lambda x=x: model(x), calls, args.rounds)
    for key, fused in sorted(linear_module._CHOSEN.items()):
        bits, out, inp, gelu = key[:4]
        rows = f"{2 ** (bits - 1)}-{2**bits - 1}"
        print(f"  ({rows} rows, {inp}) x ({inp}, {out}){' + GELU' if gelu else ''}: "
              f"{'fused' if fused else 'F.linear'}")  # fmt: skip


if __name__ == "__main__":
    main()
