"""The A/B scripts' shared timing: a model's whole training step (forward, cross-entropy,
backward, the trainer's AdamW) or any other call, timed two or more ways alternated in one
process, so that the machine's drift within the run hits every way alike.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import AbstractContextManager

import torch
import torch.nn.functional as F
from torch import nn

from sparseformer.engine.optim import build_optimizer


def step_arguments(doc: str, rounds: int = 8) -> argparse.ArgumentParser:
    """The flags of a script that alternates whole steps: ``--model``, ``--batch-size``,
    ``--rounds``, ``--calls`` (timed steps per round) and ``--threads``; add its own, then
    :func:`start`."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--model", default="sparseformer_v1_tiny")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=rounds)
    parser.add_argument("--calls", type=int, default=3, help="timed steps per round (median)")
    parser.add_argument("--threads", type=int, default=2)
    return parser


def start(parser: argparse.ArgumentParser) -> argparse.Namespace:
    """The parsed flags, with torch's threads set and its generator seeded (0)."""
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    return args


def training_step(model: nn.Module, batch_size: int, img_size: int = 224) -> Callable[[], None]:
    """One training step of ``model`` (put in training mode) on a fixed random batch."""
    model.train()
    optimizer = build_optimizer(model, lr=1e-5, weight_decay=0.05)
    x = torch.randn(batch_size, 3, img_size, img_size)
    y = torch.randint(0, model.num_classes, (batch_size,))

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        optimizer.step()

    return step


def alternate(
    ways: dict[str, Callable[[], AbstractContextManager]],
    step: Callable[[], None],
    rounds: int,
    calls: int = 1,
) -> dict[str, list[float]]:
    """Milliseconds of ``step`` under each way's context, per round: two warm-up steps each
    first (the process's first steps are slow for every way), then per round and way, inside
    the way's context, one more warm-up step and the median of ``calls`` timed steps. Each
    round's times are printed."""
    times: dict[str, list[float]] = {name: [] for name in ways}
    for way in list(ways.values()) * 2:
        with way():
            step()
    for r in range(rounds):
        for name, way in ways.items():
            with way():
                step()
                taken = []
                for _ in range(calls):
                    start = time.perf_counter()
                    step()
                    taken.append((time.perf_counter() - start) * 1e3)
                times[name].append(statistics.median(taken))
        print(f"  round {r}: " + ", ".join(f"{n} {t[-1]:.1f} ms" for n, t in times.items()))
    return times


def summary(times: dict[str, list[float]], what: str = "training step") -> str:
    """The first two ways' medians and the range of their per-round ratios."""
    (a, first), (b, second) = list(times.items())[:2]
    ratios = [x / y for x, y in zip(first, second, strict=True)]
    return (
        f"{what} median: {a} {statistics.median(first):.1f} ms, {b} "
        f"{statistics.median(second):.1f} ms ({min(ratios):.2f}-{max(ratios):.2f}x per round)"
    )
