"""Stochastic depth in CPU training: branches run on every sample, or on the kept ones only.

    python scripts/drop_path_ab.py                          # SparseFormer-T, batch 32, fp32
    python scripts/drop_path_ab.py --model sparseformer_v1_micro --img-size 48 --batch-size 128

``sparseformer.layers.residual_drop_path`` runs an attention or MLP branch on the samples
stochastic depth keeps, where the plain ``x + drop_path(branch(x))`` computes every sample's
branch and multiplies the dropped ones by zero. This times the model's whole training step
(forward, cross-entropy, backward, the trainer's AdamW) both ways, alternated in one process
(after two warm-up steps each, one more and one timed step per path and round), at the
model's registered drop-path rate unless ``--drop-path`` is given.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from unittest import mock

import torch
import torch.nn.functional as F

import sparseformer.layers.drop as drop_module
from sparseformer import create_model
from sparseformer.engine.optim import build_optimizer


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sparseformer_v1_tiny")
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--drop-path", type=float, default=None, help="default: the model's")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    extra = {} if args.drop_path is None else {"drop_path_rate": args.drop_path}
    model = create_model(args.model, **extra).train()
    optimizer = build_optimizer(model, lr=1e-5, weight_decay=0.05)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    y = torch.randint(0, model.num_classes, (args.batch_size,))
    print(
        f"{args.model}, batch {args.batch_size}, {args.img_size} px, drop-path rate "
        f"{model.config.drop_path_rate}, threads: {args.threads}, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()} ({torch.backends.cpu.get_cpu_capability()})"
    )

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    # the plain path, forced: the function's own fallback, as under tracing
    paths = {"every sample": True, "kept samples": False}
    times: dict[str, list[float]] = {name: [] for name in paths}
    for plain in list(paths.values()) * 2:  # the process's first steps are slow for both
        with mock.patch.object(drop_module, "is_tracing", lambda plain=plain: plain):
            step()
    for r in range(args.rounds):
        for name, plain in paths.items():
            with mock.patch.object(drop_module, "is_tracing", lambda plain=plain: plain):
                step()  # warm-up of this path
                start = time.perf_counter()
                step()
                times[name].append((time.perf_counter() - start) * 1e3)
        print(f"  round {r}: " + ", ".join(f"{n} {t[-1]:.0f} ms" for n, t in times.items()))
    every, kept = (statistics.median(times[n]) for n in paths)
    ratios = [a / b for a, b in zip(times["every sample"], times["kept samples"], strict=True)]
    print(
        f"training step median: every sample {every:.0f} ms, kept samples {kept:.0f} ms "
        f"({min(ratios):.2f}-{max(ratios):.2f}x per round)"
    )


if __name__ == "__main__":
    main()
