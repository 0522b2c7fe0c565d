"""CPU inference's linear layers: oneDNN's fused kernel always, or the faster kernel per shape.

    python scripts/linear_ab.py                       # SparseFormer-T, batch 32 and 1, fp32
    python scripts/linear_ab.py --model sparseformer_v1_small --threads 1

``sparseformer.layers.linear`` takes oneDNN's ``_linear_pointwise`` (bias and GELU in the
product's epilogue) or ``F.linear`` and ``gelu``, whichever its first call of a shape measured
faster (``FUSED_LINEAR = "auto"``); ``"always"`` is the fused kernel on every shape, as before
the race. This times the model both ways, alternated in one process (``alternated.alternate``:
a warm-up call, then the median of a few calls per way and round), and prints the kernel each
shape took.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
from collections.abc import Iterator

import torch
from alternated import alternate, summary

import sparseformer.layers.linear as linear_module
from sparseformer import create_model


@contextlib.contextmanager
def kernels(setting: str) -> Iterator[None]:
    """``FUSED_LINEAR`` set to ``setting`` inside the block."""
    before, linear_module.FUSED_LINEAR = linear_module.FUSED_LINEAR, setting
    try:
        yield
    finally:
        linear_module.FUSED_LINEAR = before


WAYS = {"fused always": lambda: kernels("always"), "faster per shape": lambda: kernels("auto")}


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
            times = alternate(WAYS, lambda x=x: model(x), args.rounds, calls)
            print(summary(times, f"inference, batch {batch}"))
    for key, fused in sorted(linear_module._CHOSEN.items()):
        bits, out, inp, gelu = key[:4]
        rows = f"{2 ** (bits - 1)}-{2**bits - 1}"
        print(f"  ({rows} rows, {inp}) x ({inp}, {out}){' + GELU' if gelu else ''}: "
              f"{'fused' if fused else 'F.linear'}")  # fmt: skip


if __name__ == "__main__":
    main()
