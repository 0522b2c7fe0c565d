"""Where the demo's time goes: its training data pipeline and its training step, timed apart.

``make demo`` trains sparseformer_v1_micro on Fashion-MNIST with the ``fashion-mnist-cpu``
recipe (batch 128, 48 px, data loaded in the training process). This script times the two
halves of one training iteration with the recipe's settings, so that a change to either can be
measured on its own:

    python scripts/demo_step.py                 # ms per batch: loading, and the training step
    python scripts/demo_step.py --profile       # and the step's operators by self CPU time

The step is forward, label-smoothed cross-entropy, backward, gradient clipping and AdamW on
random images (the data does not change the step's cost); loading is the recipe's augmentation
on the real training images. Minimum and median over ``--steps`` iterations after warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from sparseformer import create_model
from sparseformer.cli.demo import MODEL
from sparseformer.data.datasets import DataSource, build_datasets
from sparseformer.data.loader import build_train_loader, start_epoch
from sparseformer.engine.inputs import training_preprocessing
from sparseformer.engine.optim import build_optimizer
from sparseformer.engine.recipe import load_recipe


def loading_ms(recipe, steps: int) -> list[float]:
    """Milliseconds per training batch from the recipe's loader (in this process)."""
    source = DataSource(dataset="fashion-mnist")
    pre = training_preprocessing(source, MODEL, recipe)  # what `train` builds its data with
    data = build_datasets(source, pre, recipe.augmentation).train
    loader = build_train_loader(data, recipe.batch_size, 0, 0, pin_memory=False)
    start_epoch(loader, 0)
    batches, times = iter(loader), []
    next(batches)
    for _ in range(steps):
        start = time.perf_counter()
        next(batches)
        times.append(1e3 * (time.perf_counter() - start))
    return times


def training_step(recipe):
    """One training iteration of the demo's model on a fixed random batch, as a function."""
    model = create_model(MODEL, num_classes=10).train()
    peak_lr = recipe.scaled_lr(recipe.batch_size)[0]
    optimizer = build_optimizer(model, peak_lr, recipe.weight_decay, recipe.betas, recipe.eps)
    x = torch.randn(recipe.batch_size, 3, recipe.img_size, recipe.img_size)
    y = torch.randint(0, 10, (recipe.batch_size,))

    def step() -> None:
        loss = torch.nn.functional.cross_entropy(model(x), y, label_smoothing=0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.clip_grad or float("inf"))
        optimizer.step()

    return step


def step_ms(step, steps: int) -> list[float]:
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(1e3 * (time.perf_counter() - start))
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=15, help="timed iterations (default 15)")
    parser.add_argument("--threads", type=int, help="CPU threads (default: torch's)")
    parser.add_argument("--profile", action="store_true", help="print the step's operators")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    recipe = load_recipe("fashion-mnist-cpu")
    print(f"{torch.get_num_threads()} threads, torch {torch.__version__}, batch "
          f"{recipe.batch_size}, {recipe.img_size} px")  # fmt: skip
    for name, times in (
        ("loading a batch", loading_ms(recipe, args.steps)),
        ("training step", step_ms(step := training_step(recipe), args.steps)),
    ):
        print(f"{name}: min {min(times):.1f} ms, median {statistics.median(times):.1f} ms")
    if args.profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof:
            for _ in range(5):
                step()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=30))


if __name__ == "__main__":
    main()
