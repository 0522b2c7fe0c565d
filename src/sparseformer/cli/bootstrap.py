"""``sparseformer bootstrap``: make a SparseFormer from a pretrained timm ViT (Gao et al.,
CVPR 2024): the ViT's last blocks, final norm and head become the SparseFormer's cortex, and
the new focusing part trains to give the ViT's own final representation on the same images.

A training run like ``train`` (recipes, torchrun, bf16/fp16, --resume auto) writing to
--output: last.pt / best.pt (load them with --checkpoint in eval, predict, viz, export),
metrics.jsonl (train_loss and val_loss are the alignment loss; val_acc1 the student's and
teacher_val_acc1 the teacher's top-1, where the teacher's outputs are the data's classes),
metrics.png and summary.json.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sparseformer.cli.common import (
    add_data_arguments,
    add_recipe_flags,
    add_saving_arguments,
    check_precision,
    count,
    data_source,
    nothing_to_do,
    positive_int,
    recipe_flags,
)

__all__ = ["register", "run"]

EXAMPLES = """examples:
  sparseformer bootstrap --teacher vit_base_patch16_224.augreg_in21k_ft_in1k \\
      --teacher-checkpoint vit_b16.safetensors --data-dir /data/imagenet --output runs/bt
  sparseformer bootstrap --teacher runs/vit/best.pt --dataset fashion-mnist --output runs/bt \\
      --tokens 16 --points 16 --epochs 5
  sparseformer bootstrap ... --resume auto     # continue from runs/.../last.pt
"""


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bootstrap",
        help="make a SparseFormer from a pretrained timm ViT (teacher alignment)",
        description=__doc__,
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    g = p.add_argument_group("teacher and student")
    g.add_argument("--teacher", required=True, help="timm ViT name, or a train checkpoint of one")
    g.add_argument("--teacher-checkpoint", type=Path, help="weights for a --teacher name")
    g.add_argument(
        "--random-teacher", action="store_true",
        help="a --teacher name without weights, untrained (to check that a run works)",
    )  # fmt: skip
    g.add_argument("--student", help="a sparseformer_btsp_* model to follow (its widths)")
    g.add_argument("--tokens", type=positive_int, help="latent tokens (default 48)")
    g.add_argument(
        "--points", type=positive_int, help="sampling points, a square of at least 4 (default 36)"
    )
    g.add_argument("--inherit", type=positive_int, help="teacher blocks kept (default 2/3)")
    g.add_argument("--focus-width", type=positive_int, help="focusing width (default D/2)")
    g.add_argument(
        "--finetune", type=count, default=0, help="inherited blocks that train, the first ones"
    )
    g.add_argument("--loss", choices=("cosine", "smooth_l1"), default="cosine")
    add_data_arguments(p, video=False)  # its teachers are image ViTs
    p.add_argument("--output", type=Path, required=True, help="run folder")
    g = p.add_argument_group("recipe (defaults come from --recipe, as for train)")
    g.add_argument("--recipe", help="shipped recipe name or a JSON file")
    add_recipe_flags(g, img_size="teacher input size (a timm name)", drop_path=False)
    g.add_argument("--set", nargs="+", action="extend", default=[], metavar="KEY=VALUE",
                   help="any recipe field, value in JSON")  # fmt: skip
    g = p.add_argument_group("run")
    g.add_argument("--resume", help="training checkpoint to continue, or 'auto'")
    g.add_argument("--overwrite", action="store_true", help="start over in an --output with a run")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), help="default: the recipe's")
    g.add_argument("--device", default="auto", help="auto (default), cpu, cuda or cuda:N")
    g.add_argument(
        "--threads", type=positive_int, help="CPU threads per process (default: free cores, shared)"
    )
    g.add_argument("--seed", type=int, help="default 0; a resumed run's own")
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    add_saving_arguments(g)
    p.set_defaults(func=run)


@dataclass
class _Plan:
    args: argparse.Namespace
    device: str
    recipe: Any
    source: Any
    settings: Any
    resume: Path | None = None
    saved: dict = field(default_factory=dict)
    img_size: int | None = None  # the teacher's input size; None: its own


def run(args: argparse.Namespace) -> int:
    from sparseformer.cli import CliError
    from sparseformer.data import DataError
    from sparseformer.engine import distributed
    from sparseformer.engine.recipe import RecipeError

    distributed.quiet_other_ranks()  # the plan's warnings are every rank's: the first says them
    try:
        plan = _plan(args)
    except (DataError, RecipeError, ValueError) as exc:
        raise CliError(str(exc)) from exc
    if plan is None:
        return 0
    dist = distributed.setup_distributed(plan.device)
    try:
        _bootstrap(plan, dist)
    finally:
        distributed.cleanup_distributed()
    return 0


def _plan(args: argparse.Namespace) -> _Plan | None:
    """Device, recipe, what to resume (its own settings), data source, output folder."""
    from sparseformer.bootstrap.run import BootstrapSettings
    from sparseformer.bootstrap.teacher import check_teacher_weights
    from sparseformer.cli import CliError, check_output
    from sparseformer.data.video import is_video_folder
    from sparseformer.engine.device import pick_device
    from sparseformer.engine.distributed import launched_rank
    from sparseformer.engine.own_folder import recipe_for_folder
    from sparseformer.engine.recipe import recipe_from_flags
    from sparseformer.engine.resume import (
        read_resume_checkpoint,
        resolve_resume,
        resumed_recipe,
        resumed_seed,
        run_is_finished,
        warn_of_other_data,
    )
    from sparseformer.engine.run_folder import refuse_overwriting_a_run
    from sparseformer.engine.stopping import parse_checkpoint_every
    from sparseformer.weights.checkpoint import record_of

    check_teacher_weights(args.teacher, args.teacher_checkpoint, args.random_teacher)
    parse_checkpoint_every(args.checkpoint_every)  # a bad value: one line, before any work
    device = pick_device(args.device)
    if args.precision:  # an asked fp16 on a CPU: before the folder is counted
        check_precision(args.precision, device)
    if args.data_dir is not None and is_video_folder(args.data_dir):
        raise CliError(f"{args.data_dir} holds videos; bootstrap takes image folders "
                       "(DIR/train/CLASS/*.jpg): its teachers are image ViTs")  # fmt: skip
    flags = recipe_flags(args)
    # no --recipe on a folder: one scaled to its size, the run's length and the device, as
    # train chooses (not ImageNet's 300 epochs in bf16 on a CPU)
    own = recipe_for_folder(flags, args.data_dir, limit=args.limit_train, device=device)
    recipe = recipe_from_flags(flags, args.dataset, own)
    settings = BootstrapSettings(
        args.tokens, args.points, args.inherit, args.focus_width, args.student,
        args.finetune, args.loss,
    )  # fmt: skip
    img_size = _asked_img_size(flags, recipe)
    resume = resolve_resume(args.resume, args.output, overwrite=args.overwrite)
    saved: dict = {}
    if resume is not None:  # the run's own recipe, size and student
        # a student of any bootstrapped name
        saved = read_resume_checkpoint(resume, None, bootstrap=True)
        recipe = resumed_recipe(saved, resume, recipe, _without_img_size(flags))
        img_size = _run_img_size(saved, img_size)
        asked, settings = settings, BootstrapSettings.from_dict(saved.get("bootstrap") or {})
        if changed := asked.changes_from(settings):
            logging.getLogger(__name__).warning(
                "resuming continues the run's own student and loss, so these changes are "
                "ignored: %s; start a new --output to change them", "; ".join(changed),
            )  # fmt: skip
        if run_is_finished(saved, recipe, args.output):
            if launched_rank()[0] == 0:
                print(nothing_to_do(int(saved.get("epoch", 0)), resume))
            return None
    args.seed = resumed_seed(saved, args.seed)  # a resumed run keeps its own, like its recipe
    source = data_source(args, views=False, trained_on=saved.get("data"))
    warn_of_other_data(saved.get("data"), source.describe(), resume)  # nothing saved: no run
    check_output(args.output, "--output", folder=True)
    source.check_output_outside(args.output)  # not among the images
    refuse_overwriting_a_run(args.output, resume=resume, overwrite=args.overwrite)
    check_precision(args.precision or recipe.precision, device)  # fp16 on a CPU
    # its record only: restore_run reads the weights and optimizer state again (record_of)
    return _Plan(args, device, recipe, source, settings, resume, record_of(saved), img_size)


def _asked(flags, recipe, field: str):
    """The recipe's ``field`` where a flag asks for it (``--img-size``, ``--set
    crop_pct=0.9``), else ``None``: the teacher's preprocessing is the default, not the
    recipe's."""
    asked = field in flags.fields or any(item.partition("=")[0] == field for item in flags.settings)
    return getattr(recipe, field) if asked else None


def _asked_img_size(flags, recipe) -> int | None:
    """The input size asked for, by --img-size or --set img_size=N."""
    return _asked(flags, recipe, "img_size")


def _without_img_size(flags):
    """``flags`` without the input size: bootstrap's is the teacher's, not a recipe field."""
    return dataclasses.replace(
        flags,
        fields={k: v for k, v in flags.fields.items() if k != "img_size"},
        settings=tuple(s for s in flags.settings if s.partition("=")[0] != "img_size"),
    )


def _run_img_size(saved: dict, asked: int | None) -> int | None:
    """The size a resumed run trained at (a warning where another was asked)."""
    size = saved["preprocessing"].get("img_size")
    if asked is not None and size is not None and asked != size:
        logging.getLogger(__name__).warning(
            "resuming continues the run at its own %dpx, so the asked %dpx is ignored; start a "
            "new run to change it", size, asked,
        )  # fmt: skip
    return size if size is not None else asked


def _bootstrap(plan: _Plan, dist) -> None:
    """Teacher, data, and :func:`sparseformer.bootstrap.run.bootstrap` on every process."""
    import torch

    from sparseformer.bootstrap.run import bootstrap, student_config
    from sparseformer.bootstrap.teacher import check_resumed_teacher, load_teacher
    from sparseformer.cli import CliError
    from sparseformer.data import DataError, build_datasets
    from sparseformer.data.scan import counted
    from sparseformer.data.transforms import Preprocessing
    from sparseformer.engine.device import set_threads
    from sparseformer.engine.preprocessing import resolve_preprocessing
    from sparseformer.engine.stopping import parse_checkpoint_every
    from sparseformer.engine.trainer import RunOptions, TrainingError, seed_everything

    args, recipe = plan.args, plan.recipe
    if not dist.is_main:
        logging.getLogger().setLevel(logging.WARNING)
    threads = set_threads(args.threads, dist)
    seed_everything(args.seed)  # the same student on every rank
    teacher = load_teacher(
        args.teacher, args.teacher_checkpoint, plan.img_size, random_ok=args.random_teacher
    )
    student_config(teacher, plan.settings)  # a setting the teacher cannot give: before the data
    # the teacher sees what the student sees: its own preprocessing, with the crop and
    # interpolation flags ask for (the size built it)
    flags = recipe_flags(args)
    crop, interpolation = (_asked(flags, recipe, f) for f in ("crop_pct", "interpolation"))
    pre = resolve_preprocessing(teacher.preprocessing, None, crop, interpolation)
    if plan.resume is not None:
        check_resumed_teacher(teacher, plan.saved)
        pre = Preprocessing.from_dict(plan.saved["preprocessing"])
    try:
        bundle = build_datasets(plan.source, pre, recipe.augmentation, share_check=True)
    except DataError as exc:
        raise CliError(str(exc)) from exc
    precision = args.precision or recipe.precision
    if dist.is_main:
        print(f"bootstrapping from {teacher.name} on {plan.source.describe()}: "
              f"{len(bundle.train):,} train / {len(bundle.val):,} val images, {pre.img_size}px, "
              f"recipe {recipe.name}, {counted(recipe.epochs, 'epoch')} x {recipe.batch_size}, "
              f"{plan.device}, {precision}, {counted(threads, 'thread')}")  # fmt: skip
    options = RunOptions(  # model_name: a resumed run's (a new one's is the student's)
        output=args.output, model_name=plan.saved.get("model_name") or "",
        device=plan.device, precision=precision,
        seed=args.seed, resume=plan.resume, overwrite=args.overwrite,
        progress=not args.quiet and sys.stderr.isatty(),
        checkpoint_every=parse_checkpoint_every(args.checkpoint_every),
        save_on_signal=args.save_on_signal,
        extra={"data": plan.source.describe(), "torch": str(torch.__version__)},
    )  # fmt: skip
    try:
        summary = bootstrap(teacher, bundle, recipe, pre, options, plan.settings, dist)
    except TrainingError as exc:
        raise CliError(str(exc)) from exc
    if dist.is_main:
        _print_summary(summary)


def _print_summary(summary: dict) -> None:
    from sparseformer.cli.common import epochs_and_time
    from sparseformer.engine.metrics import NOTHING_SCORED, format_loss

    final, teacher = summary["final"], summary["teacher"]
    if summary["epochs_run"] == 0 or not final:
        print(nothing_to_do(summary["epochs"]))
        return
    if final.get("val_images") == 0:  # every validation file failed to decode
        scores = NOTHING_SCORED
    elif final["val_acc1"] is None:  # the labels are not the teacher's classes (a CLIP tower)
        scores = "no accuracy (the teacher's outputs are not the data's classes)"
    else:
        scores = (f"val top-1 student {final['val_acc1']:.2f}%, teacher "
                  f"{teacher['val_acc1']:.2f}%")  # fmt: skip
    print(
        f"done: {epochs_and_time(summary['epochs'], summary['train_seconds'])}; "
        f"alignment loss train {final['train_loss']:.4f}, val {format_loss(final['val_loss'])}; "
        f"{scores}; {final['images_per_second']:.0f} img/s"
    )
    kept = [summary["last_checkpoint"], summary["best_checkpoint"]]
    print(f"checkpoints: {', '.join(p for p in kept if p is not None)}")
    print(f"metrics: {summary['metrics']}, curves: {summary['plot']}")
