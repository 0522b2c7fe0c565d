"""Bootstrapping on Fashion-MNIST, on the CPU: a small timm ViT teacher trained with
``sparseformer train``, a SparseFormer bootstrapped from it with ``sparseformer bootstrap``
(far fewer tokens than the teacher has patches), and one table side by side: top-1 on the test
set, multiply-adds per image (``count_flops``), CPU throughput measured in this one run
(alternating the two models), and the wall-clock time of each training. The student's RoI
pictures are drawn beside it. The defaults fit 20 minutes on a 2-core CPU: a ViT-Ti teacher at
80 px (25 patches) for 2 epochs on 40,000 training images, a student of 4 tokens x 9 points
keeping 8 of its 12 blocks for 2 epochs.

    make bootstrap-demo          # = python scripts/bootstrap_demo.py --out runs/bootstrap-demo
    python scripts/bootstrap_demo.py --out runs/bt-short --limit-train 2000 --limit-val 500 \\
        --teacher-epochs 1 --student-epochs 1          # a shortened check that it all runs

Runs already in ``--out`` are reused (only the measurements are redone). Every figure is what
was measured, with the data and time each training had.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
from pathlib import Path

import torch

from sparseformer.bench.counting import count_flops
from sparseformer.bench.timing import timed
from sparseformer.bootstrap.derive import TEMPLATE
from sparseformer.cli import main as cli
from sparseformer.weights.build import model_from_checkpoint


def _run(argv: list[str]) -> str:
    """A ``sparseformer`` command in this process; its standard output."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = cli(argv)
    if code != 0:
        raise SystemExit(f"sparseformer {' '.join(argv)} failed ({code})")
    return out.getvalue()


def _data(args: argparse.Namespace, *, training: bool) -> list[str]:
    """Data flags: training runs validate on ``--limit-val`` test images after each epoch; the
    final evaluation uses the whole test set (or ``--limit-test``)."""
    flags = ["--dataset", "fashion-mnist", "--quiet"]
    if training and args.limit_train:
        flags += ["--limit-train", str(args.limit_train)]
    limit = args.limit_val if training else args.limit_test
    if limit:
        flags += ["--limit-val", str(limit)]
    return flags


def train_both(args: argparse.Namespace) -> tuple[Path, Path]:
    teacher, student = args.out / "teacher", args.out / "student"
    if not (teacher / "summary.json").is_file():
        _run(["train", "--model", args.teacher, "--output", str(teacher), "--img-size",
              str(args.img_size), "--epochs", str(args.teacher_epochs),
              *_data(args, training=True)])  # fmt: skip
    if not (student / "summary.json").is_file():
        _run(["bootstrap", "--teacher", str(teacher / "last.pt"), "--output", str(student),
              "--tokens", str(args.tokens), "--points", str(args.points), "--finetune",
              str(args.finetune), "--inherit", str(args.inherit), "--loss", args.loss,
              "--epochs", str(args.student_epochs), *_data(args, training=True)])  # fmt: skip
    return teacher, student


def measure(name: str, run: Path, args: argparse.Namespace) -> dict:
    """Test-set top-1 (``sparseformer eval``), MACs, and the training's wall-clock."""
    ckpt = str(run / "last.pt")  # the end of training: best.pt was chosen on test images
    test = _data(args, training=False)
    line = _run(["eval", "--model", name, "--checkpoint", ckpt, "--json", *test])
    result = json.loads(line.strip().splitlines()[-1])
    model, _ = model_from_checkpoint(name, ckpt)
    summary = json.loads((run / "summary.json").read_text())
    return {
        "model": model,
        "top1": result["acc1"],
        "gmacs": count_flops(model, (3, args.img_size, args.img_size)).gflops_complete,
        "train_minutes": summary["train_seconds"] / 60,
        "params": sum(p.numel() for p in model.parameters()),
    }


def throughput(models: list[torch.nn.Module], args: argparse.Namespace) -> list[float]:
    """Images per second of each model, timed in turns in this one run (median of rounds)."""
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    rates: list[list[float]] = [[] for _ in models]
    with torch.inference_mode():
        for model in models:
            model(x)  # warm-up
        for _ in range(args.rounds):
            for i, model in enumerate(models):
                times = timed(lambda m=model: m(x), "cpu", 1.0)
                rates[i].append(args.batch_size / sorted(times)[len(times) // 2])
    return [sorted(r)[len(r) // 2] for r in rates]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/bootstrap-demo"))
    parser.add_argument("--teacher", default="vit_tiny_patch16_224", help="timm ViT name")
    parser.add_argument("--img-size", type=int, default=80, help="25 patches of 16 px")
    parser.add_argument("--teacher-epochs", type=int, default=2)
    parser.add_argument("--student-epochs", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=4)
    parser.add_argument("--points", type=int, default=9)
    parser.add_argument("--finetune", type=int, default=1)
    parser.add_argument("--inherit", type=int, default=8, help="teacher blocks the student keeps")
    parser.add_argument("--loss", choices=("cosine", "smooth_l1"), default="cosine")
    parser.add_argument("--limit-train", type=int, default=40000, help="training images")
    parser.add_argument("--limit-val", type=int, default=2000, help="validated after each epoch")
    parser.add_argument("--limit-test", type=int, default=None, help="final evaluation images")
    parser.add_argument("--batch-size", type=int, default=64, help="throughput batch")
    parser.add_argument("--rounds", type=int, default=3, help="timing rounds per model")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    teacher_run, student_run = train_both(args)
    rows = {"teacher": measure(args.teacher, teacher_run, args),
            "student": measure(TEMPLATE, student_run, args)}  # fmt: skip
    rates = throughput([rows["teacher"]["model"], rows["student"]["model"]], args)
    lines = ["| model | params | test top-1 | GMACs / image | CPU images/s | training (min) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for (role, row), rate in zip(rows.items(), rates):
        row["images_per_second"] = rate
        lines.append(f"| {role} | {row['params']:,} | {row['top1']:.2f}% | {row['gmacs']:.4f} "
                     f"| {rate:.0f} | {row['train_minutes']:.1f} |")  # fmt: skip
    t, s = rows["teacher"], rows["student"]
    ratio = f"MACs {s['gmacs'] / t['gmacs']:.0%}, throughput x{rates[1] / rates[0]:.2f}"
    lines.append(f"\nstudent / teacher: {ratio}, top-1 {s['top1'] - t['top1']:+.2f} points")
    table = "\n".join(lines)
    (args.out / "table.md").write_text(table + "\n")
    results = {k: {f: v for f, v in r.items() if f != "model"} for k, r in rows.items()}
    (args.out / "results.json").write_text(json.dumps({**results, "args": str(vars(args))}))
    image = args.out / "sample.png"
    if not image.is_file():
        from sparseformer.data.fashion_mnist import fashion_mnist

        fashion_mnist(False, download=False)[0][0].save(image)
    _run(["viz", "--model", TEMPLATE, "--checkpoint", str(student_run / "last.pt"), str(image),
          "--out", str(args.out / "pictures")])  # fmt: skip
    print(table)
    print(f"RoI pictures of the student: {args.out / 'pictures'}")


if __name__ == "__main__":
    main()
