"""Tables, CSV and plots of a :class:`~sparseformer.bench.throughput.BenchResult`."""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path

from sparseformer.bench.published import published_top1
from sparseformer.bench.results import BenchResult, BenchRow
from sparseformer.data.scan import counted

__all__ = [
    "markdown_table",
    "write_csv",
    "plot_result",
    "draw_tradeoff",
    "summary_lines",
    "authors_lines",
]

log = logging.getLogger(__name__)

_CSV_FIELDS = (
    "model",
    "img_size",
    "num_frames",
    "batch_size",
    "params",
    "gflops_paper",
    "gflops_complete",
    "img_per_s",
    "img_per_s_min",
    "img_per_s_max",
    "throughput_ratio",
    "latency_ms",
    "latency_ms_min",
    "latency_ms_max",
    "latency_ratio",
    "train_img_per_s",
    "train_ratio",
    "peak_memory_mb",
    "train_peak_memory_mb",
    "peak_fraction",
    "published_top1",
)


def _flat(row: BenchRow) -> dict:
    top1 = published_top1(row.model)
    train = row.train_throughput
    return {
        "model": row.model,
        "img_size": row.img_size,
        "num_frames": row.num_frames,
        "batch_size": row.batch_size,
        "params": row.params,
        "gflops_paper": row.gflops_paper,
        "gflops_complete": row.gflops_complete,
        "img_per_s": row.throughput.median,
        "img_per_s_min": row.throughput.min,
        "img_per_s_max": row.throughput.max,
        "throughput_ratio": row.ratios.get("throughput"),
        "latency_ms": row.latency_ms.median,
        "latency_ms_min": row.latency_ms.min,
        "latency_ms_max": row.latency_ms.max,
        "latency_ratio": row.ratios.get("latency"),
        "train_img_per_s": train.median if train else None,
        "train_ratio": row.ratios.get("train"),
        "peak_memory_mb": row.peak_memory_mb,
        "train_peak_memory_mb": row.train_peak_memory_mb,
        "peak_fraction": row.peak_fraction,
        "published_top1": top1.top1 if top1 else None,
    }


def write_csv(result: BenchResult, path: str | Path) -> None:
    """One line per model and size, with the columns of ``_CSV_FIELDS``."""
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=_CSV_FIELDS)
        writer.writeheader()
        for row in result.rows:
            writer.writerow(_flat(row))


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def markdown_table(result: BenchResult) -> str:
    """A Markdown table; ratios are against the run's baseline, medians of per-round ratios."""
    base = result.settings["baseline"]
    head = (
        "| model | size | params (M) | GFLOPs paper / complete | img/s (min-max) "
        f"| x {base} | batch-1 ms | train img/s | train x | peak mem (MB) | train mem (MB) "
        "| % of matmul peak | published top-1 |"
    )
    lines = [head, "|" + "---|" * 13]
    for row in result.rows:
        r = _flat(row)
        lines.append(
            f"| {r['model']} | {_size(r)} | {r['params'] / 1e6:.1f} "
            f"| {r['gflops_paper']:.3g} / {r['gflops_complete']:.3g} "
            f"| {r['img_per_s']:.3g} ({r['img_per_s_min']:.3g}-{r['img_per_s_max']:.3g}) "
            f"| {_fmt(r['throughput_ratio'], '.2f')} | {r['latency_ms']:.1f} "
            f"| {_fmt(r['train_img_per_s'], '.3g')} | {_fmt(r['train_ratio'], '.2f')} "
            f"| {_fmt(r['peak_memory_mb'], '.0f')} | {_fmt(r['train_peak_memory_mb'], '.0f')} "
            f"| {100 * r['peak_fraction']:.0f}% "
            f"| {_fmt(r['published_top1'], '.1f')} |"
        )
    if any(row.num_frames is not None for row in result.rows):
        lines.append(_CLIP_ROWS)
    return "\n".join(lines)


# under a table or plot with video rows: their throughput, costs and ratios are per clip
_CLIP_ROWS = (
    "(a size TxS is a video model's clip of T frames: its row counts clips, not images, per "
    "second, and GFLOPs per clip)"
)


def _size(r: dict) -> str:
    """``224``, or ``8x224`` for a video model's clips (its rows count clips per second)."""
    frames = r["num_frames"]
    return str(r["img_size"]) if frames is None else f"{frames}x{r['img_size']}"


def summary_lines(result: BenchResult) -> list[str]:
    """The run's conditions, one fact per line."""
    env, s = result.environment, result.settings
    peak = result.matmul_peak_gflops
    return [
        f"device: {env['device_name']} ({env['device']}), {counted(env['threads'], 'thread')}, "
        f"torch {env['torch']}, {env['dtype']}",
        f"batch {s['batch_size']}"
        f"{' at 224 px, scaled by (224/size)^2 above' if s.get('scale_batch') else ''}, "
        f"{s['repeats']} interleaved rounds, warm-up {s['warmup']}, "
        f"at least {s['min_time']} s per measurement",
        *(
            [
                f"training step: batch {s['train_batch_size']}, AdamW, gradient checkpointing "
                f"{'on' if s.get('grad_checkpointing') else 'off'}"
            ]
            if s.get("train", True)
            else []
        ),
        f"matmul peak ({s['precision']}, 2048^3): {peak.median:.1f} GFLOP/s "
        f"(min {peak.min:.1f}, max {peak.max:.1f})",
        f"load average (1, 5, 15 min) at start {_loads(env['load_average_start'])}, at end "
        f"{_loads(env['load_average_end'])}",
        *_cpu_share_lines(env),
    ]


def _loads(loads) -> str:
    return " / ".join(f"{v:.2f}" for v in loads) if loads else "unknown"


def _cpu_share_lines(env: dict) -> list[str]:
    """The CPU time the timed calls got of the cores they asked for, and a warning where other
    work took much of it: every time is then too long by as much, unevenly across models."""
    share = env.get("cpu_share")
    if share is None:
        return []
    shown = f"{100 * share:.0f}" if share >= 0.98 else f"{min(100 * share, 97.9):.1f}"
    line = f"CPU time of the timed calls: {shown}% of {counted(env['threads'], 'thread')}"
    # Quiet runs get 99-100%. Runs at 91-97% on the 2-core Xeon timed DeiT-S's training step
    # 18-34% slower than quiet runs did and SparseFormer-T's no slower: its ratio read
    # 1.72-2.28x where quiet runs read 1.41-1.56x (docs/speed.md).
    if share >= 0.98:
        return [line]
    cores = env.get("cores") or env["threads"]
    if env["threads"] > cores:  # the run's own threads, not other work, wait for the cores
        return [
            f"{line}: WARNING, {env['threads']} threads on {counted(cores, 'core')} wait for "
            f"each other, so these times are too long; run with --threads {cores} or fewer"
        ]
    return [
        f"{line}: WARNING, other work took the cores, so these times are too long and the "
        "ratios unreliable; run again on a quiet machine, or with fewer --threads"
    ]


def authors_lines(result: BenchResult) -> list[str]:
    """Each SparseFormer against the authors' implementation timed beside it (``--official``)."""
    lines = []
    for row in result.rows:
        r = row.ratios
        if "authors_throughput" not in r:
            continue
        train = f", training step {r['authors_train']:.2f}x" if "authors_train" in r else ""
        lines.append(
            f"{row.model} at {row.img_size} px against the authors' implementation "
            f"({result.settings['official']}): inference {r['authors_throughput']:.2f}x, "
            f"batch-1 latency theirs / ours {r['authors_latency']:.2f}x{train} (throughputs: "
            "medians of per-round ratios; latency: of the medians)"
        )
    return lines


def plot_result(result: BenchResult, path: str | Path) -> None:
    """Published top-1 against measured throughput; with several sizes, cost against size."""
    from matplotlib.figure import Figure  # not pyplot: the caller's backend is left alone

    sizes = sorted({row.img_size for row in result.rows})
    panels = 3 if len(sizes) > 1 else 1
    fig = Figure(figsize=(5.5 * panels, 4.2))
    axes = fig.subplots(1, panels, squeeze=False)
    draw_tradeoff(axes[0][0], result, sizes[0])
    if panels > 1:
        models = list(dict.fromkeys(row.model for row in result.rows))
        for name in models:
            own = sorted((r for r in result.rows if r.model == name), key=lambda r: r.img_size)
            x = [r.img_size for r in own]
            axes[0][1].plot(x, [r.gflops_complete for r in own], "o-", label=name)
            axes[0][2].plot(x, [r.throughput.median for r in own], "o-", label=name)
        for a, label in ((axes[0][1], "GFLOPs per image (complete)"), (axes[0][2], "img/s")):
            a.set_xscale("log", base=2)
            a.set_yscale("log")
            a.set_xticks(sizes, [str(s) for s in sizes])
            a.set_xlabel("input size (px)")
            a.set_ylabel(label)
            a.grid(alpha=0.3)
        axes[0][2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")  # labels past the axes stay in


def draw_tradeoff(ax, result: BenchResult, img_size: int) -> None:
    """Published top-1 against measured img/s at ``img_size`` on a matplotlib axis; models
    with no published figure are left out, SparseFormers drawn as stars. When none of them
    has one, the axis shows each model's measured img/s as a bar instead."""
    rows = [row for row in result.rows if row.img_size == img_size]
    cited = [(row, published_top1(row.model)) for row in rows]
    cited = [(row, top1) for row, top1 in cited if top1 is not None]
    for row, top1 in cited:
        marker = "*" if row.model.startswith("sparseformer") else "o"
        ax.scatter(row.throughput.median, top1.top1, marker=marker, s=120 if marker == "*" else 50)
        ax.annotate(row.model, (row.throughput.median, top1.top1), fontsize=7, xytext=(4, 4),
                    textcoords="offset points")  # fmt: skip
    if cited:
        ax.margins(x=0.15, y=0.1)  # room for the names beside the outermost points
        ax.set_ylabel("published ImageNet-1K top-1 (%)")
    else:
        log.info(
            "no model timed at %dpx has a published top-1 cited in sparseformer.bench.published:"
            " the plot shows their throughput alone",
            img_size,
        )
        ax.barh([row.model for row in rows], [row.throughput.median for row in rows])
        ax.invert_yaxis()  # the models in the order of the table
        ax.tick_params(axis="y", labelsize=7)
    env = result.environment
    batch = rows[0].batch_size if rows else "-"
    clips = any(r.num_frames is not None for r in rows)
    unit = "img/s (clips/s for video models)" if clips else "img/s"
    ax.set_xlabel(f"measured {unit} ({img_size}px, batch {batch})")
    ax.set_title(f"{env['device_name'][:40]}, {env['threads']} threads, {env['dtype']}", fontsize=8)
    ax.grid(alpha=0.3)
