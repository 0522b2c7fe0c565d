"""``sparseformer info``: parameters, FLOPs (both conventions) and a per-op breakdown."""

from __future__ import annotations

import argparse
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from sparseformer.cli.common import count, image_size, positive_int

    p = sub.add_parser("info", help="parameter and FLOP summary of a model", description=__doc__)
    p.add_argument(
        "name",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="model name (see `sparseformer models`), or a checkpoint file (as --checkpoint); "
        "with --checkpoint, default: the model a `sparseformer train` checkpoint names",
    )
    p.add_argument("--model", default=None, help="the same as MODEL, as the other commands take it")
    p.add_argument(
        "--img-size",
        type=image_size,
        nargs="+",
        default=None,
        metavar="S",
        help="input size: S, or H W of one input (default: the size a `sparseformer train` "
        "checkpoint stores, else 224)",
    )
    p.add_argument(
        "--num-classes",
        type=count,
        default=None,
        help="classifier outputs to count (default: the checkpoint's, else the model's); "
        "another number than a checkpoint's counts a fresh classifier",
    )
    p.add_argument(
        "--num-frames",
        "--frames",
        type=positive_int,
        default=None,
        metavar="T",
        help="clip length of a video model (default: the checkpoint's clips, else the model's)",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        metavar="PATH",
        help="count the model as this checkpoint builds it (its classes and token replicates)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from sparseformer import count_flops, count_params, create_model
    from sparseformer.cli import CliError
    from sparseformer.cli.common import model_and_read_checkpoint
    from sparseformer.data.scan import first_names
    from sparseformer.engine.video import is_video_model
    from sparseformer.weights.build import embedding_width, naming_their_model, require_sparseformer
    from sparseformer.weights.checkpoint import check_model, read_checkpoint
    from sparseformer.weights.reading import CHECKPOINT_SUFFIXES
    from sparseformer.weights.registry import MODELS, split_tag

    if args.name is not None and args.checkpoint is None and Path(args.name).is_file():
        args.name, args.checkpoint = None, args.name  # `info FILE`: the model the file names
    elif args.name is not None and Path(args.name).suffix.lower() in CHECKPOINT_SUFFIXES:
        raise CliError(f"{args.name!r}: no such file (info takes a model name or a checkpoint)")
    elif (
        args.name is not None and Path(args.name).is_dir() and split_tag(args.name)[0] not in MODELS
    ):
        read_checkpoint(args.name)  # a run folder: says which of its files to give
    if args.name is not None and args.model is not None and args.name != args.model:
        raise CliError(f"two models given: {args.name} and --model {args.model}; give one")
    args.model = args.model or args.name
    args.model, read = model_and_read_checkpoint(args)
    require_sparseformer(args.model, "info")
    ckpt = read if read is not None or args.checkpoint is None else read_checkpoint(args.checkpoint)
    if ckpt is not None:  # a video model takes its image model's checkpoint, inflated
        check_model(ckpt, args.model)
        if ckpt.ema_scored_best:  # the weights that scored (the counts are the same)
            ckpt = read_checkpoint(ckpt, prefer_ema=True)
    if args.img_size is None:  # what a run of ours trained on, if it says (as export)
        args.img_size = [(ckpt and ckpt.img_size) or 224]
    if len(args.img_size) > 2:
        raise CliError(f"--img-size takes S or H W, got {len(args.img_size)} numbers")
    if args.num_frames is not None and not is_video_model(args.model):
        raise CliError(f"--num-frames is for video models; {args.model} takes images")
    h, w = (args.img_size * 2)[:2]
    if args.num_frames is None and ckpt is not None and is_video_model(args.model):
        args.num_frames = ckpt.num_frames
    extra = {"num_frames": args.num_frames} if args.num_frames is not None else {}
    with torch.device("cpu"), naming_their_model(ckpt, args.model):
        model = create_model(
            args.model, checkpoint_path=ckpt, num_classes=args.num_classes, **extra
        )
    # video models take (3, T, H, W) clips of their configured number of frames
    frames = (getattr(model.config, "num_frames", None),) if model.roi_dims == 3 else ()
    flops = count_flops(model, (3, *frames, h, w))
    shape = "x".join(str(d) for d in (3, *frames, h, w))
    print(f"{args.model}: {count_params(model):,} parameters, input {shape}")
    if ckpt is not None:
        names = ckpt.class_names or ()
        shown = f" ({first_names(names, quote=False)})" if names else ""
        if ckpt.num_classes and model.num_classes != ckpt.num_classes:  # --num-classes
            shown = f" (a fresh classifier: the checkpoint's has {ckpt.num_classes} classes)"
            shown = shown if model.num_classes else " (no classifier: the features)"
        width = embedding_width(model, args.model, names)
        outputs = f"a {width}-d embedding" if width else f"{model.num_classes} classes{shown}"
        print(f"checkpoint: {ckpt.report.summary()}, {outputs}")
    print(
        f"GFLOPs (multiply-adds): {flops.gflops_paper:.3f} paper convention (without baddbmm), "
        f"{flops.gflops_complete:.3f} complete"
    )
    print(flops.table())
    return 0
