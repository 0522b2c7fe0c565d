"""``sparseformer eval``: top-1 / top-5 accuracy and loss of a checkpoint on a validation set.

The checkpoint may be one of ours (``last.pt`` / ``best.pt``; its preprocessing is reused) or
an official SparseFormer release in either layout (ImageNet release or library v2).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

from sparseformer.cli.common import (
    MODEL_FROM_CHECKPOINT,
    add_data_arguments,
    check_model_fits_data,
    count,
    data_source,
    image_size,
    model_and_read_checkpoint,
    positive_int,
    refuse_video_flags_on_images,
)

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint: top-1/top-5 and loss",
        description=__doc__,
        epilog="example:\n  sparseformer eval --model sparseformer_v1_micro --checkpoint "
        "runs/demo/best.pt --dataset fashion-mnist",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", help=MODEL_FROM_CHECKPOINT)
    p.add_argument("--checkpoint", type=Path, required=True, help="ours or an official release")
    add_data_arguments(p, train=False)
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of the checkpoint")
    p.add_argument("--img-size", type=image_size, help="input size (default: the checkpoint's)")
    p.add_argument(
        "--batch-size",
        type=positive_int,
        default=256,
        help="images, or clips, per batch: a video with V test views counts V (default 256)",
    )
    p.add_argument(
        "--workers",
        type=count,
        help="data-loading processes (default: 8, at most the cores, on a GPU; 0 on the CPU, "
        "where the model needs the cores)",
    )
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32",
                   help="autocast precision (default fp32)")  # fmt: skip
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: the free cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--per-class",
        type=Path,
        metavar="DIR",
        help="also write DIR/per_class.json (each class's images and top-1, the confusion "
        "matrix) and DIR/confusion.png (with the class names)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


# what a refusal adds for a released ImageNet-1K classifier, which names no classes
_IMAGENET_FOLDERS = (
    " (an ImageNet-1K classifier's classes are ImageNet's synset ids: class folders named "
    "n01440764 ... n15075141, any subset, as in ImageNet's own val/ layout, or all 1000 of "
    "0 ... 999 as in ImageNetV2's: a few numbered folders are taken for a data set's own classes)"
)


def run(args: argparse.Namespace) -> int:
    import torch

    from sparseformer.cli import CliError, check_output
    from sparseformer.data import DataError, build_datasets
    from sparseformer.data.relabel import RelabelledDataset
    from sparseformer.engine.device import pick_device, set_threads
    from sparseformer.engine.distributed import DistInfo
    from sparseformer.engine.inputs import check_input_size, evaluation_preprocessing
    from sparseformer.engine.trainer import TrainingError, amp_dtype_for
    from sparseformer.weights.build import check_model_name, model_from_checkpoint
    from sparseformer.weights.checkpoint import read_checkpoint

    args.model, ckpt = model_and_read_checkpoint(args)
    check_model_name(args.model)  # an unknown name fails before any data is read
    if args.per_class is not None:  # before the evaluation, not after it
        check_output(args.per_class, "--per-class", folder=True)
    # before the data folder is scanned
    refuse_video_flags_on_images(args, check_model_fits_data(args.model, args))
    ckpt = ckpt if ckpt is not None else read_checkpoint(args.checkpoint)
    saved = ckpt.run_info()  # what the checkpoint says about itself
    try:
        device = pick_device(args.device)
        # clips as the checkpoint was trained with, unless the flags say otherwise
        video_record = saved.get("video") if isinstance(saved.get("video"), dict) else None
        source = data_source(args, saved=video_record)
        amp = amp_dtype_for(args.precision, device)
    except (DataError, ValueError, TrainingError) as exc:
        raise CliError(str(exc)) from exc
    set_threads(args.threads, DistInfo())
    # preprocessing: the checkpoint's own, else the data set's, else the released weights'
    pre = evaluation_preprocessing(saved, source, args.model, args.img_size)
    saved_names = saved.get("class_names")
    saved_size = ckpt.img_size
    del saved
    try:
        bundle = build_datasets(source, pre, None, need_train=False)
    except DataError as exc:
        raise CliError(str(exc)) from exc
    if not bundle.video:  # a video's views are said with the result
        logging.getLogger(__name__).info("preprocessing: %s", pre.describe())
    try:
        mapping, refused = _label_map(saved_names, ckpt.num_classes, bundle.class_names), None
    except CliError as exc:  # said once the weights are known to be the model's
        mapping, refused = None, exc
    if mapping is not None:
        bundle.val = RelabelledDataset(bundle.val, mapping)
    asked = None if mapping is not None or refused else bundle.num_classes
    model, ckpt = model_from_checkpoint(args.model, ckpt, asked, prefer_ema=args.ema)
    if refused is not None:
        raise refused
    try:
        check_input_size(model, args.model, pre.img_size, saved_size)
    except ValueError as exc:
        raise CliError(str(exc)) from exc
    model.to(device)
    names = _output_names(model, ckpt, bundle)
    confusion = torch.zeros(len(names), len(names)) if args.per_class else None
    metrics = _evaluate(args, model, bundle, source, pre, device, amp, confusion)
    if metrics["images"] == 0:  # every file failed to decode: no accuracy of nothing
        what = "videos" if bundle.video else "images"
        raise CliError(
            f"none of the {len(bundle.val):,} {what} of {source.describe()} could be decoded, "
            "so nothing was scored (the log names the files that failed)"
        )
    _check_finite(metrics)
    # written first (--json names them); where they cannot be (a full disk), the scores are
    # said all the same, and then the error
    paths, unwritten = _write_per_class(confusion, names, mapping, args.per_class)
    _report(args, metrics, bundle, source, pre, ckpt.ema, paths)
    if unwritten is not None:
        raise unwritten
    if paths is not None and not args.json:
        print(f"per-class top-1 and confusion matrix: {paths[0]}, {paths[1]}")
    return 0


def _write_per_class(confusion, names, mapping, folder):
    """``(paths, None)`` of the --per-class files written, ``(None, error)`` where they could
    not be, ``(None, None)`` without --per-class (``confusion`` None)."""
    if confusion is None:
        return None, None
    from sparseformer.engine.per_class import per_class_report, write_per_class

    try:  # a subset's report holds its classes
        return write_per_class(per_class_report(confusion, names, mapping), folder), None
    except OSError as exc:
        return None, exc


def _label_map(saved_names, outputs: int, folders: list[str]) -> list[int] | None:
    """The checkpoint's index of each class folder, matched by name (any subset, any order;
    ``None``: the same classes in the same order). A released ImageNet-1K classifier names no
    classes: its are ImageNet's synset ids (or ImageNetV2's numbered folders); another file
    that names none is matched by position."""
    from sparseformer.cli import CliError
    from sparseformer.data import DataError
    from sparseformer.data.relabel import checkpoint_label_map
    from sparseformer.weights.registry import classes_of_outputs

    trained_on = classes_of_outputs(saved_names, outputs, folders)
    imagenet = saved_names is None and trained_on is not None
    try:
        return checkpoint_label_map(trained_on, folders)
    except DataError as exc:
        raise CliError(str(exc) + (_IMAGENET_FOLDERS if imagenet else "")) from exc


def _output_names(model, ckpt, bundle) -> list[str]:
    """The names of the model's outputs: the checkpoint's; a released ImageNet classifier's
    as the folders name them, in its order, for all of its classes or a few (synset ids, or
    ImageNetV2's numbers, which are not listed so); the data's; ImageNet's for 1000; indices."""
    from sparseformer.weights.registry import classes_of_outputs, imagenet_class_names

    width = int(getattr(model, "num_classes", 0) or len(bundle.class_names))
    named = classes_of_outputs(ckpt.class_names, width, bundle.class_names)
    for names in (named, bundle.class_names):
        if names is not None and len(names) == width:
            return list(names)
    return imagenet_class_names() if width == 1000 else [str(i) for i in range(width)]


def _evaluate(
    args: argparse.Namespace, model, bundle, source, pre, device: str, amp, confusion=None
) -> dict:
    """Top-1, top-5 and loss of ``model`` on the val split (videos: views averaged)."""
    import torch

    from sparseformer.data.loader import build_eval_loader
    from sparseformer.engine.distributed import DistInfo
    from sparseformer.engine.inputs import default_eval_workers
    from sparseformer.engine.loop import BatchPrep, evaluate
    from sparseformer.engine.video import ViewAveraging, is_video_model

    batch_size = args.batch_size
    if is_video_model(args.model):  # one prediction per video, its views' scores averaged
        model = ViewAveraging(model)
        # a batch of B videos holds B x V clips (the model sees one view at a time, but the
        # loader builds them all): keep the clips per batch at --batch-size
        batch_size = max(1, batch_size // source.video.num_views)
    workers = args.workers if args.workers is not None else default_eval_workers(device)
    loader = build_eval_loader(
        bundle.val, batch_size, workers, pin_memory=device.startswith("cuda")
    )
    prep = BatchPrep(pre.mean, pre.std, torch.device(device))
    progress = not args.quiet and sys.stderr.isatty()
    return evaluate(model, loader, prep, DistInfo(), amp, progress, confusion)


def _check_finite(metrics: dict) -> None:
    """Refuse a model whose every output is NaN or infinite (its top-1 would be the share of
    class 0); say how many images had such outputs where some did (scored as wrong)."""
    from sparseformer.cli import CliError

    bad, images = metrics["non_finite"], metrics["images"]
    if bad == images:
        raise CliError(
            f"the model's outputs are NaN or infinite on all {images:,} images, so nothing can "
            "be scored: its weights do not compute (a checkpoint of a run that diverged?)"
        )
    if bad:
        print(f"warning: {bad:,} of {images:,} images gave NaN or infinite outputs; they are "
              "scored as wrong", file=sys.stderr)  # fmt: skip


def _report(args: argparse.Namespace, metrics: dict, bundle, source, pre, ema: bool,
            per_class=None) -> None:  # fmt: skip
    from sparseformer.engine.metrics import format_accuracy

    # files skipped at the scan, as a training run's summary counts them, and files left out
    # when they failed to decode: the items the loader had minus those scored (counted here, so
    # data-loading processes count too), as a run's val_left_out
    num_skipped = len(bundle.skipped_files)
    left_out = len(bundle.val) - metrics["images"]
    result = {
        "model": args.model,
        "checkpoint": str(args.checkpoint),
        "data": source.describe(),
        "images": metrics["images"],
        "acc1": metrics["acc1"],
        "acc5": metrics["acc5"],  # null for 5 classes or fewer (always 100%: not measured)
        "loss": metrics["loss"] if math.isfinite(metrics["loss"]) else None,  # JSON has no NaN
        "non_finite": metrics["non_finite"],  # images whose outputs are NaN or infinite
        "img_size": pre.img_size,
        "preprocessing": pre.to_dict(),  # the checkpoint's own, else the data's, else the model's
        "ema": ema,  # False when --ema found no EMA weights (warned)
        "skipped_files": num_skipped,
        "left_out": left_out,
    }
    views = ""
    if bundle.video:  # how each video was scored: its clips and crops, averaged
        spec = source.video
        result["views"] = {
            "clips": spec.num_clips, "crops": spec.num_crops, "frames": spec.num_frames,
            "sampling": spec.sampling,
            "stride": spec.stride if spec.sampling == "dense" else None,  # uniform: none
        }  # fmt: skip
        views = (f" ({spec.num_clips} clip(s) x {spec.num_crops} crop(s) of {spec.num_frames} "
                 f"frames, {spec.sampling})")  # fmt: skip
    if per_class is not None:  # --per-class: per_class.json and confusion.png
        result["per_class"] = [str(path) for path in per_class]
    if args.json:
        print(json.dumps(result))
    else:
        bad = "unreadable or too-short" if bundle.video else "unreadable"
        notes = [f"{num_skipped} {bad} file(s) skipped"] if num_skipped else []
        notes += [f"{left_out} left out: they failed to decode"] if left_out else []
        skipped = f" ({'; '.join(notes)})" if notes else ""
        what = "videos" if bundle.video else "images"
        print(
            f"{args.model} on {source.describe()}: {metrics['images']:,} {what}{views}{skipped}, "
            f"{format_accuracy(metrics['acc1'], metrics['acc5'])}, loss {metrics['loss']:.4f}"
        )
