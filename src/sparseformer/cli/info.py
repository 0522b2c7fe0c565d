"""``sparseformer info``: parameters, FLOPs (both conventions) and a per-op breakdown."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="parameter and FLOP summary of a model", description=__doc__)
    p.add_argument("model", help="model name (see `sparseformer models`)")
    p.add_argument(
        "--img-size",
        type=int,
        nargs="+",
        default=[224],
        metavar="S",
        help="input size: S or H W (default 224)",
    )
    p.add_argument("--num-classes", type=int, default=None)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from sparseformer import count_flops, count_params, create_model

    h, w = (args.img_size * 2)[:2]
    with torch.device("cpu"):
        model = create_model(args.model, num_classes=args.num_classes)
    # video models take (3, T, H, W) clips of their configured number of frames
    frames = (getattr(model.config, "num_frames", None),) if model.roi_dims == 3 else ()
    flops = count_flops(model, (3, *frames, h, w))
    shape = "x".join(str(d) for d in (3, *frames, h, w))
    print(f"{args.model}: {count_params(model):,} parameters, input {shape}")
    print(
        f"GFLOPs (multiply-adds): {flops.gflops_paper:.3f} paper convention (fvcore-style), "
        f"{flops.gflops_complete:.3f} complete"
    )
    print(flops.table())
    return 0
