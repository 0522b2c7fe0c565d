"""``sparseformer train``: train a SparseFormer (or any timm model) on an image folder or on
Fashion-MNIST, on one CPU/GPU or many (``torchrun --nproc_per_node=N -m sparseformer train``).

Writes to --output: last.pt and best.pt (checkpoints), metrics.jsonl (one line per epoch),
metrics.png (curves) and summary.json. Resume a stopped run with --resume auto.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from pathlib import Path
from typing import Any

from sparseformer.cli.common import (
    add_data_arguments,
    add_recipe_flags,
    add_saving_arguments,
    check_model_fits_data,
    check_precision,
    data_source,
    nothing_to_do,
    positive_int,
    recipe_flags,
    refuse_video_flags_on_images,
)

__all__ = ["register", "run"]

EXAMPLES = """examples:
  sparseformer train --model sparseformer_v1_micro --dataset fashion-mnist --output runs/fm
  sparseformer train --model sparseformer_v1_micro --data-dir my_images --output runs/mine
  sparseformer train --model sparseformer_v1_tiny --data-dir /data/imagenet --output runs/t \\
      --recipe imagenet1k --precision bf16
  torchrun --nproc_per_node=8 -m sparseformer train --model sparseformer_v1_tiny \\
      --data-dir /data/imagenet --output runs/t --recipe imagenet1k
  sparseformer train ... --resume auto        # continue from runs/.../last.pt
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train",
        help="train a model (one machine or many, resumable)",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--model",
        help="sparseformer name (sparseformer models) or timm name (default with --checkpoint: "
        "the model a `sparseformer train` or `bootstrap` checkpoint names)",
    )
    add_data_arguments(p)
    p.add_argument("--output", type=Path, required=True, help="run folder")
    g = p.add_argument_group("recipe (defaults come from --recipe)")
    g.add_argument(
        "--recipe",
        help="shipped recipe name (imagenet1k, fashion-mnist-cpu) or a JSON file; default: "
        "fashion-mnist-cpu for --dataset fashion-mnist; for --data-dir, own-folder-SIZE, "
        "scaled to the folder's size, --epochs and the device (docs/training.md)",
    )
    add_recipe_flags(g, img_size="input resolution")
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
    g.add_argument("--ema", action="store_true", help="start from the --checkpoint's EMA weights")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="default: the recipe's")
    g.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    g.add_argument(
        "--threads", type=positive_int, help="CPU threads per process (default: free cores, shared)"
    )
    g.add_argument(
        "--grad-checkpointing",
        action="store_true",
        help="recompute activations in the backward pass: less memory, more time, same results "
        "(also when resuming)",
    )
    add_saving_arguments(g)
    g.add_argument(
        "--tensorboard", action="store_true",
        help="also write each epoch's losses, accuracies, learning rate, images/s and RoI "
        "statistics for TensorBoard, in OUTPUT/tensorboard (pip install "
        "'sparseformer[tensorboard]')",
    )  # fmt: skip
    g.add_argument("--seed", type=int, help="default 0; a resumed run's own")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


@dataclasses.dataclass
class _Plan:
    """What the flags resolve to before any data is read (``saved``: the resumed checkpoint;
    ``start``: the --checkpoint's :class:`~sparseformer.weights.checkpoint.Checkpoint`)."""

    args: argparse.Namespace
    device: str
    video: bool
    recipe: Any
    source: Any
    resume: Path | None = None
    saved: dict = dataclasses.field(default_factory=dict)  # without tensors (record_of)
    start: Any = None

    @property
    def architecture(self) -> dict:
        """Config fields the run's model takes over its name's (a bootstrapped student's, as
        its checkpoint records them; a run fine-tuned from one records them in turn)."""
        start = getattr(self.start, "architecture", None)
        found = self.saved.get("architecture") if self.resume is not None else start
        return dict(found) if isinstance(found, dict) else {}


def run(args: argparse.Namespace) -> int:
    from sparseformer.cli import CliError
    from sparseformer.cli.common import model_and_read_checkpoint
    from sparseformer.data import DataError
    from sparseformer.engine import distributed
    from sparseformer.engine.metrics import require_tensorboard
    from sparseformer.engine.recipe import RecipeError
    from sparseformer.weights.build import check_model_name

    # --model, or the one the run/checkpoint names (the checkpoint read then, once)
    args.model, read = model_and_read_checkpoint(args)
    check_model_name(args.model)  # before any data is read
    if args.tensorboard:  # as the extras it needs
        require_tensorboard()
    distributed.quiet_other_ranks()  # the plan's warnings are every rank's: the first says them
    try:
        plan = _plan(args, read)
    except (DataError, RecipeError, ValueError) as exc:
        raise CliError(str(exc)) from exc
    if plan is None:  # the run is finished: nothing touched, not the data, not the folder
        return 0
    dist = distributed.setup_distributed(plan.device)
    try:
        _train(plan, dist)  # signals: cli.main's setup_signals, then the run's StopSignals
    finally:
        distributed.cleanup_distributed()
    return 0


def _plan(args: argparse.Namespace, read=None) -> _Plan | None:
    """The checks and choices made before any data is read: device, model versus data, the
    recipe, what to resume, the data source, the output folder. ``None``: nothing to do.
    ``read``: --checkpoint, where naming the model read it already."""
    from sparseformer.engine.device import pick_device
    from sparseformer.engine.distributed import launched_rank
    from sparseformer.engine.own_folder import recipe_for_folder
    from sparseformer.engine.recipe import recipe_for_clips, recipe_from_flags
    from sparseformer.engine.resume import (
        CLIP_FLAGS,
        keep_run_clips,
        read_resume_checkpoint,
        resolve_resume,
        resumed_recipe,
        resumed_seed,
        run_is_finished,
        warn_of_other_data,
    )
    from sparseformer.engine.stopping import parse_checkpoint_every
    from sparseformer.weights.checkpoint import check_model, read_checkpoint, record_of

    device = pick_device(args.device)
    if args.precision:  # an asked fp16 on a CPU: before the folder is counted
        check_precision(args.precision, device)
    parse_checkpoint_every(args.checkpoint_every)  # a bad value: one line, before any work
    if args.ema and args.checkpoint is None:
        raise ValueError("--ema starts from a checkpoint's EMA weights: give --checkpoint too")
    if ":" in device and launched_rank()[1] > 1:
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
    flags = recipe_flags(args)
    # no --recipe on a folder: one scaled to its size, the run's length and the device
    own = recipe_for_folder(
        flags, args.data_dir, video=video, limit=args.limit_train, device=device
    )
    recipe = recipe_from_flags(flags, args.dataset, own)
    if video:
        recipe = recipe_for_clips(recipe)
    resume = resolve_resume(args.resume, args.output, overwrite=args.overwrite)
    saved, start = {}, None
    if resume is not None:  # continue exactly: the run's own recipe and clips, epochs may grow
        saved = read_resume_checkpoint(resume, args.model)
        if args.checkpoint is not None:  # e.g. a job script that starts from it, then resumes
            logging.getLogger(__name__).warning(
                "resuming %s: --checkpoint %s is not used (it only starts a run)",
                resume, args.checkpoint,
            )  # fmt: skip
        recipe = resumed_recipe(saved, resume, recipe, flags)
        if run_is_finished(saved, recipe, args.output):  # touch nothing: not the data, the folder
            done = int(saved.get("epoch", 0))
            if launched_rank()[0] == 0:
                print(nothing_to_do(done, resume))
            return None
    args.seed = resumed_seed(saved, args.seed)  # a resumed run keeps its own, like its recipe
    clips = saved.get("video") if isinstance(saved.get("video"), dict) else None
    if clips is not None:  # a resumed video run keeps its own clips, like its recipe
        keep_run_clips({flag: getattr(args, flag, None) for flag, _ in CLIP_FLAGS}, clips)
        args = argparse.Namespace(**{**vars(args), **{flag: None for flag, _ in CLIP_FLAGS}})
    elif args.checkpoint is not None and resume is None:  # fine-tuning: its architecture,
        # its normalisation, clips; from the file once (read: what naming the model read)
        start = read_checkpoint(args.checkpoint if read is None else read, prefer_ema=args.ema)
        check_model(start, args.model)  # another model's run (an image model's: inflated)
        clips = start.video if video else None
    # per-epoch validation: one view per video
    source = data_source(args, views=False, saved=clips, trained_on=saved.get("data"))
    warn_of_other_data(saved.get("data"), source.describe(), resume)  # nothing saved: no run
    _check_output(args.output, resume, args.overwrite)
    source.check_output_outside(args.output)  # not among the images
    check_precision(args.precision or recipe.precision, device)  # fp16 on a CPU
    return _Plan(args, device, video, recipe, source, resume, record_of(saved), start)


def _check_output(output: Path, resume: Path | None, overwrite: bool) -> None:
    from sparseformer.cli import check_output
    from sparseformer.engine.distributed import launched_rank
    from sparseformer.engine.run_folder import check_run_folder_free, refuse_overwriting_a_run

    check_output(output, "--output", folder=True)  # a file, or a folder we may not write in
    if launched_rank()[0] == 0:  # rank 0 writes the run folder, and holds it
        check_run_folder_free(output)  # another live run writing there: named, now
    refuse_overwriting_a_run(output, resume=resume, overwrite=overwrite)


def _train(plan: _Plan, dist) -> None:
    """Build the data and the model on every process, and run :func:`engine.trainer.fit`."""
    import torch

    from sparseformer.cli import CliError
    from sparseformer.data import DataError, build_datasets
    from sparseformer.engine.device import set_threads
    from sparseformer.engine.inputs import training_preprocessing
    from sparseformer.engine.resume import ResumeError, check_same_classes
    from sparseformer.engine.stopping import parse_checkpoint_every
    from sparseformer.engine.trainer import RunOptions, TrainingError, fit, seed_everything

    args, recipe, source, video = plan.args, plan.recipe, plan.source, plan.video
    if not dist.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    threads = set_threads(args.threads, dist)
    seed_everything(args.seed)  # the same initial weights on every rank
    saved = plan.saved if plan.resume is not None else None
    weights = plan.start.preprocessing if plan.start is not None else None
    pre = training_preprocessing(source, args.model, recipe, saved, weights)
    try:
        # every process builds the data: they share the file check out
        bundle = build_datasets(source, pre, recipe.augmentation, share_check=True)
        check_same_classes(plan.saved.get("class_names"), bundle.class_names, plan.resume)
    except (DataError, ResumeError) as exc:
        raise CliError(str(exc)) from exc
    model = _build_model(plan, bundle, pre)
    precision = args.precision or recipe.precision
    if dist.is_main:
        _print_start(plan, model, bundle, pre, dist, precision, threads)
    options = RunOptions(
        output=args.output,
        model_name=args.model,
        device=plan.device,
        precision=precision,
        seed=args.seed,
        resume=plan.resume,
        overwrite=args.overwrite,
        progress=not args.quiet and sys.stderr.isatty(),
        checkpoint_every=parse_checkpoint_every(args.checkpoint_every),
        save_on_signal=args.save_on_signal,
        tensorboard=args.tensorboard,
        extra={
            "data": source.describe(),
            "torch": str(torch.__version__),
            # the clip settings used (size, crop and normalisation included)
            **({"video": dataclasses.asdict(bundle.clip_spec)} if video else {}),
            **({"architecture": plan.architecture} if plan.architecture else {}),
        },
    )
    try:
        summary = fit(model, bundle, recipe, pre, options, dist)
    except TrainingError as exc:
        raise CliError(str(exc)) from exc
    if dist.is_main:
        _print_summary(summary, bundle, video)


def _build_model(plan: _Plan, bundle, pre):
    """The model to train: built for the data, from the resumed run's or --checkpoint's
    replicates, with the --checkpoint weights when fine-tuning."""
    from sparseformer.cli import CliError
    from sparseformer.engine.collaborators import enable_grad_checkpointing
    from sparseformer.weights.build import build_model, naming_their_model, patch_grid_problem
    from sparseformer.weights.checkpoint import checkpoint_replicates
    from sparseformer.weights.loading import load_weights

    args, resume = plan.args, plan.resume
    frames = bundle.clip_spec.num_frames if plan.video and bundle.clip_spec else None
    start_from = resume if resume is not None else plan.start  # a run's file: read again
    model = build_model(
        args.model, bundle.num_classes, pre.img_size, plan.recipe.drop_path, num_frames=frames,
        replicates=checkpoint_replicates(start_from, args.model) if start_from else None,
        offset_proj_init=plan.recipe.offset_proj_init, architecture=plan.architecture,
    )  # fmt: skip
    # a new run at a size its ViT's patches do not tile (a run resumed keeps its own size)
    if resume is None and (problem := patch_grid_problem(model, pre.img_size)) is not None:
        raise CliError(problem)
    if plan.start is not None:  # fine-tuning (read once, in _plan); not held for the run
        with naming_their_model(plan.start, args.model):
            load_weights(model, plan.start, class_names=bundle.class_names)
        plan.start = plan.start.without_weights()
    if args.grad_checkpointing:
        try:
            enable_grad_checkpointing(model, args.model)
        except ValueError as exc:
            raise CliError(str(exc)) from None
    return model


def _print_start(plan: _Plan, model, bundle, pre, dist, precision: str, threads: int) -> None:
    from sparseformer.data.scan import counted

    args, recipe = plan.args, plan.recipe
    n = sum(p.numel() for p in model.parameters())
    what, size = "images", f"{pre.img_size}px"
    if bundle.clip_spec is not None:
        clip = bundle.clip_spec
        step = f" {clip.stride} apart" if clip.sampling == "dense" else ", uniform"
        what, size = "videos", f"clips of {clip.num_frames} frames{step} at {size}"
    print(
        f"training {args.model} ({n:,} params) on {plan.source.describe()}: "
        f"{len(bundle.train):,} train / {len(bundle.val):,} val {what}, "
        f"{counted(bundle.num_classes, 'class')}, {size}, recipe {recipe.name}, "
        f"{counted(recipe.epochs, 'epoch')} x {recipe.batch_size} x "
        f"{counted(dist.world_size, 'process')}, {plan.device}, {precision}, "
        f"{counted(threads, 'thread')}"
    )


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
        print(nothing_to_do(summary["epochs"]))
        return
    if not final:
        return
    from sparseformer.cli.common import epochs_and_time
    from sparseformer.engine.metrics import format_accuracy

    if final.get("val_images") == 0:  # nothing scored: every validation file failed to decode
        scores = "val nothing scored"
    else:
        scores = f"val {format_accuracy(final['val_acc1'], final['val_acc5'])}"
        if final.get("ema_val_acc1") is not None:
            scores += f", EMA top-1 {final['ema_val_acc1']:.2f}%"
    best = summary["best_val_acc1"]
    best = "no best" if best is None else f"best top-1 {best:.2f}% (epoch {summary['best_epoch']})"
    print(
        f"done: {epochs_and_time(summary['epochs'], summary['train_seconds'])} of training; "
        "last epoch: "
        f"{scores}; {best}"
    )
    kept = [summary["last_checkpoint"], summary["best_checkpoint"]]
    print(f"checkpoints: {', '.join(p for p in kept if p is not None)}")
    print(f"metrics: {summary['metrics']}, curves: {summary['plot']}")
