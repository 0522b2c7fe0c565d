"""CPU training's adaptive-mixing generator, from a packed weight against by ``addmm``.

``sparseformer.layers.mixing_fused`` makes each chunk's matrices (forward, and again in
backward) by oneDNN's fused kernel from the generator's weight laid out once per layer call
(``pack_weight``). This times the whole training step (forward, backward, the trainer's AdamW)
that way and with ``addmm`` for every chunk, alternated in one process.

    python scripts/generator_ab.py [--model sparseformer_v1_tiny] [--rounds 8] [--threads 2]
"""

from __future__ import annotations

import contextlib
from unittest import mock

from alternated import alternate, start, step_arguments, summary, training_step

import sparseformer.layers.mixing_fused as fused
from sparseformer import create_model


def main() -> None:
    args = start(step_arguments(__doc__))
    step = training_step(create_model(args.model), args.batch_size)
    ways = {
        "addmm": lambda: mock.patch.object(fused, "pack_weight", lambda weight: None),
        "packed": contextlib.nullcontext,
    }
    print(summary(alternate(ways, step, args.rounds, args.calls)))


if __name__ == "__main__":
    main()
