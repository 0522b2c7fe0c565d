"""``sparseformer predict``: the top classes and probabilities of a model for each image.

Class names come from the checkpoint (ours store them), or ImageNet's for 1000-class weights.
A file that cannot be used is reported and the others are classified; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    from sparseformer.cli.train import add_clip_arguments, positive_int

    p = sub.add_parser(
        "predict",
        help="classify images with a checkpoint",
        description=__doc__,
        epilog="example:\n  sparseformer predict --model sparseformer_v1_tiny --checkpoint "
        "sparseformer_t_imagenet1k.pth photo.jpg --topk 5",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="the model the checkpoint belongs to")
    p.add_argument("--checkpoint", type=Path, required=True, help="ours or an official release")
    p.add_argument(
        "images",
        nargs="+",
        type=Path,
        metavar="IMAGE",
        help="images, or video files for a video model",
    )
    p.add_argument("--topk", type=positive_int, default=5, help="classes to show per image")
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


def class_names(info: dict, num_classes: int) -> list[str]:
    """The checkpoint's class names, ImageNet's for 1000 classes, else ``class N``."""
    names = info.get("class_names")
    if names and len(names) == num_classes:
        return list(names)
    if num_classes == 1000:
        from timm.data import ImageNetInfo

        imagenet = ImageNetInfo()
        return [imagenet.index_to_description(i) for i in range(1000)]
    return [f"class {i}" for i in range(num_classes)]


def _video_spec(model, info: dict, pre, args: argparse.Namespace):
    """Clip sampling for a video model: the flags, else the training run's, sized by its
    preprocessing, with ``--clips x --crops`` test views."""
    import dataclasses

    from sparseformer.data.video import ClipSpec

    saved = dict(info.get("video") or {"num_frames": model.config.num_frames})
    for key in ("scale", "mean", "std"):
        if key in saved:
            saved[key] = tuple(saved[key])
    asked = {"num_frames": args.frames, "stride": args.frame_stride, "sampling": args.sampling}
    return dataclasses.replace(
        ClipSpec(**saved),
        **{k: v for k, v in asked.items() if v is not None},
        size=pre.img_size,
        crop_pct=pre.crop_pct,
        mean=tuple(pre.mean),
        std=tuple(pre.std),
        num_clips=args.clips,
        num_crops=args.crops,
    )


def _expand(paths: list[Path], video: bool) -> list[Path]:
    """Files as given, folders as the video files (``video``) or image files under them
    (sorted).

    Raises:
        CliError: a path that does not exist, or a folder without files of the kind.
    """
    from sparseformer.cli import CliError
    from sparseformer.data.images import IMAGE_EXTENSIONS
    from sparseformer.data.scan import walk_files, warn_other_extensions
    from sparseformer.data.video import VIDEO_EXTENSIONS

    media = VIDEO_EXTENSIONS if video else IMAGE_EXTENSIONS
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            ignored: list[Path] = []  # the folder's other files, walked once
            found = sorted(walk_files(path, media, ignored))  # broken links: reported, not lost
            kind = "video" if video else "image"
            if not found:
                others = tuple(e.lower() for e in (IMAGE_EXTENSIONS if video else VIDEO_EXTENSIONS))
                hint = ""
                if any(p.name.lower().endswith(others) for p in ignored):
                    found_kind, use = ("images", "an image") if video else ("videos", "a video")
                    hint = f"; it holds {found_kind}: use {use} model"
                raise CliError(
                    f"folder {str(path)!r} holds no {kind} files (extensions "
                    f"{', '.join(media)}){hint}"
                )
            warn_other_extensions(ignored, kind, media)
            files += found
        elif path.exists():
            files.append(path)
        else:
            raise CliError(f"{str(path)!r} does not exist")
    return files


def _skip(path: Path, why: str, as_json: bool) -> int:
    """Report a file that gets no prediction: on stderr, and with ``--json`` also as a record
    on stdout (``{"image": ..., "error": ...}``) so that a script sees every input. Returns 1."""
    print(f"{path}: {why}; skipped", file=sys.stderr)
    if as_json:
        print(json.dumps({"image": str(path), "error": why}))
    return 1


def run(args: argparse.Namespace) -> int:
    import torch

    from sparseformer.cli import CliError
    from sparseformer.cli.train import is_video_model, refuse_video_flags_on_images
    from sparseformer.data import Preprocessing, build_transform
    from sparseformer.data.images import IMAGE_EXTENSIONS, READ_ERRORS, open_rgb
    from sparseformer.data.video import VIDEO_EXTENSIONS
    from sparseformer.engine import session
    from sparseformer.engine.distributed import DistInfo
    from sparseformer.engine.loop import BatchPrep
    from sparseformer.engine.modeling import check_model_name

    check_model_name(args.model)  # an unknown name fails before anything is read
    video_model = is_video_model(args.model)
    refuse_video_flags_on_images(args, video_model, why=f"{args.model} takes images")
    args.images = _expand(args.images, video_model)  # every path checked before the model
    device = session.pick_device(args.device)
    session.set_threads(args.threads, DistInfo())
    model, info = session.model_from_checkpoint(args.model, args.checkpoint, prefer_ema=args.ema)
    model.to(device)
    pre = (
        Preprocessing.from_dict(info["preprocessing"])
        if "preprocessing" in info
        else session.weights_preprocessing(args.model)
    )
    names = class_names(info, info["num_classes"])
    transform = build_transform(pre, None)
    prep = BatchPrep(pre.mean, pre.std, torch.device(device))
    k = min(args.topk, len(names))
    failed = 0
    video = _video_spec(model, info, pre, args) if video_model else None
    for path in args.images:
        if path.suffix.lower() in (IMAGE_EXTENSIONS if video_model else VIDEO_EXTENSIONS):
            if video_model:
                why = f"an image, but {args.model} is a video model; use an image model"
            else:
                why = f"a video, but {args.model} is an image model; use a video model"
            failed += _skip(path, f"{why} (`sparseformer models` lists them)", args.json)
            continue
        if path.is_symlink() and not path.exists():  # listed in a folder, its target gone
            failed += _skip(path, "a broken symbolic link", args.json)
            continue
        if video is not None:  # a video model reads video files (views averaged)
            from sparseformer.data.video import VideoDataError, VideoReadError, VideoTooShortError
            from sparseformer.engine.video import predict_video_file

            if not path.exists():
                raise CliError(f"video {str(path)!r} does not exist")
            try:
                probs = predict_video_file(model, str(path), video, device)
            except (VideoReadError, VideoDataError) as exc:
                short = isinstance(exc, VideoTooShortError)
                hint = f"; {video.shorter_clips_hint}" if short else ""
                failed += _skip(path, f"cannot use this video ({exc}){hint}", args.json)
                continue
        else:
            try:
                img = open_rgb(path)
            except FileNotFoundError:
                raise CliError(f"image {str(path)!r} does not exist") from None
            except READ_ERRORS as exc:
                why = f"cannot read this image ({exc.__class__.__name__}: {exc})"
                failed += _skip(path, why, args.json)
                continue
            x, _ = prep(
                torch.as_tensor(transform(img))[None], torch.zeros(1, dtype=torch.long), False
            )
            with torch.inference_mode():
                probs = model(x).float().softmax(dim=-1)[0]
        top = probs.topk(k)
        preds = [
            {"label": names[i], "index": int(i), "probability": float(p)}
            for p, i in zip(top.values.tolist(), top.indices.tolist())
        ]
        if args.json:
            print(json.dumps({"image": str(path), "predictions": preds}))
        else:
            print(f"{path}:")
            for pred in preds:
                print(f"  {100 * pred['probability']:6.2f}%  {pred['label']}")
    return 1 if failed else 0  # the others are classified all the same
