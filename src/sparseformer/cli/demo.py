"""``sparseformer demo``: the main job of ``make demo``."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("demo", help="run the demo (what `make demo` runs)", description=__doc__)
    p.add_argument("--output", default="runs/demo", help="output directory")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from sparseformer import count_flops, count_params, create_model

    for name in ("sparseformer_v1_tiny", "sparseformer_v1_micro"):
        model = create_model(name).eval()
        flops = count_flops(model, (3, 224, 224))
        print(
            f"{name}: {count_params(model):,} params, {flops.gflops_paper:.2f} GFLOPs paper "
            f"convention / {flops.gflops_complete:.2f} complete at 224x224"
        )
    with torch.inference_mode():
        out = model.forward_with_details(torch.randn(1, 3, 224, 224))
    print(
        f"micro: logits {tuple(out.logits.shape)}, {len(out.rois)} RoI updates, "
        f"{len(out.sampling_points)} sampling steps"
    )
    return 0
