"""``sparseformer viz``: draw where a model's tokens look on your images.

For each image: ``NAME_rois.png`` (RoIs and sampling points after each sampling stage, side by
side, with the predicted label and the RoI statistics), ``NAME_stages.gif`` (the same stages as
an animation) and ``NAME_roi_stats.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "viz", help="draw RoIs and sampling points of a model on images", description=__doc__
    )
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (any PIL format)")
    p.add_argument("--model", required=True, help="model name (see `sparseformer models`)")
    p.add_argument("--checkpoint", default=None, help="weights file (official or ours)")
    p.add_argument("--out", required=True, help="output directory (created if needed)")
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
        type=int,
        default=None,
        metavar="S",
        help="input side (default: stored in the checkpoint, else the model's, else 224)",
    )
    p.add_argument("--no-gif", action="store_true", help="write only the PNG")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from sparseformer.cli import CliError

    paths = [Path(p) for p in args.images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise CliError(f"image(s) not found: {', '.join(missing)}")
    if args.tokens is not None and args.tokens < 1:
        raise CliError("--tokens must be a positive number of tokens to highlight")
    if args.img_size is not None and args.img_size < 8:
        raise CliError("--img-size must be at least 8 pixels")

    import torch

    from sparseformer.visualize import (
        format_statistics,
        plot_rois,
        prediction_text,
        roi_statistics,
        save_figure,
        save_gif,
        stage_frames,
    )
    from sparseformer.viz_inputs import display_image, load_image, load_model_for_viz, preprocess

    try:
        device = torch.device(args.device)
    except RuntimeError as exc:
        raise CliError(f"unknown --device {args.device!r} ({exc})") from exc
    model, info = load_model_for_viz(args.model, args.checkpoint)
    if getattr(model, "roi_dims", 2) != 2:
        raise CliError(f"{args.model} is a video model; `sparseformer viz` draws image models")
    model.to(device)
    size = args.img_size or info.input_size

    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    used: set[str] = set()
    for path in paths:
        try:
            img = load_image(path, max_side=4 * size)
        except ValueError as exc:
            raise CliError(str(exc)) from exc
        x = preprocess(img, size, info.mean, info.std).to(device)
        with torch.inference_mode():
            output = model.forward_with_details(x)
        num_steps = len(output.sampling_points)
        for stage in args.stages or []:
            if stage not in (0, -1) and not 1 <= stage <= num_steps:
                raise CliError(f"--stages {stage}: {args.model} has sampling stages 1..{num_steps}")
        stem = _unique_stem(path, used)
        shown = display_image(img)
        fig = plot_rois(
            shown,
            output,
            stages=args.stages,
            highlight=args.tokens,
            class_names=info.class_names,
        )
        png = save_figure(fig, out_dir / f"{stem}_rois.png")
        stats = roi_statistics(output)
        (out_dir / f"{stem}_roi_stats.json").write_text(json.dumps(stats, indent=1) + "\n")
        print(f"{path}: {prediction_text(output.logits[0], info.class_names)} -> {png}")
        if not args.no_gif:
            frames = stage_frames(
                shown,
                output,
                stages=args.stages,
                highlight=args.tokens,
                class_names=info.class_names,
            )
            print(f"  {save_gif(frames, out_dir / f'{stem}_stages.gif')}")
        print("  " + format_statistics(stats).replace("\n", "\n  "))
    return 0


def _unique_stem(path: Path, used: set[str]) -> str:
    stem, k = path.stem, 1
    while stem in used:
        k += 1
        stem = f"{path.stem}_{k}"
    used.add(stem)
    return stem
