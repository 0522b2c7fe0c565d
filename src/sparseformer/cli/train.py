"""``sparseformer train``: train a SparseFormer (or any timm model) on an image folder or on
Fashion-MNIST, on one CPU/GPU or many (``torchrun --nproc_per_node=N -m sparseformer train``).

Writes to --output: last.pt and best.pt (checkpoints), metrics.jsonl (one line per epoch),
metrics.png (curves) and summary.json. Resume a stopped run with --resume auto.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
from pathlib import Path

__all__ = [
    "register",
    "add_data_arguments",
    "add_clip_arguments",
    "data_source",
    "is_video_model",
    "check_model_fits_data",
]

EXAMPLES = """examples:
  sparseformer train --model sparseformer_v1_micro --dataset fashion-mnist --output runs/fm
  sparseformer train --model sparseformer_v1_tiny --data-dir /data/imagenet --output runs/t \\
      --recipe imagenet1k --precision bf16
  torchrun --nproc_per_node=8 -m sparseformer train --model sparseformer_v1_tiny \\
      --data-dir /data/imagenet --output runs/t --recipe imagenet1k
  sparseformer train ... --resume auto        # continue from runs/.../last.pt
"""


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def count(text: str) -> int:
    """An argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def add_clip_arguments(p, prefix: str = "") -> None:
    """``--frames``, ``--frame-stride`` and ``--sampling`` (help text after ``prefix``), which
    default to what a checkpoint records: train, eval and predict take them alike."""
    p.add_argument(
        "--frames",
        type=positive_int,
        help=f"{prefix}frames per clip (default: the checkpoint's, else the model's)",
    )
    p.add_argument(
        "--frame-stride",
        type=positive_int,
        help=f"{prefix}dense sampling step (default: the checkpoint's, else 4)",
    )
    p.add_argument(
        "--sampling",
        choices=("dense", "uniform"),
        help=f"{prefix}clip sampling (default: the checkpoint's, else dense)",
    )


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data (one of --data-dir and --dataset)")
    g.add_argument(
        "--data-dir", type=Path, help="ImageFolder root: DIR/train/CLASS/*, DIR/val/CLASS/*"
    )
    g.add_argument("--dataset", help="built-in data set: fashion-mnist")
    g.add_argument("--data-root", type=Path, help="cache folder for built-in data sets")
    g.add_argument(
        "--limit-train",
        type=positive_int,
        metavar="N",
        help="use only N training images (spread over a folder's classes; a built-in data "
        "set's first N)",
    )
    g.add_argument(
        "--limit-val",
        type=positive_int,
        metavar="N",
        help="use only N val images (spread over a folder's classes; a built-in data set's "
        "first N)",
    )
    g = p.add_argument_group("video folders (DIR/train/CLASS/*.mp4; video models)")
    add_clip_arguments(g)
    g.add_argument("--clips", type=positive_int, default=1, help="test clips per video (eval)")
    g.add_argument(
        "--crops", type=int, choices=(1, 3), default=1, help="test crops per clip (eval)"
    )


def video_clip_spec(args: argparse.Namespace, views: bool = True, saved: dict | None = None):
    """Clip sampling: the video flags, else the clip settings a checkpoint was trained with
    (``saved``, its ``video`` record), else the model's frames, stride 4 and dense sampling.
    ``views=False`` keeps one test view (training)."""
    from sparseformer.data.video import ClipSpec
    from sparseformer.weights.registry import MODELS

    saved = saved or {}
    frames = (
        args.frames
        or saved.get("num_frames")
        or getattr(
            getattr(MODELS.get(getattr(args, "model", None) or ""), "config", None),
            "num_frames",
            8,
        )
    )
    return ClipSpec(
        num_frames=frames,
        sampling=args.sampling or saved.get("sampling", "dense"),
        stride=args.frame_stride or saved.get("stride", 4),
        num_clips=args.clips if views else 1,
        num_crops=args.crops if views else 1,
    )


def data_source(args: argparse.Namespace, views: bool = True, saved: dict | None = None):
    """The data the flags name; ``saved``: a checkpoint's ``video`` record (clip defaults)."""
    from sparseformer.data import DataSource

    return DataSource(
        args.data_dir,
        args.dataset,
        args.data_root,
        args.limit_train,
        args.limit_val,
        video=video_clip_spec(args, views, saved),
    )


def is_video_model(model_name: str) -> bool:
    """Whether a model name is a registered video SparseFormer (timm names are image models)."""
    from sparseformer.config import VideoSparseFormerConfig
    from sparseformer.weights.registry import MODELS

    spec = MODELS.get(model_name)
    return spec is not None and isinstance(spec.config, VideoSparseFormerConfig)


def check_model_fits_data(model_name: str, args: argparse.Namespace) -> bool | None:
    """A clear error when an image model meets video clips or a video model meets images,
    decided from the model's name and a small sample of the data folder, before the folder is
    scanned. A folder with neither images nor videos is left to the data checks' own errors.

    Returns:
        Whether the data are videos; ``None`` when the folder holds neither (missing, empty):
        the data checks then say what is wrong.

    Raises:
        CliError: the model's kind and the data's differ.
    """
    from sparseformer.cli import CliError
    from sparseformer.data.video import sample_media

    if args.data_dir is None:  # a built-in image data set
        video_data = False
    else:
        videos, images = sample_media(args.data_dir)
        video_data = videos > images
        if not videos and not images:
            return None
    video_model = is_video_model(model_name)
    if video_model and not video_data:
        raise CliError(
            f"{model_name} is a video model but the data are images; use an image model "
            "(e.g. sparseformer_v1_tiny) or a video folder (DIR/train/CLASS/*.mp4)"
        )
    if video_data and not video_model:
        raise CliError(
            f"{model_name} is an image model but the data folder holds videos; use a video "
            "model (e.g. video_sparseformer_v1_tiny; `sparseformer models` lists them)"
        )
    return video_data


def refuse_video_flags_on_images(
    args: argparse.Namespace, video_data: bool | None, why: str = "the data are images"
) -> None:
    """Clip flags given with image data (or an image model: ``why``) are a mistake worth
    naming (``None``: unknown yet)."""
    from sparseformer.cli import CliError

    given = [
        flag
        for flag, value in (
            ("--frames", args.frames), ("--frame-stride", args.frame_stride),
            ("--sampling", args.sampling), ("--clips", args.clips != 1 or None),
            ("--crops", args.crops != 1 or None),
        )
        if value
    ]  # fmt: skip
    if video_data is False and given:
        raise CliError(f"{', '.join(given)} apply to videos only; {why}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (one machine or many, resumable)",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model", required=True, help="sparseformer name (sparseformer models) or timm name"
    )
    add_data_arguments(p)
    p.add_argument("--output", type=Path, required=True, help="run folder")
    g = p.add_argument_group("recipe (defaults come from --recipe)")
    g.add_argument(
        "--recipe",
        help="shipped recipe name (imagenet1k, fashion-mnist-cpu) or a JSON file; default: "
        "fashion-mnist-cpu for --dataset fashion-mnist, imagenet1k otherwise",
    )
    g.add_argument("--epochs", type=positive_int)
    g.add_argument("--batch-size", type=positive_int, help="images per process and step")
    g.add_argument("--img-size", type=positive_int, help="input resolution")
    g.add_argument("--lr", type=float, help="peak learning rate for a total batch of 512")
    g.add_argument("--warmup-epochs", type=float)
    g.add_argument("--weight-decay", type=float)
    g.add_argument("--drop-path", type=float, help="stochastic depth rate")
    g.add_argument("--workers", type=count, help="data-loading processes per training process")
    g.add_argument(
        "--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
        help="any recipe field, value in JSON (e.g. --set mixup=0 ema_decay=null); "
        "augmentation fields by name or dotted (hflip=0, augmentation.scale=[0.5,1]); "
        "may be repeated",
    )  # fmt: skip
    g = p.add_argument_group("run")
    g.add_argument(
        "--resume",
        help="training checkpoint to continue, or 'auto' (OUTPUT/last.pt, else best.pt, if any)",
    )
    g.add_argument(
        "--overwrite", action="store_true", help="start over in an --output that holds a run"
    )
    g.add_argument("--checkpoint", type=Path, help="initial weights (fine-tuning; any format)")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="default: the recipe's")
    g.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    g.add_argument(
        "--threads", type=positive_int, help="CPU threads per process (default: cores / processes)"
    )
    g.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass: less memory, more time, same results "
        "(also when resuming)",
    )
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def build_recipe(args: argparse.Namespace):
    from sparseformer.cli import CliError
    from sparseformer.data.transforms import Augmentation
    from sparseformer.engine.recipe import load_recipe

    name = args.recipe or ("fashion-mnist-cpu" if args.dataset == "fashion-mnist" else "imagenet1k")
    recipe = load_recipe(name)
    changes = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "img_size": args.img_size,
        "lr": args.lr,
        "warmup_epochs": args.warmup_epochs,
        "weight_decay": args.weight_decay,
        "drop_path": args.drop_path,
        "num_workers": args.workers,
        "precision": args.precision,
    }
    changes = {k: v for k, v in changes.items() if v is not None}
    augmentation: dict = {}
    aug_fields = {f.name for f in dataclasses.fields(Augmentation)}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise CliError(f"--set expects KEY=VALUE, got {item!r}")
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            parsed = value  # a bare string such as rand-m9-mstd0.5
        # augmentation fields by name (hflip=0) or dotted (augmentation.hflip=0)
        name = key.removeprefix("augmentation.")
        if name in aug_fields and (name != key or not hasattr(recipe, key)):
            augmentation[name] = parsed
        else:
            changes[key] = parsed
    if augmentation:
        changes["augmentation"] = {**changes.get("augmentation", {}), **augmentation}
    return recipe.replace(**changes) if changes else recipe


# recipe fields with a flag of their own (--precision, --epochs and --workers apply on resume)
_FLAG_FIELDS = ("batch_size", "img_size", "lr", "warmup_epochs", "weight_decay", "drop_path")


def _warn_ignored_on_resume(args: argparse.Namespace, asked, recipe) -> None:
    """Resuming keeps the run's recipe: name each field the flags (or ``--recipe`` and
    ``--set``) asked to change, with both values. ``--epochs`` and ``--workers`` do apply.
    ``--recipe`` naming the run's own shipped recipe (the training command typed again) asks
    for no more than its other flags do."""

    def flat(r) -> dict:
        d = r.to_dict()
        d.update({f"augmentation.{k}": v for k, v in d.pop("augmentation").items()})
        return d

    wanted, kept = flat(asked), flat(recipe)
    from sparseformer.engine.recipe import list_recipes

    # the run's own shipped recipe typed again asks only what the flags ask; another recipe,
    # or a recipe file (which may have been edited since), every field of it
    same_shipped = args.recipe in list_recipes() and wanted["name"] == kept["name"]
    if args.recipe and not same_shipped:
        keys = [k for k in wanted if k not in ("epochs", "num_workers", "name", "precision")]
    else:  # only what the flags named
        keys = [f for f in _FLAG_FIELDS if getattr(args, f, None) is not None]
        for item in args.set:
            key = item.partition("=")[0]
            keys.append(key if key in wanted else f"augmentation.{key}")
    changed = [
        f"{k} (asked {wanted[k]!r}, the run's {kept[k]!r})"
        for k in dict.fromkeys(keys)
        if k in wanted and wanted[k] != kept[k]
    ]
    if changed:
        logging.getLogger(__name__).warning(
            "resuming continues the run's own recipe, so these changes are ignored: %s; start "
            "a new run (--checkpoint to start from these weights) to change them",
            "; ".join(changed),
        )


_CLIP_FLAGS = (("frames", "num_frames"), ("frame_stride", "stride"), ("sampling", "sampling"))


def _keep_run_clips(args: argparse.Namespace, clips: dict) -> argparse.Namespace:
    """``args`` without the clip flags, so that a resumed video run samples its clips as it
    did (``clips``: its checkpoint's ``video`` record); a flag that asked otherwise is named
    in a warning, as recipe changes are."""
    asked = {flag: getattr(args, flag, None) for flag, _ in _CLIP_FLAGS}
    changed = [
        f"--{flag.replace('_', '-')} (asked {asked[flag]!r}, the run's {clips[key]!r})"
        for flag, key in _CLIP_FLAGS
        if asked[flag] is not None and key in clips and asked[flag] != clips[key]
    ]
    if changed:
        logging.getLogger(__name__).warning(
            "resuming continues the run's own clip sampling, so these changes are ignored: %s; "
            "start a new run (--checkpoint to start from these weights) to change them",
            "; ".join(changed),
        )
    return argparse.Namespace(**{**vars(args), **{flag: None for flag, _ in _CLIP_FLAGS}})


def run(args: argparse.Namespace) -> int:
    import torch

    from sparseformer.cli import CliError, check_output
    from sparseformer.data import DataError, Preprocessing, build_datasets, dataset_defaults
    from sparseformer.engine import checkpoint as ckpt_io
    from sparseformer.engine import session
    from sparseformer.engine.distributed import cleanup_distributed, setup_distributed
    from sparseformer.engine.modeling import (
        build_model,
        check_model_name,
        load_weights,
        model_input_size,
    )
    from sparseformer.engine.recipe import Recipe, RecipeError
    from sparseformer.engine.trainer import RunOptions, TrainingError, fit, seed_everything
    from sparseformer.weights.factory import checkpoint_replicates, read_checkpoint

    check_model_name(args.model)  # before any data is read
    try:
        device = session.pick_device(args.device)
        if ":" in device and int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise ValueError(
                f"--device {device} under torchrun: each process takes GPU LOCAL_RANK; use "
                "--device cuda and choose the GPUs with CUDA_VISIBLE_DEVICES"
            )
        kind = check_model_fits_data(args.model, args)  # before the folder is scanned
        refuse_video_flags_on_images(args, kind)
        video = bool(kind)
        if args.clips != 1 or args.crops != 1:
            logging.getLogger(__name__).warning(
                "--clips and --crops set the test views of `sparseformer eval`; per-epoch "
                "validation uses one centre clip per video"
            )
        recipe = build_recipe(args)
        if video and recipe.cutmix > 0:  # timm's CutMix cuts the last two axes: T x H on clips
            logging.getLogger(__name__).info("video clips: CutMix is turned off")
            recipe = recipe.replace(cutmix=0.0)
        aug = recipe.augmentation
        unused = [name for name, on in (("RandAugment", aug.auto_augment),
                  ("colour jitter", aug.color_jitter), ("random erasing", aug.re_prob))
                  if on]  # fmt: skip
        if video and unused:  # clips take one crop and flip for all frames, nothing else
            logging.getLogger(__name__).info(
                "video clips: the recipe's %s: not applied (clips take its crop scale and flip "
                "only)",
                ", ".join(unused),
            )
        resume, saved, start = None, {}, None  # start: the --checkpoint dict, when read
        if args.resume and args.overwrite:
            raise CliError(
                "--overwrite starts the run over and --resume continues it; give one of them"
            )
        if args.resume == "auto":  # last.pt, else best.pt (a kill between the two saves)
            found = [args.output / n for n in (ckpt_io.LAST, ckpt_io.BEST)]
            resume = next((p for p in found if p.is_file()), None)
            if resume is None:
                logging.getLogger(__name__).info(
                    "--resume auto: no checkpoint in %s yet; starting the run", args.output
                )
        elif args.resume:
            resume = Path(args.resume)
        if resume is not None:  # continue exactly: the run's own recipe and clips, epochs may grow
            saved = ckpt_io.read_training_checkpoint(resume)
            if saved.get("model_name") != args.model:
                raise CliError(
                    f"{str(resume)!r} is a checkpoint of {saved.get('model_name')!r}, not "
                    f"{args.model!r}; pass --model {saved.get('model_name')} to resume it"
                )
            done = int(saved.get("epoch", 0))
            if args.epochs is not None and args.epochs < done:
                raise CliError(
                    f"the run in {resume} already has {done} epochs; --epochs is the total, so "
                    f"give at least {done} (or leave it out to finish the run's own schedule)"
                )
            asked, recipe = recipe, Recipe().replace(**saved["recipe"])
            if args.epochs is not None:
                recipe = recipe.replace(epochs=args.epochs)
            if args.workers is not None:  # the data order stays; a machine's own setting
                recipe = recipe.replace(num_workers=args.workers)
            _warn_ignored_on_resume(args, asked, recipe)
            finished = _summary_epochs(args.output) == done
            if recipe.epochs <= done and finished:  # touch nothing: not the data, the folder
                if os.environ.get("RANK", "0") == "0":
                    print(
                        f"nothing to do: the run in {resume} already has {done} epochs (give a "
                        "larger --epochs to train it further)"
                    )
                return 0
        clips = saved.get("video") if isinstance(saved.get("video"), dict) else None
        if clips is not None:  # a resumed video run keeps its own clips, like its recipe
            args = _keep_run_clips(args, clips)
        elif video and args.checkpoint is not None:  # fine-tuning: its clips, unless flagged
            start = read_checkpoint(args.checkpoint)
            clips = start.get("video") if isinstance(start.get("video"), dict) else None
        # per-epoch validation: one view per video
        source = data_source(args, views=False, saved=clips)
        check_output(args.output, "--output", folder=True)
        session.output_dir_ok(args.output, resume=resume is not None, overwrite=args.overwrite)
    except (DataError, RecipeError, ValueError) as exc:
        raise CliError(str(exc)) from exc

    dist = setup_distributed(device)
    try:
        if not dist.is_main:
            logging.getLogger().setLevel(logging.WARNING)
        threads = session.set_threads(args.threads, dist)
        seed_everything(args.seed)  # the same initial weights on every rank
        base = dataset_defaults(source) or Preprocessing(
            model_input_size(args.model) or 224, interpolation=recipe.interpolation
        )
        if resume is not None:
            pre = Preprocessing.from_dict(saved["preprocessing"])
        else:
            pre = session.resolve_preprocessing(
                base, recipe.img_size, recipe.crop_pct, recipe.interpolation
            )
        try:
            # every process builds the data: they share the file check out
            bundle = build_datasets(source, pre, recipe.augmentation, share_check=True)
        except DataError as exc:
            raise CliError(str(exc)) from exc
        trained_on = saved.get("class_names")
        if trained_on is not None and list(trained_on) != list(bundle.class_names):
            raise CliError(
                f"the run in {resume} was trained on classes {list(trained_on)[:6]}..., "
                f"the data has {list(bundle.class_names)[:6]}...; resume on the same data, or "
                "start a new run with --checkpoint to fine-tune"
            )
        frames = bundle.clip_spec.num_frames if video and bundle.clip_spec else None
        if start is None and resume is None:
            start = args.checkpoint  # a path; read by whichever of the two needs it
        start_from = saved if resume is not None else start
        model = build_model(
            args.model, bundle.num_classes, pre.img_size, recipe.drop_path, num_frames=frames,
            replicates=checkpoint_replicates(start_from, args.model) if start_from else None,
        )  # fmt: skip
        if args.checkpoint is not None and resume is None:
            load_weights(model, start)
        if args.grad_checkpointing:
            enable_grad_checkpointing(model, args.model)
        if dist.is_main:
            n = sum(p.numel() for p in model.parameters())
            what, size = "images", f"{pre.img_size}px"
            if bundle.clip_spec is not None:
                clip = bundle.clip_spec
                step = f" {clip.stride} apart" if clip.sampling == "dense" else ", uniform"
                what, size = "videos", f"clips of {clip.num_frames} frames{step} at {size}"
            print(
                f"training {args.model} ({n:,} params) on {source.describe()}: "
                f"{len(bundle.train):,} train / {len(bundle.val):,} val {what}, "
                f"{bundle.num_classes} classes, {size}, recipe {recipe.name}, "
                f"{recipe.epochs} epochs x {recipe.batch_size} x {dist.world_size} process(es), "
                f"{device}, {args.precision or recipe.precision}, {threads} thread(s)"
            )
        options = RunOptions(
            output=args.output,
            model_name=args.model,
            device=device,
            precision=args.precision or recipe.precision,
            seed=args.seed,
            resume=resume,
            overwrite=args.overwrite,
            progress=not args.quiet and sys.stderr.isatty(),
            extra={
                "data": source.describe(),
                "torch": str(torch.__version__),
                # the clip settings used (size, crop and normalisation included)
                **({"video": dataclasses.asdict(bundle.clip_spec)} if video else {}),
            },
        )
        try:
            summary = fit(model, bundle, recipe, pre, options, dist)
        except TrainingError as exc:
            raise CliError(str(exc)) from exc
        if dist.is_main:
            _print_summary(summary, bundle, video)
    finally:
        cleanup_distributed()
    return 0


def enable_grad_checkpointing(model, name: str) -> None:
    """``model.set_grad_checkpointing()``, or a CliError for a model that has none."""
    from sparseformer.cli import CliError

    try:
        model.set_grad_checkpointing(True)
        logging.getLogger(__name__).info("gradient checkpointing: on")
    except (AttributeError, AssertionError, NotImplementedError) as exc:
        raise CliError(
            f"{name} does not support gradient checkpointing ({exc or type(exc).__name__}); "
            "train without --grad-checkpointing"
        ) from None


def _summary_epochs(output: Path) -> int | None:
    """The epochs ``OUTPUT/summary.json`` reports, ``None`` when it is missing or unreadable."""
    try:
        return int(json.loads((output / "summary.json").read_text())["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _print_summary(summary: dict, bundle, video: bool) -> None:
    final = summary["final"]
    kind = "video" if video else "image"
    if bundle.skipped_files:
        what = "unreadable or too-short video(s)" if video else "unreadable image file(s)"
        listed = summary.get("skipped_list")
        where = f"listed in {listed}" if listed else "see the log"
        print(f"skipped {len(bundle.skipped_files)} {what} ({where})")
    if summary.get("train_loads_replaced"):
        print(f"{summary['train_loads_replaced']} training {kind} load(s) failed to decode and "
              f"were replaced by the next {kind} (see the log)")  # fmt: skip
    if summary.get("val_left_out"):
        print(f"{summary['val_left_out']} validation {kind}(s) failed to decode and were left "
              "out of the scores (see the log)")  # fmt: skip
    if summary["epochs_run"] == 0:
        print(
            f"nothing to do: the run already has {summary['epochs']} epochs (give a larger "
            "--epochs to train it further)"
        )
        return
    if not final:
        return
    minutes = summary["train_seconds"] / 60
    ema = f", EMA top-1 {final['ema_val_acc1']:.2f}%" if "ema_val_acc1" in final else ""
    print(
        f"done: {summary['epochs']} epochs in {minutes:.1f} min of training; last epoch: "
        f"val top-1 {final['val_acc1']:.2f}%, top-5 {final['val_acc5']:.2f}%{ema}; best top-1 "
        f"{summary['best_val_acc1']:.2f}% (epoch {summary['best_epoch']})"
    )
    kept = [summary["last_checkpoint"], summary["best_checkpoint"]]
    print(f"checkpoints: {', '.join(p for p in kept if p is not None)}")
    print(f"metrics: {summary['metrics']}, curves: {summary['plot']}")
