"""Small-scale replication of SparseFormer's accuracy-throughput claim on Fashion-MNIST.

Trains the micro SparseFormer and a dense timm baseline with the same recipe and budget
(``sparseformer train``, recipe ``fashion-mnist-cpu``), then measures both with
``sparseformer bench`` at the training resolution, and writes a table (Markdown), a JSON file
and a plot of measured validation top-1 against measured throughput.

    python scripts/fashion_mnist_tradeoff.py --out runs/tradeoff \\
        --models sparseformer_v1_micro regnetx_002 --epochs 2 --limit-train 4000 --threads 1

Runs already trained in ``--out`` are reused (only the timing is redone).

Whatever the result, it is what was measured: the table says how much data and time each
model had.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparseformer.bench.throughput import BenchSettings, run_benchmark
from sparseformer.cli import main as cli

IMG_SIZE = 48  # the fashion-mnist-cpu recipe's input size


def train(name: str, out: Path, args: argparse.Namespace) -> dict:
    run_dir = out / name
    argv = ["train", "--model", name, "--dataset", "fashion-mnist", "--output", str(run_dir)]
    argv += ["--epochs", str(args.epochs), "--seed", "0", "--quiet"]
    if args.limit_train:
        argv += ["--limit-train", str(args.limit_train)]
    if args.limit_val:
        argv += ["--limit-val", str(args.limit_val)]
    if not (run_dir / "metrics.jsonl").is_file():
        if cli(argv) != 0:
            raise SystemExit(f"training {name} failed")
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    last = records[-1]
    return {
        "val_acc1": last["val_acc1"],
        "best_val_acc1": max(r["val_acc1"] for r in records),
        "epochs": len(records),
        "train_seconds": sum(r["epoch_seconds"] for r in records),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("runs/tradeoff"))
    parser.add_argument("--models", nargs="+", default=["sparseformer_v1_micro", "regnetx_002"])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--limit-train", type=int, default=4000)
    parser.add_argument("--limit-val", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=128, help="throughput batch")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads for timing")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)

    accuracy = {name: train(name, args.out, args) for name in args.models}
    settings = BenchSettings(
        models=tuple(args.models),
        img_sizes=(IMG_SIZE,),
        batch_size=args.batch_size,
        train_batch_size=args.batch_size,
        num_classes=10,
        repeats=3,
        threads=args.threads,
    )
    bench = run_benchmark(settings)
    rows = []
    for row in bench.rows:
        acc = accuracy[row.model]
        rows.append(
            {
                "model": row.model,
                "params": row.params,
                "gflops_complete": row.gflops_complete,
                "val_acc1": acc["val_acc1"],
                "epochs": acc["epochs"],
                "train_seconds": acc["train_seconds"],
                "img_per_s": row.throughput.median,
                "train_img_per_s": row.train_throughput.median if row.train_throughput else None,
            }
        )
    table = [
        "| model | params (M) | MFLOPs (MACs) | val top-1 (%) | inference img/s "
        "| train-step img/s | training time (s) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        table.append(
            f"| {r['model']} | {r['params'] / 1e6:.2f} | {1e3 * r['gflops_complete']:.1f} "
            f"| {r['val_acc1']:.2f} | {r['img_per_s']:.0f} | {r['train_img_per_s']:.0f} "
            f"| {r['train_seconds']:.0f} |"
        )
    text = "\n".join(table)
    print(text)
    (args.out / "tradeoff.md").write_text(text + "\n")
    result = {"settings": vars(args) | {"out": str(args.out)}, "environment": bench.environment}
    (args.out / "tradeoff.json").write_text(json.dumps(result | {"rows": rows}, indent=2) + "\n")
    plot(rows, args.out / "tradeoff.png", bench.environment)
    print(f"wrote {args.out / 'tradeoff.md'}, tradeoff.json, tradeoff.png")


def plot(rows: list[dict], path: Path, env: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4.2))
    for r in rows:
        marker = "*" if r["model"].startswith("sparseformer") else "o"
        ax.scatter(r["img_per_s"], r["val_acc1"], marker=marker, s=140 if marker == "*" else 60)
        ax.annotate(
            r["model"], (r["img_per_s"], r["val_acc1"]), xytext=(4, 4), textcoords="offset points"
        )
    ax.set_xlabel(f"measured inference img/s ({IMG_SIZE}px, {env['threads']} threads)")
    ax.set_ylabel("measured Fashion-MNIST val top-1 (%)")
    ax.set_title("same recipe and budget", fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
