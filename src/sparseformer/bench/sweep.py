"""The resolution sweep: at which input size SparseFormer overtakes each peer.

Only SparseFormer's stem sees pixels; its latent tokens and their sampling points do not grow
with the image, so its cost is nearly flat in resolution while a ViT's or CNN's grows with the
pixel count (and a global-attention ViT's faster still). At 224 px the efficient CNN-hybrids
(LeViT, EfficientViT, FastViT) are ahead; somewhere above, the lines cross. ``speedups`` and
``crossover`` find that size from a :class:`~sparseformer.bench.results.BenchResult` with
several sizes, ``plot_throughput`` and ``plot_top1`` draw it.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from pathlib import Path

from sparseformer.bench.published import published_top1
from sparseformer.bench.report import draw_tradeoff
from sparseformer.bench.results import BenchResult
from sparseformer.weights.registry import MODELS, split_tag

__all__ = [
    "SWEEP_SIZES",
    "subject_model",
    "speedups",
    "crossover",
    "sweep_table",
    "crossover_lines",
    "plot_throughput",
    "plot_top1",
]

SWEEP_SIZES = (224, 448, 768, 1024)


def subject_model(models: tuple[str, ...] | list[str]) -> str:
    """The model the sweep is about: the first SparseFormer among ``models``, else the first."""
    return next((name for name in models if split_tag(name)[0] in MODELS), models[0])


def speedups(
    result: BenchResult, subject: str, measure: str = "throughput"
) -> dict[str, dict[int, float]]:
    """Per peer and size, how many times faster ``subject`` is (above 1: ahead).

    ``throughput``: the median over rounds of the per-round ratio subject / peer (models were
    timed in turns, so a round's load hits both alike). ``latency``: the peer's median batch-1
    latency over the subject's. Sizes where either model is missing are left out.
    """
    if measure not in ("throughput", "latency"):
        raise ValueError(f"measure must be 'throughput' or 'latency', not {measure!r}")
    rows = {(row.model, row.img_size): row for row in result.rows}
    out: dict[str, dict[int, float]] = {}
    for (name, size), row in rows.items():
        own = rows.get((subject, size))
        if name == subject or own is None:
            continue
        if measure == "throughput":
            pairs = zip(own.throughput.runs, row.throughput.runs)
            ratio = statistics.median(a / b for a, b in pairs)
        else:
            ratio = row.latency_ms.median / own.latency_ms.median
        out.setdefault(name, {})[size] = ratio
    return out


def crossover(speedup: Mapping[int, float]) -> int | None:
    """The smallest measured size from which the subject is ahead (ratio above 1) at that size
    and every larger one; ``None`` if it is behind at the largest (or nothing was measured).

    A subject ahead everywhere crosses at the smallest size; one ahead only at a middle size
    but behind again above has not crossed there.
    """
    found = None
    for size in sorted(speedup, reverse=True):
        if speedup[size] <= 1:
            break
        found = size
    return found


def sweep_table(result: BenchResult, subject: str) -> str:
    """A Markdown table, one line per model: its published top-1, then img/s, batch-1 ms and
    GFLOPs at each size, and the size from which ``subject`` is ahead of it in throughput."""
    sizes = sorted({row.img_size for row in result.rows})
    rows = {(row.model, row.img_size): row for row in result.rows}
    crossings = {peer: crossover(r) for peer, r in speedups(result, subject).items()}
    slash = " / ".join(map(str, sizes))
    lines = [
        f"| model | published top-1 | img/s {slash} | batch-1 ms {slash} | GFLOPs {slash} "
        f"| {subject} ahead from |",
        "|---|---|---|---|---|---|",
    ]
    for name in dict.fromkeys(row.model for row in result.rows):
        own = [rows.get((name, size)) for size in sizes]
        top1 = published_top1(name)
        if name == subject:
            crossing = "-"
        else:
            size = crossings.get(name)
            crossing = f"not up to {sizes[-1]} px" if size is None else f"{size} px"
        cells = [
            " / ".join("-" if r is None else format(value(r), spec) for r in own)
            for value, spec in (
                (lambda r: r.throughput.median, ".3g"),
                (lambda r: r.latency_ms.median, ".0f"),
                (lambda r: r.gflops_complete, ".3g"),
            )
        ]
        lines.append(
            f"| {name} | {'-' if top1 is None else top1.top1} | {' | '.join(cells)} | {crossing} |"
        )
    return "\n".join(lines)


def crossover_lines(result: BenchResult, subject: str) -> list[str]:
    """One line per peer: where ``subject`` overtakes it in throughput and batch-1 latency."""
    throughput, latency = speedups(result, subject), speedups(result, subject, "latency")
    lines = []
    for peer, ratios in throughput.items():
        parts = []
        for label, ratio in (("throughput", ratios), ("batch-1 latency", latency[peer])):
            size = crossover(ratio)
            where = "not within the sizes measured" if size is None else f"from {size} px"
            ratio_text = ", ".join(f"{s}: {r:.2f}x" for s, r in sorted(ratio.items()))
            parts.append(f"{label} {where} ({ratio_text})")
        lines.append(f"{subject} ahead of {peer} in " + "; in ".join(parts))
    for item in result.skipped:
        lines.append(f"{item['model']} skipped at {item['img_size']} px: {item['reason']}")
    return lines


def _figure():
    """A figure of its own with one axis (not pyplot's: the caller's backend is left alone)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4.6))
    return fig, fig.subplots()


def plot_throughput(result: BenchResult, subject: str, path: str | Path) -> None:
    """Measured img/s against input size, log-log, one line per model (``subject`` bold)."""
    sizes = sorted({row.img_size for row in result.rows})
    env = result.environment
    fig, ax = _figure()
    for name in dict.fromkeys(row.model for row in result.rows):
        own = sorted((r for r in result.rows if r.model == name), key=lambda r: r.img_size)
        style = {"marker": "*", "markersize": 12, "linewidth": 2.5}
        style = style if name == subject else {"marker": "o"}
        ax.plot([r.img_size for r in own], [r.throughput.median for r in own], label=name, **style)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.minorticks_off()
    from matplotlib.ticker import LogLocator, StrMethodFormatter

    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1, 2, 3, 5, 7)))  # 79-843: not 10^2 alone
    ax.yaxis.set_major_formatter(StrMethodFormatter("{x:g}"))
    batches = ", ".join(
        f"{s}: {next(r.batch_size for r in result.rows if r.img_size == s)}" for s in sizes
    )
    ax.set_xlabel(f"input size (px); batch {batches}")
    ax.set_ylabel("measured img/s (median of rounds)")
    ax.set_title(f"{env['device_name'][:40]}, {env['threads']} threads, {env['dtype']}", fontsize=8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # labels past the axes stay in


def plot_top1(result: BenchResult, path: str | Path) -> None:
    """Published top-1 against measured img/s at the smallest size of the run."""
    fig, ax = _figure()
    draw_tradeoff(ax, result, min(row.img_size for row in result.rows))
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # labels past the axes stay in
