"""What the commands share: argparse types, the data and clip flags, the flags turned into
library values (data source, clip sampling, recipe request), and how a command that takes many
files reports one it cannot use and goes on with the others (``predict``, ``viz``). Heavy
modules are imported inside the functions, so that ``sparseformer --help`` stays fast."""

from __future__ import annotations

import argparse
import json
import sys
import unicodedata
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch's import is the command's, not --help's
    from sparseformer.weights.checkpoint import Checkpoint

__all__ = [
    "positive_int",
    "count",
    "add_clip_arguments",
    "add_data_arguments",
    "add_saving_arguments",
    "check_precision",
    "epochs_and_time",
    "nothing_to_do",
    "data_source",
    "check_model_fits_data",
    "refuse_video_flags_on_images",
    "recipe_flags",
    "MODEL_FROM_CHECKPOINT",
    "model_and_read_checkpoint",
    "wrong_kind",
    "skip_file",
]


def epochs_and_time(epochs: int, seconds: float) -> str:
    """``"1 epoch in 0.4 s"``, ``"1 epoch in 12 s"``, ``"30 epochs in 5.6 min"``: a run's length
    as the CLI says it (a short run's tenths: "0 s" read as nothing done)."""
    from sparseformer.data.scan import counted

    took = (
        f"{seconds:.{1 if seconds < 10 else 0}f} s" if seconds < 60 else f"{seconds / 60:.1f} min"
    )
    return f"{counted(epochs, 'epoch')} in {took}"


def check_precision(precision: str, device: str) -> None:
    """A precision the device cannot train in (fp16 on a CPU), refused before any work.

    Raises:
        CliError: what to use instead.
    """
    from sparseformer.cli import CliError
    from sparseformer.engine.trainer import TrainingError, amp_dtype_for

    try:
        amp_dtype_for(precision, device)
    except TrainingError as exc:
        raise CliError(str(exc)) from None


def nothing_to_do(epochs: int, run: Path | None = None) -> str:
    """What resuming a finished run says (``run``: its checkpoint)."""
    from sparseformer.data.scan import counted

    where = f"the run in {run}" if run is not None else "the run"
    return (f"nothing to do: {where} already has {counted(epochs, 'epoch')} (give a larger "
            "--epochs to train it further)")  # fmt: skip


def add_saving_arguments(g) -> None:
    """``--checkpoint-every`` and ``--save-on-signal``, as train and bootstrap take them."""
    g.add_argument(
        "--checkpoint-every", metavar="N|DURATION",
        help="also save last.pt within epochs: at every N-th step of an epoch, or every 90s "
        "/ 30m / 2h (resuming from one continues the same trajectory)",
    )  # fmt: skip
    g.add_argument(
        "--save-on-signal", action=argparse.BooleanOptionalAction, default=True,
        help="on SIGTERM (a scheduler's preemption), save last.pt at the next step, then stop "
        "(default: on); Ctrl-C stops at the next step without saving",
    )  # fmt: skip


def _whole_number(text: str) -> int:
    """``int(text)``, or argparse's error in words (not "invalid positive_int value")."""
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"give a whole number, got {text!r}") from None


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    value = _whole_number(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def image_size(text: str) -> int:
    """An argparse type: an input size in pixels, within
    :data:`~sparseformer.config.IMG_SIZES` (``--img-size`` of train, bootstrap, eval, viz and
    export)."""
    from sparseformer.config import IMG_SIZES

    value, (low, high) = _whole_number(text), IMG_SIZES
    if not low <= value <= high:
        raise argparse.ArgumentTypeError(f"give {low} to {high} pixels, got {value}")
    return value


def count(text: str) -> int:
    """An argparse type: an integer >= 0."""
    value = _whole_number(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be at least 0, got {value}")
    return value


def add_clip_arguments(p, prefix: str = "") -> None:
    """``--frames``, ``--frame-stride`` and ``--sampling`` (help text after ``prefix``), which
    default to what a checkpoint records: train, eval and predict take them alike."""
    p.add_argument(
        "--frames",
        "--num-frames",  # the name bench, info and export give it first
        dest="frames",
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


def add_data_arguments(
    p: argparse.ArgumentParser, *, train: bool = True, video: bool = True
) -> None:
    """The data flags; ``train=False`` (eval, which reads the val split only) leaves out
    ``--limit-train``, ``video=False`` (a command that takes images only) the clip flags."""
    g = p.add_argument_group("data (one of --data-dir and --dataset)")
    g.add_argument(
        "--data-dir", type=Path, help="ImageFolder root: DIR/train/CLASS/*, DIR/val/CLASS/*"
    )
    g.add_argument("--dataset", help="built-in data set: fashion-mnist")
    g.add_argument(
        "--data-root", type=Path,
        help="cache folder for built-in data sets (default: $XDG_CACHE_HOME/sparseformer/datasets, "
        "else ~/.cache/sparseformer/datasets)",
    )  # fmt: skip
    if train:
        g.add_argument(
            "--limit-train",
            type=positive_int,
            metavar="N",
            help="use only N training images (spread over a folder's classes; a built-in data "
            "set's first N)",
        )
    else:
        p.set_defaults(limit_train=None)
    g.add_argument(
        "--limit-val",
        type=positive_int,
        metavar="N",
        help="use only N val images (spread over a folder's classes; a built-in data set's "
        "first N)",
    )
    if not video:
        p.set_defaults(frames=None, frame_stride=None, sampling=None, clips=1, crops=1)
        return
    g = p.add_argument_group("video folders (DIR/train/CLASS/*.mp4; video models)")
    add_clip_arguments(g)
    g.add_argument("--clips", type=positive_int, default=1, help="test clips per video (eval)")
    g.add_argument(
        "--crops", type=int, choices=(1, 3), default=1, help="test crops per clip (eval)"
    )


def clip_flags(args: argparse.Namespace) -> dict:
    """The clip flags as :class:`~sparseformer.data.clips.ClipSpec` fields (``None``: not given)."""
    return {"num_frames": args.frames, "stride": args.frame_stride, "sampling": args.sampling}


def data_source(
    args: argparse.Namespace,
    views: bool = True,
    saved: dict | None = None,
    trained_on: str | None = None,
):
    """The data the flags name; ``saved``: a checkpoint's ``video`` record (clip defaults).
    ``views=False`` keeps one test view (training). ``trained_on``: the data a resumed run
    trained on (its checkpoint's ``data``), named where no data is given."""
    from sparseformer.data import BUILTIN_DATASETS, DataError, DataSource
    from sparseformer.engine.video import choose_clip_spec

    if args.data_dir is None and args.dataset is None and trained_on:
        flag = "--dataset" if trained_on in BUILTIN_DATASETS else "--data-dir"
        raise DataError(
            f"give the data to train on: the run trained on {trained_on} ({flag} {trained_on})"
        )

    clips, crops = (args.clips, args.crops) if views else (1, 1)
    model = getattr(args, "model", None)
    return DataSource(
        args.data_dir,
        args.dataset,
        args.data_root,
        args.limit_train,
        args.limit_val,
        video=choose_clip_spec(model, clip_flags(args), saved, clips, crops),
    )


def check_model_fits_data(model_name: str, args: argparse.Namespace) -> bool | None:
    """:func:`sparseformer.engine.video.check_model_fits_data` on ``--data-dir``.

    Raises:
        CliError: the model's kind and the data's differ.
    """
    from sparseformer.cli import CliError
    from sparseformer.data import DataError
    from sparseformer.engine.video import check_model_fits_data as fits

    try:
        return fits(model_name, args.data_dir)
    except DataError as exc:
        raise CliError(str(exc)) from None


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
        verb = "applies" if len(given) == 1 else "apply"
        raise CliError(f"{', '.join(given)} {verb} to videos only; {why}")


def recipe_flags(args: argparse.Namespace):
    """What ``train``'s flags ask of the recipe: a
    :class:`~sparseformer.engine.recipe.RecipeFlags`."""
    from sparseformer.engine.recipe import RecipeFlags

    fields = {field: getattr(args, flag) for field, (flag, _, _) in _RECIPE_FLAGS.items()}
    return RecipeFlags(
        args.recipe,
        {k: v for k, v in fields.items() if v is not None},
        tuple(args.set),
        {field: f"--{flag.replace('_', '-')}" for field, (flag, _, _) in _RECIPE_FLAGS.items()},
    )


def add_recipe_flags(group, img_size: str, drop_path: bool = True) -> None:
    """The flags that set a recipe's fields (train's and bootstrap's, in their words once;
    ``--precision`` is among each command's run flags); ``img_size``: what --img-size is, in
    the command's words. Without ``drop_path`` its field stays the recipe's."""
    for field, (flag, kind, says) in _RECIPE_FLAGS.items():
        if field == "precision" or (field == "drop_path" and not drop_path):
            continue
        says = img_size if field == "img_size" else says
        group.add_argument(f"--{flag.replace('_', '-')}", type=kind, help=says)
    if not drop_path:
        group.set_defaults(drop_path=None)  # read by recipe_flags all the same


# recipe field -> the flag of its own that sets it (its argparse name), its type and its help
_RECIPE_FLAGS = {
    "epochs": ("epochs", positive_int, "passes over the training data"),
    "batch_size": ("batch_size", positive_int, "images per process and step"),
    "img_size": ("img_size", image_size, None),
    "lr": ("lr", float, "peak learning rate for a total batch of 512"),
    "warmup_epochs": ("warmup_epochs", float, "epochs of linear learning-rate warm-up"),
    "weight_decay": ("weight_decay", float, "AdamW weight decay"),
    "drop_path": ("drop_path", float, "stochastic depth rate"),
    "num_workers": ("workers", count, "data-loading processes per training process"),
    "precision": ("precision", None, None),
}


MODEL_FROM_CHECKPOINT = (
    "the model the checkpoint belongs to (default: the one a `sparseformer train` checkpoint names)"
)


def model_and_read_checkpoint(args: argparse.Namespace) -> tuple[str, Checkpoint | None]:
    """``args.model``, or when it is not given the model ``args.checkpoint`` names (a
    ``sparseformer train`` checkpoint does), or ``train``'s run to resume (``args.resume``);
    and ``args.checkpoint`` read where naming the model read it (else ``None``), so that the
    command reads the file once.

    Raises:
        CliError: neither given nor named, with what to pass.
    """
    if args.model is not None:
        return args.model, None
    from sparseformer.cli import CliError
    from sparseformer.engine.resume import ResumeError, read_resume_checkpoint, resolve_resume
    from sparseformer.weights.checkpoint import check_model, read_checkpoint

    path = args.checkpoint
    if getattr(args, "resume", None) is not None:  # the run goes on as the model it is
        try:
            resume = resolve_resume(args.resume, args.output, overwrite=args.overwrite)
            saved = read_resume_checkpoint(resume, None) if resume is not None else {}
        except ResumeError as exc:  # a cut file: its way
            raise CliError(str(exc)) from None
        if resume is not None:
            if saved.get("model_name") is None:
                raise CliError(f"{resume} does not name its model; pass --model NAME")
            return saved["model_name"], None
        if path is None:  # nothing to resume yet, and no --checkpoint to start it from
            raise CliError(f"which model? {args.output} holds no run to resume yet; pass "
                           "--model NAME to start one")  # fmt: skip
    if path is None:
        raise CliError("which model? pass --model NAME (see `sparseformer models`)")
    read = None
    try:  # its name is a fact of the file, read here once for the command
        read = read_checkpoint(path)
        return check_model(read, None), read
    except ValueError as exc:
        if type(exc) is not ValueError:  # CheckpointError: printed as it is
            raise
    from sparseformer.weights.build import models_with_weights

    found = models_with_weights(read.state_dict) if read is not None else []  # theirs name none
    name = found[0] if found else "NAME"
    whose = f" (its weights are those of {' or '.join(found)})" if found else ""
    raise CliError(f"{path} does not name its model{whose}; pass --model {name}")


def wrong_kind(path: Path, model_name: str, video_model: bool) -> str | None:
    """Why ``path`` cannot go to the model (an image for a video model, the other way round,
    a broken link), or ``None``."""
    from sparseformer.data.images import IMAGE_EXTENSIONS
    from sparseformer.data.video import VIDEO_EXTENSIONS

    if path.suffix.lower() in (IMAGE_EXTENSIONS if video_model else VIDEO_EXTENSIONS):
        if video_model:
            why = f"an image, but {model_name} is a video model; use an image model"
        else:
            why = f"a video, but {model_name} is an image model; use a video model"
        return f"{why} (`sparseformer models` lists them)"
    if path.is_symlink() and not path.exists():  # listed in a folder, its target gone
        return "a broken symbolic link"
    return None


def skip_file(path: Path, why: str, as_json: bool = False) -> int:
    """Report a file that a command taking many files cannot use, which then goes on with the
    others: ``PATH: WHY; skipped`` on stderr, and with ``--json`` also a record on stdout
    (``{"image": ..., "error": ...}``) so that a script sees every input. Returns 1 (a count)."""
    print(f"{for_terminal(str(path))}: {for_terminal(why)}; skipped", file=sys.stderr)
    if as_json:
        print(json.dumps({"image": str(path), "error": why}))
    return 1


# bidirectional overrides and isolates, which reorder what a terminal shows
_BIDI = frozenset("\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def for_terminal(text: str) -> str:
    """``text`` (a class or file name: data) with its control characters escaped (``\\x1b``,
    ``\\n``), so that a name cannot clear the screen, move the cursor or print a line of its
    own; other characters, bytes of non-UTF-8 file names included, are printed as they are."""
    return "".join(
        c.encode("unicode_escape").decode("ascii")
        if unicodedata.category(c) == "Cc" or c in _BIDI
        else c
        for c in text
    )
