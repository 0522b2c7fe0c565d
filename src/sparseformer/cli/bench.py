"""``sparseformer bench``: throughput, latency, memory, FLOPs and share of the machine's peak.

All models are built first and timed in turns, round after round; medians over the rounds are
reported, with ratios against a baseline taken round by round. ``--sweep PREFIX`` measures
inference from 224 to 1024 px (batch scaled to keep the pixels per batch), finds the size at
which the first SparseFormer overtakes each peer, and writes PREFIX.json, PREFIX.csv,
PREFIX-throughput.png (img/s against size) and PREFIX-top1.png (top-1 against img/s at 224).
"""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    from sparseformer.bench.results import DEFAULT_MODELS
    from sparseformer.cli.common import count, image_size, positive_int

    p = sub.add_parser(
        "bench",
        help="measure speed and cost of SparseFormer and timm baselines",
        description=__doc__,
    )
    p.add_argument(
        "--models",
        nargs="+",
        default=list(DEFAULT_MODELS),
        metavar="NAME",
        help=f"SparseFormer or timm names (default: {' '.join(DEFAULT_MODELS)})",
    )
    p.add_argument(
        "--batch-size", type=positive_int, default=32, help="throughput batch (default 32)"
    )
    p.add_argument(
        "--img-size",
        type=image_size,
        nargs="+",
        default=None,
        metavar="S",
        help="input sizes, each timed (default 224; with --sweep 224 448 768 1024)",
    )
    p.add_argument(
        "--num-frames",
        "--frames",
        type=positive_int,
        default=None,
        metavar="T",
        help="clip length of video models (default: theirs, 8); their rows count clips/s",
    )
    p.add_argument(
        "--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="default fp32"
    )
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="default cpu")
    p.add_argument(
        "--threads", type=positive_int, default=None, help="CPU threads (default: torch's)"
    )
    p.add_argument("--repeats", type=positive_int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--warmup", type=count, default=1, help="untimed passes per model (default 1)")
    p.add_argument(
        "--min-time", type=float, default=1.0, help="seconds per measurement, at least (default 1)"
    )
    p.add_argument(
        "--baseline",
        default=None,
        help="model for the ratio columns (default DeiT-S, else the first of --models)",
    )
    p.add_argument("--no-train", action="store_true", help="skip the training-step measurement")
    p.add_argument(
        "--train-batch-size", type=positive_int, help="images per training step (default 32)"
    )
    p.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="train with model.set_grad_checkpointing(): less memory, more time",
    )
    p.add_argument(
        "--official",
        default=None,
        metavar="PATH",
        help="the authors' v1 code (a checkout of github.com/showlab/sparseformer, or the file "
        "defining their model): time their implementation of each v1 SparseFormer too and "
        "report ours against it",
    )
    p.add_argument("--json", default=None, metavar="PATH", help="write all results as JSON")
    p.add_argument("--csv", default=None, metavar="PATH", help="write one CSV line per row")
    p.add_argument("--plot", default=None, metavar="PATH", help="write the trade-off plot")
    p.add_argument(
        "--sweep",
        default=None,
        metavar="PREFIX",
        help="resolution sweep, inference only: write PREFIX.json, .csv, -throughput.png and "
        "-top1.png, and print where the SparseFormer overtakes each peer",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from sparseformer.bench import sweep as sweeping
    from sparseformer.bench.report import (
        authors_lines,
        markdown_table,
        plot_result,
        summary_lines,
        write_csv,
    )
    from sparseformer.bench.throughput import BenchError, BenchSettings, run_benchmark
    from sparseformer.cli import CliError

    sweep = _check_flags(args)
    sizes = list(dict.fromkeys(args.img_size or ()))  # each size once, in the order given
    sizes = sizes or (list(sweeping.SWEEP_SIZES) if args.sweep else [224])
    try:
        settings = BenchSettings(
            models=tuple(dict.fromkeys(args.models)),  # each once, in the order given
            img_sizes=tuple(sizes),
            batch_size=args.batch_size,
            precision=args.precision,
            device=args.device,
            threads=args.threads,
            repeats=args.repeats,
            warmup=args.warmup,
            min_time=args.min_time,
            train=not (args.no_train or args.sweep),
            train_batch_size=args.train_batch_size or 32,
            grad_checkpointing=args.grad_checkpointing,
            baseline=args.baseline,
            num_frames=args.num_frames,
            scale_batch=bool(args.sweep),
            skip_unsupported=bool(args.sweep),
            official=args.official,
        )
        result = run_benchmark(settings)
    except BenchError as exc:
        raise CliError(str(exc)) from None
    for line in summary_lines(result):
        print(line)
    print(markdown_table(result))
    for line in authors_lines(result):
        print(line)
    subject = sweeping.subject_model(settings.models)
    if args.sweep:
        print(sweeping.sweep_table(result, subject))
        for line in sweeping.crossover_lines(result, subject):
            print(line)
    as_json = lambda p: p.write_text(json.dumps(result.to_dict(), indent=2) + "\n")  # noqa: E731
    writes = [(args.json, as_json), (args.csv, lambda p: write_csv(result, p))]
    writes += [(args.plot, lambda p: plot_result(result, p))]
    if sweep:
        writes += [(sweep["json"], as_json), (sweep["csv"], lambda p: write_csv(result, p))]
        writes += [(sweep["throughput"], lambda p: sweeping.plot_throughput(result, subject, p))]
        writes += [(sweep["top1"], lambda p: sweeping.plot_top1(result, p))]
    _write_outputs([(option, write) for option, write in writes if option])
    return 0


def _write_outputs(writes: list) -> None:
    """Each ``(path, write)``: written to a temporary file and put in place, a symlink's file
    replaced, a device or pipe (``/dev/stdout``, ``/dev/null``) written into."""
    import sys

    from sparseformer.engine.atomic import is_stream, output_target, staged

    for option, write in writes:
        path = output_target(option)
        path.parent.mkdir(parents=True, exist_ok=True)
        with staged(path, path.suffix) as tmp:  # the suffix tells matplotlib the format
            write(tmp)
        print(f"wrote {option}", file=sys.stderr if is_stream(path) else sys.stdout)


_PLOT_SUFFIXES = (".png", ".pdf", ".svg", ".jpg", ".jpeg")


def _check_flags(args: argparse.Namespace) -> dict[str, str]:
    """Flags that cannot work together or outputs that cannot be written, before any timing;
    the sweep's files (``{}`` without ``--sweep``)."""
    import os
    from pathlib import Path

    from sparseformer.cli import CliError, check_output
    from sparseformer.engine.atomic import is_stream, output_target
    from sparseformer.engine.video import is_video_model

    sweep = {}
    if args.sweep:  # the sweep's files, beside any asked for one by one
        prefix = args.sweep
        if prefix.endswith(("/", os.sep)) or Path(prefix).is_dir():  # ".json" in it, hidden
            example = os.path.join(prefix, "sweep")
            raise CliError(f"--sweep {prefix!r} is a folder; give a prefix for the files, e.g. "
                           f"{example} (writes {example}.json, .csv and two plots)")  # fmt: skip
        sweep = {"json": f"{prefix}.json", "csv": f"{prefix}.csv"}
        sweep |= {"throughput": f"{prefix}-throughput.png", "top1": f"{prefix}-top1.png"}
    given = [o for o in (args.json, args.csv, args.plot, *sweep.values()) if o and not is_stream(o)]
    files = [str(output_target(o).absolute()) for o in given]  # streams are written into
    same = sorted({o for o, f in zip(given, files, strict=True) if files.count(f) > 1})
    if same:  # one would overwrite the other
        raise CliError(f"{', '.join(same)} is given for two outputs; give each its own file")
    kinds = {"--json": (".json",), "--csv": (".csv",), "--plot": _PLOT_SUFFIXES}
    for flag, option in (("--json", args.json), ("--csv", args.csv), ("--plot", args.plot)):
        if option:
            check_output(option, flag, kinds=kinds[flag])  # not a link to a checkpoint
    for option in sweep.values():
        check_output(option, "--sweep", kinds=(Path(option).suffix,))
    if args.plot and Path(args.plot).suffix.lower() not in _PLOT_SUFFIXES:
        raise CliError(f"--plot {args.plot!r}: give a .png, .pdf, .svg or .jpg file")
    if args.num_frames is not None and not any(is_video_model(m) for m in args.models):
        raise CliError("--num-frames is for video models; none of --models is one")
    skipped = "--sweep" if args.sweep else "--no-train" if args.no_train else None
    for flag, value in (("--train-batch-size", args.train_batch_size),
                        ("--grad-checkpointing", args.grad_checkpointing)):  # fmt: skip
        if skipped and value:
            raise CliError(f"{flag} is for the training step, which {skipped} leaves out")
    return sweep
