"""``sparseformer predict``: the top classes and probabilities of a model for each image.

Class names come from the checkpoint (ours store them), or ImageNet's for 1000-class weights.
A file that cannot be used is reported and the others are classified; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from sparseformer.cli.common import (
    MODEL_FROM_CHECKPOINT,
    add_clip_arguments,
    clip_flags,
    for_terminal,
    model_and_read_checkpoint,
    positive_int,
    refuse_video_flags_on_images,
    skip_file,
    wrong_kind,
)

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "predict",
        help="classify images with a checkpoint",
        description=__doc__,
        epilog="example:\n  sparseformer predict --model sparseformer_v1_tiny --checkpoint "
        "sparseformer_t_imagenet1k.pth photo.jpg --topk 5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help=MODEL_FROM_CHECKPOINT)
    p.add_argument("--checkpoint", type=Path, required=True, help="ours or an official release")
    p.add_argument(
        "images",
        nargs="+",
        type=Path,
        metavar="IMAGE",
        help="images (video files for a video model), folders of them, or quoted patterns "
        "('imgs/*.jpg')",
    )
    p.add_argument(
        "--topk", type=positive_int, default=5, help="classes to show per image (default 5)"
    )
    p.add_argument("--ema", action="store_true", help="use the EMA weights of the checkpoint")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: the free cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object per image")
    p.add_argument(
        "--clips", type=positive_int, default=1, help="video models: clips per video (averaged)"
    )
    p.add_argument(
        "--crops", type=int, choices=(1, 3), default=1, help="video models: crops per clip"
    )
    add_clip_arguments(p, prefix="video models: ")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from sparseformer.cli import CliError
    from sparseformer.data import DataError, build_transform
    from sparseformer.data.media import expand_media_paths
    from sparseformer.engine.device import pick_device, set_threads
    from sparseformer.engine.distributed import DistInfo
    from sparseformer.engine.inputs import checkpoint_preprocessing, class_names
    from sparseformer.engine.loop import BatchPrep
    from sparseformer.engine.video import is_video_model, prediction_clip_spec
    from sparseformer.layers.linear import packed_weights
    from sparseformer.models.outputs import NON_FINITE_OUTPUTS
    from sparseformer.weights.build import (
        check_model_name,
        classes_problem,
        model_from_checkpoint,
    )

    args.model, read = model_and_read_checkpoint(args)
    check_model_name(args.model)  # an unknown name fails before anything is read
    video_model = is_video_model(args.model)
    refuse_video_flags_on_images(args, video_model, why=f"{args.model} takes images")
    try:  # every path checked before the model
        args.images = expand_media_paths(args.images, video_model)
    except DataError as exc:
        raise CliError(str(exc)) from None
    device = pick_device(args.device)
    set_threads(args.threads, DistInfo())
    source = read if read is not None else args.checkpoint
    model, ckpt = model_from_checkpoint(args.model, source, prefer_ema=args.ema)
    info = ckpt.run_info()  # what the checkpoint says about itself
    problem = classes_problem(model, args.model, info.get("class_names"))
    if problem:  # predict ranks classes
        raise CliError(problem)
    model.to(device)
    pre = checkpoint_preprocessing(info, args.model)
    names = class_names(info, info["num_classes"])
    transform = build_transform(pre, None)
    prep = BatchPrep(pre.mean, pre.std, torch.device(device))
    video = None
    if video_model:
        video = prediction_clip_spec(model, info, pre, clip_flags(args), args.clips, args.crops)
    failed = 0
    with packed_weights():  # each weight laid out for the kernel once, not once per image
        for path in args.images:
            why = wrong_kind(path, args.model, video_model)
            if why is None:
                probs, why = _probabilities(model, path, video, transform, prep, device)
            if why is None and not bool(probs.isfinite().all()):  # a diverged run's weights
                why = NON_FINITE_OUTPUTS
            if why is not None:
                failed += skip_file(path, why, args.json)
                continue
            _print_top(path, probs, names, min(args.topk, len(names)), args.json)
    return 1 if failed else 0  # the others are classified all the same


def _probabilities(model, path: Path, video, transform, prep, device: str):
    """``(class probabilities, None)``, or ``(None, why)`` for a file that cannot be used.

    Raises:
        CliError: a file that does not exist.
    """
    import torch

    from sparseformer.cli import CliError
    from sparseformer.data.images import READ_ERRORS, open_rgb

    if video is not None:  # a video model reads video files (views averaged)
        from sparseformer.data.video import VideoDataError, VideoReadError, VideoTooShortError
        from sparseformer.engine.video import predict_video_file

        if not path.exists():
            raise CliError(f"video {str(path)!r} does not exist")
        try:
            return predict_video_file(model, str(path), video, device), None
        except (VideoReadError, VideoDataError) as exc:
            short = isinstance(exc, VideoTooShortError)
            hint = f"; {video.shorter_clips_hint}" if short else ""
            why = str(exc).removeprefix(f"{path}: ")  # the line names the file already
            return None, f"cannot use this video ({why}){hint}"
    try:
        img = open_rgb(path)
    except FileNotFoundError:
        raise CliError(f"image {str(path)!r} does not exist") from None
    except READ_ERRORS as exc:
        why = str(exc).removeprefix(f"{path}: ")  # the line names the file already
        return None, f"cannot read this image ({exc.__class__.__name__}: {why})"
    x, _ = prep(torch.as_tensor(transform(img))[None], torch.zeros(1, dtype=torch.long), False)
    with torch.inference_mode():
        return model(x).float().softmax(dim=-1)[0], None


def _print_top(path: Path, probs, names: list[str], k: int, as_json: bool) -> None:
    top = probs.topk(k)
    preds = [
        {"label": names[i], "index": int(i), "probability": float(p)}
        for p, i in zip(top.values.tolist(), top.indices.tolist())
    ]
    if as_json:
        print(json.dumps({"image": str(path), "predictions": preds}))
    else:
        print(f"{for_terminal(str(path))}:")
        for pred in preds:
            print(f"  {100 * pred['probability']:6.2f}%  {for_terminal(pred['label'])}")
