"""CPU training's adaptive-mixing generator, from a packed weight against by ``addmm``.

``sparseformer.layers.mixing_fused`` makes each chunk's matrices (forward, and again in
backward) by oneDNN's fused kernel from the generator's weight laid out once per layer call
(``pack_weight``). This times the whole training step (forward, backward, the trainer's AdamW)
that way and with ``addmm`` for every chunk, alternated in one process.

    python scripts/generator_ab.py [--model sparseformer_v1_tiny] [--rounds 8] [--threads 2]
"""

from __future__ import annotations

import argparse
import contextlib
from unittest import mock

import torch
from alternated import alternate, summary, training_step

import sparseformer.layers.mixing_fused as fused
from sparseformer import create_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="sparseformer_v1_tiny")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--calls", type=int, default=3, help="timed steps per round (median)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    step = training_step(create_model(args.model), args.batch_size)
    ways = {
        "addmm": lambda: mock.patch.object(fused, "pack_weight", lambda weight: None),
        "packed": contextlib.nullcontext,
    }
    print(summary(alternate(ways, step, args.rounds, args.calls)))


if __name__ == "__main__":
    main()
