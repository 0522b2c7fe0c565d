"""sparseformer viz: draw where a model's tokens look on your images (or videos).

For each image: NAME_rois.png (RoIs and sampling points after each sampling stage, side by side,
with the predicted label and the RoI statistics), NAME_stages.gif (the same stages as an
animation) and NAME_roi_stats.json. With a video model, each input is a video file:
NAME_frames.png shows the RoIs on each frame of the clip and NAME_frames.gif plays them.
A file that cannot be read is reported and the others are drawn; the exit status is 1 only
when nothing could be drawn.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from sparseformer.cli.common import add_clip_arguments, for_terminal, image_size, positive_int


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "viz", help="draw RoIs and sampling points of a model on images", description=__doc__
    )
    p.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="image files (any PIL format), or folders of them; video files for a video model",
    )
    p.add_argument(
        "--model",
        default=None,
        help="model name (see `sparseformer models`); default: the one a checkpoint of "
        "`sparseformer train` names",
    )
    p.add_argument("--checkpoint", default=None, help="weights file (official or ours)")
    p.add_argument("--ema", action="store_true", help="draw the checkpoint's EMA weights")
    p.add_argument("--out", "--output", dest="out", required=True,
                   help="output directory (created if needed)")  # fmt: skip
    p.add_argument(
        "--tokens",
        type=int,
        default=None,
        metavar="K",
        help="highlight the K tokens with the largest final norm (others drawn faint)",
    )
    p.add_argument(
        "--stages",
        type=int,
        nargs="+",
        default=None,
        metavar="S",
        help="sampling stages to draw, from 1 (0: initial RoIs, -1: final RoIs); default all",
    )
    p.add_argument(
        "--img-size",
        type=image_size,
        default=None,
        metavar="S",
        help="input side (default: stored in the checkpoint, else the model's, else 224)",
    )
    p.add_argument("--no-gif", action="store_true", help="write only the PNG")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda, cuda:N or mps")
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: the free cores)")
    add_clip_arguments(p, prefix="video models: ")
    p.set_defaults(func=run, clips=1, crops=1)  # one clip, drawn: the centre one


def run(args: argparse.Namespace) -> int:
    from sparseformer.cli import CliError, check_output
    from sparseformer.data.folder import DataError
    from sparseformer.data.media import expand_media_paths, expand_patterns

    paths = [Path(p) for p in args.images]
    try:  # a pattern no shell expanded (quoted, or on Windows) that matches nothing: said now,
        found = expand_patterns(paths, folders=True)  # before the model; taken as predict does
    except DataError as exc:  # below, once the model says which files are its inputs
        raise CliError(str(exc)) from None
    missing = [str(p) for p in found if not p.exists()]
    if missing:
        raise CliError(f"file(s) not found: {', '.join(missing)}")
    check_output(args.out, "--out", folder=True)
    if args.tokens is not None and args.tokens < 1:
        raise CliError("--tokens must be a positive number of tokens to highlight")
    if args.img_size is not None and args.img_size < 8:
        raise CliError("--img-size must be at least 8 pixels")

    import dataclasses

    import torch

    from sparseformer.cli.common import refuse_video_flags_on_images
    from sparseformer.engine.device import pick_device, set_threads
    from sparseformer.engine.distributed import DistInfo
    from sparseformer.viz.figures import name_ends
    from sparseformer.viz.inputs import load_model_for_viz
    from sparseformer.weights.build import require_sparseformer

    try:
        device = torch.device(pick_device(args.device, allow_mps=True))
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    set_threads(args.threads, DistInfo())
    if args.model is None and args.checkpoint is None:
        raise CliError("pass --model NAME (and --checkpoint PATH for trained weights)")
    if args.model is not None:  # a timm model has no RoIs to draw: said as such
        require_sparseformer(args.model, "viz")
    try:
        model, info = load_model_for_viz(args.model, args.checkpoint, prefer_ema=args.ema)
    except ValueError as exc:  # CheckpointError and UnknownModelError print as they are
        if type(exc) is not ValueError:
            raise
        raise CliError(str(exc)) from exc
    model.to(device)
    if args.checkpoint is None:  # RoIs and labels of no trained model
        print(f"no --checkpoint: {args.model} draws with untrained (random) weights")
    if args.img_size:
        info = dataclasses.replace(info, input_size=args.img_size)
    video = getattr(model, "roi_dims", 2) == 3
    refuse_video_flags_on_images(args, video, why=f"{args.model or 'the model'} takes images")
    try:  # a folder: the images (or videos, for a video model) under it, as predict takes it
        paths = expand_media_paths(paths, video)
    except DataError as exc:
        raise CliError(str(exc)) from None
    used, ends = set(), name_ends(video, args.stages)  # stems taken; each input's files' ends
    drawn = sum(_draw(path, model, info, video, args, (used, ends)) for path in paths)
    return 0 if drawn else 1  # the files skipped are listed above, one line each


def _draw(path: Path, model, info, video: bool, args: argparse.Namespace, stems) -> bool:
    """Draw ``path``'s pictures into ``args.out`` and say so; ``False``: it was skipped (said
    on one line). ``stems``: the stems taken so far and the files' ends (:func:`_unique_stem`)."""
    from sparseformer.cli import CliError
    from sparseformer.cli.common import clip_flags, skip_file, wrong_kind
    from sparseformer.models.outputs import NonFiniteOutputError
    from sparseformer.viz.figures import format_statistics, write_pictures, write_video_pictures

    why = wrong_kind(path, args.model or "the model", video)  # a checkpoint's own: checked
    if why is None:
        picture, why = _read_input(path, model, info, video, clip_flags(args))
    if why is not None:
        skip_file(path, why)
        return False
    options = {"stages": args.stages, "highlight": args.tokens, "gif": not args.no_gif}
    try:
        result = (write_video_pictures if video else write_pictures)(
            model, picture, args.out, _unique_stem(path, *stems), info=info, **options
        )
    except NonFiniteOutputError as exc:  # as predict says of it: skipped, the others drawn
        skip_file(path, str(exc))
        return False
    except (ValueError, OSError) as exc:  # a stage the model lacks, an unwritable --out
        raise CliError(str(exc)) from exc
    print(for_terminal(f"{path}: {result.label}"))  # a file name cannot clear the screen
    for file in result.files:
        print(for_terminal(f"  wrote {file}"))
    print("  " + format_statistics(result.stats).replace("\n", "\n  "))
    return True


def _read_input(path: Path, model, info, video: bool, asked: dict):
    """``(image or clip, None)``, or ``(None, why)`` for a file that cannot be read; a clip
    is sampled as predict and eval sample it (``asked``: the clip flags)."""
    from sparseformer.viz.inputs import load_image

    if video:
        return _read_clip(path, model, info, asked)
    try:
        return load_image(path, max_side=4 * info.input_size), None
    except (ValueError, OSError) as exc:  # unreadable, cut short
        return None, str(exc).removeprefix(f"{path}: ")  # the readers' "PATH: why"


def _read_clip(path: Path, model, info, asked: dict):
    """``(clip, None)``: the centre test clip of a video, ``(T, H, W, 3)``, with frames,
    stride and sampling as asked, else as the checkpoint was trained, else the model's frames,
    dense, stride 4; or ``(None, why)``."""
    from sparseformer.data.video import VideoTooShortError, read_test_clips
    from sparseformer.engine.video import choose_clip_spec

    spec = choose_clip_spec(None, asked, info.clip or {"num_frames": model.config.num_frames})
    try:
        return read_test_clips(path, spec), None
    except (ValueError, OSError) as exc:  # unreadable, cut short, shorter than a clip
        hint = f"; {spec.shorter_clips_hint}" if isinstance(exc, VideoTooShortError) else ""
        return None, str(exc).removeprefix(f"{path}: ") + hint


# the bytes of a file name on the file systems we write to (ext4, APFS, NTFS, tmpfs)
_NAME_MAX = 255


def _unique_stem(path: Path, used: set[str], ends: list[str]) -> str:
    """A stem for ``path``'s pictures that no earlier input took and that fits, with each of
    ``ends`` (:func:`~sparseformer.viz.figures.name_ends`), in a file name, as does the
    temporary each is written under."""
    from sparseformer.engine.atomic import temporary_for

    room = _NAME_MAX - max(len(os.fsencode(temporary_for(Path(end)).name)) for end in ends)
    stem, k = _fitting(path.stem, room), 1
    while stem in used:
        k += 1
        stem = _fitting(f"{path.stem}_{k}", room)
    used.add(stem)
    return stem


def _fitting(stem: str, room: int) -> str:
    """``stem``, or where it takes more than ``room`` bytes (a legal name of 245 bytes does,
    with _roi_stats.json), its start and a hash of the whole, which keeps it apart."""
    import hashlib

    if len(os.fsencode(stem)) <= room:
        return stem
    kept, size = [], 0
    for char in stem:  # whole characters (a surrogate-escaped byte is one)
        size += len(os.fsencode(char))
        if size > room - 9:
            break
        kept.append(char)
    return "".join(kept) + "~" + hashlib.sha1(os.fsencode(stem)).hexdigest()[:8]
