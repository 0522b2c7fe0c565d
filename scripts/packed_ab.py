"""CPU inference's fused linear kernel: each weight laid out for it on every call, or packed once.

    python scripts/packed_ab.py                       # SparseFormer-T, batch 32 and 1, fp32
    python scripts/packed_ab.py --model sparseformer_v1_small --threads 1

``sparseformer.layers.linear``'s fused kernel (oneDNN's ``_linear_pointwise``) reorders a
plain weight into its blocked layout on every call; inside ``packed_weights()`` it reads a
copy made on the weight's first call. This times the model both ways, alternated in one
process (``alternated.alternate``: per way and round, the block entered, a warm-up call that
packs, then the median of a few calls), and checks that the outputs are the same.
"""

from __future__ import annotations

import argparse
import contextlib
import platform

import torch
from alternated import alternate, summary

from sparseformer import create_model
from sparseformer.layers.linear import packed_weights

WAYS = {"laid out per call": contextlib.nullcontext, "packed once": packed_weights}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sparseformer_v1_tiny")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--rounds", type=int, default=8)
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
            plain = model(x)
            with packed_weights():
                packed = model(x)
            print(f"batch {batch}: largest difference {(plain - packed).abs().max().item():.1e}")
            times = alternate(WAYS, lambda x=x: model(x), args.rounds, calls)
            print(summary(times, f"inference, batch {batch}"))


if __name__ == "__main__":
    main()
