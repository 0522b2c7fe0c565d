"""``sparseformer demo``: what ``make demo`` runs.

Trains sparseformer_v1_micro on Fashion-MNIST (60,000 real photos of clothes, 28x28) on this
machine's CPU with the ``fashion-mnist-cpu`` recipe, evaluates the final weights (last.pt) on
the 10,000 test images, and prints where everything is. Running it again continues an
unfinished run (--resume auto) or only re-evaluates a finished one.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from sparseformer.cli.common import positive_int

__all__ = ["register"]

MODEL = "sparseformer_v1_micro"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="train and evaluate the micro model on Fashion-MNIST", description=__doc__
    )
    p.add_argument(
        "--output", type=Path, default=Path("runs/demo"), help="run folder (default runs/demo)"
    )
    p.add_argument("--epochs", type=positive_int, help="override the recipe's epochs")
    p.add_argument(
        "--limit-train", type=positive_int, metavar="N", help="train on the first N images only"
    )
    p.add_argument("--batch-size", type=positive_int, help="override the recipe's batch size (128)")
    p.add_argument(
        "--limit-val", type=positive_int, metavar="N", help="evaluate on the first N images only"
    )
    p.add_argument(
        "--threads",
        type=positive_int,
        help="CPU threads of every step (default: the free cores)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sparseformer.cli import build_parser

    parser = build_parser()
    common = ["--dataset", "fashion-mnist", "--device", "cpu"]  # each step on the CPU
    if args.limit_val is not None:
        common += ["--limit-val", str(args.limit_val)]
    if args.threads is not None:  # every step's; the pictures take the evaluation's
        common += ["--threads", str(args.threads)]
    train = ["train", "--model", MODEL, *common, "--output", str(args.output)]
    train += ["--recipe", "fashion-mnist-cpu", "--resume", "auto"]
    if args.epochs is not None:
        train += ["--epochs", str(args.epochs)]
    if args.limit_train is not None:
        train += ["--limit-train", str(args.limit_train)]
    if args.batch_size is not None:
        train += ["--batch-size", str(args.batch_size)]
    if args.quiet:
        train.append("--quiet")
    print(f"== 1/3 train {MODEL} on Fashion-MNIST: sparseformer {' '.join(train)}")
    start = time.perf_counter()
    train_args = parser.parse_args(train)
    status = train_args.func(train_args)
    if status:
        return status
    wall = time.perf_counter() - start
    # the final weights: Fashion-MNIST has no separate validation split, so best.pt was picked
    # on the test images and its score would flatter the model
    last = args.output / "last.pt"
    evaluation = ["eval", "--model", MODEL, "--checkpoint", str(last), *common, "--quiet"]
    print(f"== 2/3 evaluate: sparseformer {' '.join(evaluation)}")
    eval_args = parser.parse_args(evaluation)
    status = eval_args.func(eval_args)
    if status == 0:
        print("== 3/3 pictures: where the tokens look on a few test images (sparseformer viz)")
        demo_pictures(MODEL, last, args.output / "pictures")
    summary = json.loads((args.output / "summary.json").read_text())
    print(
        f"\ntrained for {summary['train_seconds'] / 60:.1f} min ({wall / 60:.1f} min wall time "
        f"for this command, data preparation included); results in {args.output}/:\n"
        f"  best.pt, last.pt   checkpoints (sparseformer eval/predict --checkpoint ...)\n"
        f"  metrics.jsonl      one line per epoch; metrics.png: training curves\n"
        f"  summary.json       the run's summary\n"
        f"  pictures/          RoIs and sampling points on test images, per stage (PNG, GIF)\n"
        f"try: sparseformer predict --model {MODEL} --checkpoint {last} IMAGE.png"
    )
    return status


def demo_pictures(model_name: str, checkpoint: Path, out_dir: Path, count: int = 4) -> int:
    """Pictures of a trained Fashion-MNIST model on the first test image of ``count`` classes.

    The last step of ``sparseformer demo``; prints what it wrote. Returns 0.
    """
    from sparseformer.viz.demo import fashion_mnist_pictures
    from sparseformer.viz.figures import format_statistics

    for index, class_name, result in fashion_mnist_pictures(model_name, checkpoint, out_dir, count):
        print(f"test image {index} ({class_name}): predicted {result.label}")
        print("  " + format_statistics(result.stats).replace("\n", "\n  "))
    print(f"pictures of where the tokens look: {out_dir}/*_rois.png, *_stages.gif")
    return 0
