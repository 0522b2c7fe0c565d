"""Does ``torch.compile`` pay? A model eager and compiled, alternated in one process.

    python scripts/compile_ab.py                                  # SparseFormer-T, training step
    python scripts/compile_ab.py --model deit_small_patch16_224
    python scripts/compile_ab.py --inference --rounds 6

Builds the model once (``sparseformer.bench``'s builder: SparseFormer names and timm names),
compiles it with the default inductor backend, and reports the compile time (compile and the
first call) and then, round by round, one eager and one compiled call of the same work on the
same random batch: a training step (forward, cross-entropy, backward, the trainer's AdamW) or
inference under ``inference_mode``. Alternating cancels the machine's drift between rounds.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from sparseformer.bench.throughput import build_model
from sparseformer.engine.optim import build_optimizer


def make_step(model, batch: int, img_size: int, inference: bool):
    """One unit of work: ``step(module)`` runs it with ``module`` (eager or compiled)."""
    x = torch.randn(batch, 3, img_size, img_size)
    if inference:
        model.eval()

        def step(module):
            with torch.inference_mode():
                module(x)

        return step
    model.train()
    y = torch.randint(0, 1000, (batch,))
    optimizer = build_optimizer(model, lr=1e-5, weight_decay=0.05)

    def step(module):
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(module(x), y).backward()
        optimizer.step()

    return step


def timed(step, module) -> float:
    start = time.perf_counter()
    step(module)
    return (time.perf_counter() - start) * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="sparseformer_v1_tiny")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--img-size", type=int, default=224)
    p.add_argument("--inference", action="store_true", help="time inference, not training")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = build_model(args.model, img_size=args.img_size)
    step = make_step(model, args.batch_size, args.img_size, args.inference)
    compiled = torch.compile(model)
    print(f"compile and first call: {timed(step, compiled) / 1e3:.1f} s", flush=True)
    for module in (compiled, model, model):  # warm-up
        step(module)
    times = {"eager": [], "compiled": []}
    for r in range(args.rounds):
        for label, module in (("eager", model), ("compiled", compiled)):
            times[label].append(timed(step, module))
        eager, comp = times["eager"][-1], times["compiled"][-1]
        print(f"round {r}: eager {eager:.0f} ms, compiled {comp:.0f} ms", flush=True)
    eager, comp = (statistics.median(times[k]) for k in ("eager", "compiled"))
    what = "inference" if args.inference else "training step"
    print(
        f"{args.model} {what}, batch {args.batch_size}, {args.threads} threads: "
        f"eager {eager:.0f} ms, compiled {comp:.0f} ms median "
        f"(compiled at {eager / comp:.2f}x the eager speed)"
    )


if __name__ == "__main__":
    main()
