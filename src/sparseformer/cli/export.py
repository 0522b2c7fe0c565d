"""``sparseformer export``: a model as ONNX with a dynamic batch and size, checked with
onnxruntime.

The graph takes normalised images (batch, 3, H, W), or clips (batch, 3, T, H, W) for a video
model (T fixed), and returns logits. Before it replaces --out, the graph is run by onnxruntime at
two batch sizes and at a second size, and the largest difference from PyTorch is printed (more
than 1e-3 fails the command).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    from sparseformer.cli.common import count, image_size, positive_int

    p = sub.add_parser(
        "export", help="export a model to ONNX (any batch and size)", description=__doc__
    )
    p.add_argument(
        "--model",
        help="SparseFormer name (see `sparseformer models`); default: the one a "
        "`sparseformer train` checkpoint names",
    )
    p.add_argument("--checkpoint", default=None, metavar="PATH", help="weights to load")
    p.add_argument(
        "--out",
        "--output",  # train's name for where it writes
        dest="out",
        required=True,
        metavar="PATH",
        help="output .onnx file (replaces an existing one)",
    )
    p.add_argument(
        "--img-size",
        type=image_size,
        default=None,
        metavar="S",
        help="example input size (the graph takes any; default: the one a `sparseformer train` "
        "checkpoint stores, else 224)",
    )
    p.add_argument(
        "--num-frames",
        "--frames",
        type=int,
        default=None,
        metavar="T",
        help="clip length of a video model (default: the checkpoint's clips, else the model's, 8)",
    )
    p.add_argument(
        "--num-classes",
        type=count,
        default=None,
        help="classifier width without --checkpoint (default: the model's own, 1000 for the "
        "v1 models; with one: the checkpoint's, and another is refused)",
    )
    p.add_argument(
        "--opset",
        type=int,
        default=None,
        help="ONNX opset (18 or later, up to the installed onnx's; default 18 for images, 20 "
        "for video models)",
    )
    p.add_argument("--ema", action="store_true", help="export the checkpoint's EMA weights")
    p.add_argument(
        "--threads", type=positive_int, help="CPU threads, also onnxruntime's (default: free cores)"
    )
    p.add_argument(
        "--check-batch-sizes",
        type=positive_int,
        nargs="+",
        default=[1, 3],
        metavar="B",
        help="batch sizes to compare PyTorch and onnxruntime at (default 1 3)",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sparseformer.bench.throughput import sample_shape
    from sparseformer.cli import CliError
    from sparseformer.cli.common import model_and_read_checkpoint
    from sparseformer.config import VideoSparseFormerConfig
    from sparseformer.engine.device import set_threads
    from sparseformer.engine.distributed import DistInfo
    from sparseformer.export import (
        VIDEO_MIN_OPSET,
        ExportError,
        check_export_settings,
        export_onnx,
    )
    from sparseformer.weights.build import naming_their_model, require_sparseformer
    from sparseformer.weights.checkpoint import check_model, read_checkpoint
    from sparseformer.weights.factory import create_model, get_model_spec

    set_threads(args.threads, DistInfo())  # onnxruntime's checks take torch's number
    args.model, read = model_and_read_checkpoint(args)
    require_sparseformer(args.model, "export")
    _check_out(args.out)
    if args.ema and args.checkpoint is None:
        raise CliError("--ema exports a checkpoint's EMA weights: give --checkpoint too")
    video = isinstance(get_model_spec(args.model).config, VideoSparseFormerConfig)
    try:  # before any checkpoint is read or model built
        opset = args.opset if args.opset is not None else (VIDEO_MIN_OPSET if video else 18)
        check_export_settings(opset, args.img_size or 224, 1 if video else None)
    except ExportError as exc:
        raise CliError(str(exc).replace("img_size", "--img-size")) from None
    ckpt = read if read is not None or args.checkpoint is None else read_checkpoint(args.checkpoint)
    if ckpt is not None:  # a video model takes its image model's checkpoint, inflated
        check_model(ckpt, args.model)
    trained = ckpt.num_classes if ckpt is not None else 0
    if trained and args.num_classes is not None and args.num_classes != trained:
        # another width would export a classifier of random weights: not the trained model
        raise CliError(
            f"--num-classes {args.num_classes} differs from the {trained} classes of "
            f"{args.checkpoint}; export exports the trained model: leave --num-classes out (to "
            "train for other classes, fine-tune with `sparseformer train --checkpoint`)"
        )
    if args.img_size is None:  # what a run of ours trained on, if it says
        args.img_size = (ckpt and ckpt.img_size) or 224
    if args.num_frames is None and video and ckpt is not None:
        args.num_frames = ckpt.num_frames
    if args.num_frames is not None and not video:
        raise CliError(f"--num-frames is for video models; {args.model} takes images")
    if args.num_frames is not None and args.num_frames < 1:
        raise CliError(f"--num-frames {args.num_frames}: a clip needs at least 1 frame")
    extra = {"num_frames": args.num_frames} if args.num_frames is not None else {}
    if ckpt is not None and args.ema:  # the EMA weights of the same file (warned if none)
        ckpt = read_checkpoint(ckpt, prefer_ema=True)
    with naming_their_model(ckpt, args.model):
        model = create_model(
            args.model, checkpoint_path=ckpt, num_classes=args.num_classes, **extra
        )
    model.eval()
    if ckpt is None:
        print(f"no --checkpoint: {args.model} exports with untrained (random) weights")
    shape = sample_shape(model, args.img_size)  # (3, S, S) or (3, T, S, S)
    num_frames = shape[1] if video else None
    try:
        path = export_onnx(
            model, args.out, img_size=args.img_size, opset=opset, num_frames=num_frames,
            check=lambda staged: _compare(staged, model, shape, args.check_batch_sizes),
        )  # fmt: skip
    except ExportError as exc:
        raise CliError(str(exc)) from None
    print(f"wrote {path}")
    return 0


def _check_out(out: str) -> None:
    """``--out``: a file onnxruntime can then run, named ``.onnx`` (an existing one is
    replaced, so a checkpoint given there by mistake is refused)."""
    from sparseformer.cli import CliError, check_output
    from sparseformer.engine.atomic import is_stream

    if out != "-":  # "-" is no file either: said below, not as a name to end in .onnx
        check_output(out, "--out", kinds=(".onnx",))  # nor a link to a checkpoint
    if out == "-" or is_stream(out):  # the file is run by onnxruntime after it is written
        raise CliError(f"--out {out!r}: give a file, which is then checked by running it")
    if Path(out).suffix.lower() != ".onnx":
        raise CliError(
            f"--out {out!r}: export writes ONNX and replaces an existing file; give a name "
            f"ending in .onnx, e.g. {Path(out).with_suffix('.onnx')}"
        )


def _compare(path: Path, model, shape: tuple, batch_sizes: list[int]) -> None:
    """Run the written graph at ``batch_sizes`` and at a non-square size beside PyTorch,
    printing the largest differences; more than ``MAX_DIFFERENCE``, or a NaN (which compares
    with nothing), fails the command before the graph replaces ``--out``."""
    import torch

    from sparseformer.cli import CliError
    from sparseformer.export import MAX_DIFFERENCE, onnx_max_difference

    generator = torch.Generator().manual_seed(0)
    size = shape[-1]
    other = (*shape[:-2], size + 16, max(size - 8, 4))
    checks = [(f"batch {b}", (b, *shape)) for b in batch_sizes]
    diffs = []
    for what, dims in [*checks, (f"{other[-2]} x {other[-1]}", (1, *other))]:
        diff = onnx_max_difference(path, model, torch.randn(dims, generator=generator))
        print(f"{what}: max |onnxruntime - pytorch| = {diff:.2e}")
        diffs.append(diff)
    if any(math.isnan(d) for d in diffs):  # max() would pass over it
        raise CliError(
            "the logits are NaN for random inputs (NaN or infinite weights, or a graph that "
            "makes them): the export cannot be checked; --out is left as it was"
        )
    worst = max(diffs)
    if not worst <= MAX_DIFFERENCE:
        raise CliError(
            f"onnxruntime's logits differ from PyTorch's by {worst:.2e}, more than "
            f"{MAX_DIFFERENCE:g}: the graph does not compute the model; --out is left as it was"
        )
