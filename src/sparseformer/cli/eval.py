"""``sparseformer eval``: top-1 / top-5 accuracy and loss of a checkpoint on a validation set.

The checkpoint may be one of ours (``last.pt`` / ``best.pt``; its preprocessing is reused) or
an official SparseFormer release in either layout (ImageNet release or library v2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["register"]


def register(sub: argparse._SubParsersAction) -> None:
    from sparseformer.cli.train import add_data_arguments, count, positive_int

    p = sub.add_parser(
        "eval",
        help="evaluate a checkpoint: top-1/top-5 and loss",
        description=__doc__,
        epilog="example:\n  sparseformer eval --model sparseformer_v1_micro --checkpoint "
        "runs/demo/best.pt --dataset fashion-mnist",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--model", required=True, help="the model the checkpoint belongs to")
    p.add_argument("--checkpoint", type=Path, required=True, help="ours or an official release")
    add_data_arguments(p)
    p.add_argument("--ema", action="store_true", help="evaluate the EMA weights of the checkpoint")
    p.add_argument("--img-size", type=positive_int, help="input size (default: the checkpoint's)")
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
    p.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32")
    p.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    p.add_argument("--threads", type=positive_int, help="CPU threads (default: the free cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


class RelabelledDataset:
    """A data set whose label ``i`` becomes ``mapping[i]`` (the checkpoint's index)."""

    def __init__(self, dataset, mapping: list[int]) -> None:
        self.dataset, self.mapping = dataset, mapping

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int):
        x, label = self.dataset[index]
        return x, self.mapping[label]


def _check_input_size(model, name: str, size: int, trained_size: int | None) -> None:
    """A model built for one input size (a timm ViT) given another fails in one line: tried on
    one blank image before the evaluation starts."""
    import torch

    from sparseformer.cli import CliError
    from sparseformer.engine.modeling import is_sparseformer

    if is_sparseformer(model) or trained_size is None or size == trained_size:
        return
    try:
        with torch.inference_mode():
            model(torch.zeros(1, 3, size, size))
    except (AssertionError, RuntimeError, ValueError) as exc:
        raise CliError(
            f"{name} was trained at {trained_size}px and cannot take {size}px inputs "
            f"({(str(exc) or type(exc).__name__).splitlines()[0]}); leave out --img-size"
        ) from exc


def run(args: argparse.Namespace) -> int:
    import torch

    from sparseformer.cli import CliError
    from sparseformer.cli.train import (
        check_model_fits_data,
        data_source,
        is_video_model,
        refuse_video_flags_on_images,
    )
    from sparseformer.data import DataError, Preprocessing, build_datasets, dataset_defaults
    from sparseformer.data.loader import build_eval_loader
    from sparseformer.engine import session
    from sparseformer.engine.distributed import DistInfo
    from sparseformer.engine.loop import BatchPrep, evaluate
    from sparseformer.engine.modeling import check_model_name
    from sparseformer.engine.trainer import TrainingError, amp_dtype_for
    from sparseformer.weights.factory import read_checkpoint

    check_model_name(args.model)  # an unknown name fails before any data is read
    # before the data folder is scanned
    refuse_video_flags_on_images(args, check_model_fits_data(args.model, args))
    saved = read_checkpoint(args.checkpoint)
    if not isinstance(saved, dict):
        saved = {}
    try:
        device = session.pick_device(args.device)
        # clips as the checkpoint was trained with, unless the flags say otherwise
        video_record = saved.get("video") if isinstance(saved.get("video"), dict) else None
        source = data_source(args, saved=video_record)
        amp = amp_dtype_for(args.precision, device)
    except (DataError, ValueError, TrainingError) as exc:
        raise CliError(str(exc)) from exc
    session.set_threads(args.threads, DistInfo())
    # preprocessing: the checkpoint's own, else the data set's, else the released weights'
    if isinstance(saved.get("preprocessing"), dict):
        pre = Preprocessing.from_dict(saved["preprocessing"])
    else:
        pre = dataset_defaults(source) or session.weights_preprocessing(args.model)
    saved_names = saved.get("class_names")
    saved_size = session.stored_img_size(saved)
    del saved
    pre = session.resolve_preprocessing(pre, args.img_size, None, None)
    try:
        bundle = build_datasets(source, pre, None, need_train=False)
    except DataError as exc:
        raise CliError(str(exc)) from exc
    # our checkpoints name their classes: match the data's class folders by name (any subset,
    # any order); official ones do not, and are matched by position (ImageNet's sorted wnids)
    by_name = saved_names is not None and list(saved_names) != list(bundle.class_names)
    if by_name:
        unknown = [c for c in bundle.class_names if c not in saved_names]
        if unknown:
            raise CliError(
                f"class folder(s) {unknown[:5]} are not among the checkpoint's classes "
                f"({list(saved_names)[:8]}...); evaluate on data of the classes it was trained on"
            )
        bundle.val = RelabelledDataset(
            bundle.val, [list(saved_names).index(c) for c in bundle.class_names]
        )
    model, info = session.model_from_checkpoint(
        args.model, args.checkpoint, None if by_name else bundle.num_classes, prefer_ema=args.ema
    )
    _check_input_size(model, args.model, pre.img_size, saved_size)
    model.to(device)
    batch_size = args.batch_size
    if is_video_model(args.model):  # one prediction per video, its views' scores averaged
        from sparseformer.engine.video import ViewAveraging

        model = ViewAveraging(model)
        # a batch of B videos holds B x V clips (the model sees one view at a time, but the
        # loader builds them all): keep the clips per batch at --batch-size
        batch_size = max(1, batch_size // source.video.num_views)
    workers = args.workers
    if workers is None:  # a GPU waits for images decoded one by one in this process
        workers = min(8, session.available_cores()) if device.startswith("cuda") else 0
    loader = build_eval_loader(
        bundle.val, batch_size, workers, pin_memory=device.startswith("cuda")
    )
    prep = BatchPrep(pre.mean, pre.std, torch.device(device))
    progress = not args.quiet and sys.stderr.isatty()
    metrics = evaluate(model, loader, prep, DistInfo(), amp, progress)
    # files skipped at the scan, and files left out when they failed to decode: the items the
    # loader had minus those scored (counted here, so data-loading processes count too)
    num_skipped = len(bundle.skipped_files) + len(bundle.val) - metrics["images"]
    result = {
        "model": args.model,
        "checkpoint": str(args.checkpoint),
        "data": source.describe(),
        "images": metrics["images"],
        "acc1": metrics["acc1"],
        "acc5": metrics["acc5"],
        "loss": metrics["loss"],
        "img_size": pre.img_size,
        "ema": bool(info.get("ema")),  # False when --ema found no EMA weights (warned)
        "skipped_files": num_skipped,
    }
    if args.json:
        print(json.dumps(result))
    else:
        bad = "unreadable, too short or undecodable" if bundle.video else "unreadable"
        skipped = f" ({num_skipped} {bad} file(s) skipped)" if num_skipped else ""
        what = "videos" if bundle.video else "images"
        print(
            f"{args.model} on {source.describe()}: {metrics['images']:,} {what}{skipped}, "
            f"top-1 {metrics['acc1']:.2f}%, top-5 {metrics['acc5']:.2f}%, "
            f"loss {metrics['loss']:.4f}"
        )
    return 0
