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
from unittest import mock

import torch
from alternated import alternate, summary, training_step

import sparseformer.layers.drop as drop_module
from sparseformer import create_model


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
    model = create_model(args.model, **extra)
    step = training_step(model, args.batch_size, args.img_size)
    print(
        f"{args.model}, batch {args.batch_size}, {args.img_size} px, drop-path rate "
        f"{model.config.drop_path_rate}, threads: {args.threads}, torch {torch.__version__}, "
        f"{platform.processor() or platform.machine()} ({torch.backends.cpu.get_cpu_capability()})"
    )

    def plain(forced: bool):  # the plain path, forced: the function's own fallback, as tracing
        return lambda: mock.patch.object(drop_module, "is_tracing", lambda: forced)

    ways = {"every sample": plain(True), "kept samples": plain(False)}
    print(summary(alternate(ways, step, args.rounds)))


if __name__ == "__main__":
    main()
