"""The initial tokens computed once per batch against once per image.

SparseFormer's initial tokens and RoIs are the same for every image, so the model keeps them
``(1, N, ...)`` until an op makes them differ (``SparseFormer._embed``): the first unit's
attention, RoI adjustment, sampling offsets and generated mixing matrices run once per batch.
This times the whole training step (forward, backward, the trainer's AdamW), or batch
inference with ``--inference``, that way and with the tokens expanded over the batch first,
as they were, alternated in one process.

    python scripts/shared_tokens_ab.py [--model sparseformer_v1_tiny] [--inference] [--rounds 8]
"""

from __future__ import annotations

import contextlib
from unittest import mock

import torch
from alternated import alternate, start, step_arguments, summary, training_step

from sparseformer import create_model, packed_weights
from sparseformer.models.sparseformer import SparseFormer

_shared_embed = SparseFormer._embed


def _per_image_embed(self, x):
    """The initial tokens and RoIs expanded over the batch, as before they were shared."""
    feats, tokens, rois = _shared_embed(self, x)
    B = feats.shape[0]
    return feats, tokens.expand(B, -1, -1), rois.expand(B, -1, -1)


def _inference(model: torch.nn.Module, batch_size: int, img_size: int = 224):
    model.eval()
    x = torch.randn(batch_size, 3, img_size, img_size)

    def step() -> None:
        with torch.inference_mode():
            model(x)

    return step


def main() -> None:
    parser = step_arguments(__doc__)
    parser.add_argument("--inference", action="store_true", help="time batch inference")
    args = start(parser)
    model = create_model(args.model)
    make = _inference if args.inference else training_step
    step = make(model, args.batch_size)
    ways = {
        "per image": lambda: mock.patch.object(SparseFormer, "_embed", _per_image_embed),
        "shared": contextlib.nullcontext,
    }
    what = "batch inference" if args.inference else "training step"
    # inference as the bench runs it: the weights laid out for the fused kernel once
    with packed_weights() if args.inference else contextlib.nullcontext():
        times = alternate(ways, step, args.rounds, args.calls)
    print(summary(times, what))


if __name__ == "__main__":
    main()
