"""The kernels one process's per-shape races chose, and its batch-1 latency with them.

    for i in 1 2 3 4 5; do python scripts/race_choices.py; done   # do processes choose alike?

CPU inference races oneDNN's fused linear kernel against ``F.linear`` on each shape's first
call (``sparseformer.layers.linear.faster``) and keeps the winner for the process. This runs
SparseFormer-T at batch 1 inside ``packed_weights()``, prints the median of 30 timed calls and
one letter per raced linear shape (sorted): ``F`` the fused kernel, ``p`` ``F.linear``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import sparseformer
import sparseformer.layers.linear as linear_module


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sparseformer_v1_tiny")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = sparseformer.create_model(args.model).eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.inference_mode(), sparseformer.packed_weights():
        model(x)  # the races
        model(x)
        times = []
        for _ in range(30):
            start = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - start) * 1e3)
    choices = "".join("F" if fused else "p" for _, fused in sorted(linear_module._CHOSEN.items()))
    print(f"batch 1: {statistics.median(times):.1f} ms median; choices {choices}")


if __name__ == "__main__":
    main()
