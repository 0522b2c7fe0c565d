"""Continuing a run: which checkpoint ``--resume`` names, what a resumed run keeps of its own
(recipe, clips, classes) whatever the flags ask, and the state a training checkpoint restores.

A resumed run continues exactly: its own recipe (only ``--epochs``, which may grow, and
``--workers``, a machine's own setting, apply), its own clip sampling, its classes; what the
flags asked otherwise is named in a warning.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from sparseformer.data.loader import SeededRepeatAugSampler
from sparseformer.data.scan import counted, first_names
from sparseformer.engine import checkpoint as ckpt_io
from sparseformer.engine.collaborators import TrainingParts
from sparseformer.engine.distributed import DistInfo
from sparseformer.engine.loop import EpochProgress
from sparseformer.engine.recipe import Recipe, RecipeFlags, list_recipes, saved_recipe
from sparseformer.engine.run_folder import find_resume_checkpoint, summary_epochs
from sparseformer.engine.step_saves import progress_from_record
from sparseformer.weights.convert import CheckpointError, UnreadableCheckpoint

__all__ = [
    "DATA_ORDER",
    "ResumeError",
    "RunState",
    "resolve_resume",
    "read_resume_checkpoint",
    "resumed_recipe",
    "run_is_finished",
    "keep_run_clips",
    "resumed_seed",
    "check_same_classes",
    "warn_of_other_data",
    "keep_saved_data_order",
    "restore_run",
]

logger = logging.getLogger(__name__)

# how a run goes on from a resumed one's weights with other settings (bootstrap has no
# --checkpoint of its own: a student fine-tunes with train)
_NEW_RUN = "(`sparseformer train --checkpoint` starts one from these weights)"

# How the training order is drawn, saved in checkpoints: "seed+epoch" since the repeated-
# augmentation sampler took --seed; checkpoints without it resume with its old, epoch-only order.
DATA_ORDER = "seed+epoch"

# recipe fields that apply on resume: --epochs (the total may grow), --workers (a machine's own
# setting) and --precision (a run option)
_APPLY_ON_RESUME = ("epochs", "num_workers", "precision")


class ResumeError(ValueError):
    """A run that cannot be resumed as asked; the message says what to do."""


def resolve_resume(resume: str | None, output: Path, *, overwrite: bool = False) -> Path | None:
    """The checkpoint ``--resume`` names: a path, or with ``"auto"`` the run folder's own
    (``None`` when it has none yet: the run starts).

    Raises:
        ResumeError: both resuming and starting over were asked for.
    """
    if resume and overwrite:
        raise ResumeError(
            "--overwrite starts the run over and --resume continues it; give one of them"
        )
    if resume == "auto":  # last.pt, else best.pt (a kill between the two saves)
        return find_resume_checkpoint(output)
    return Path(resume) if resume else None


def read_resume_checkpoint(
    resume: Path, model_name: str | None, *, bootstrap: bool = False
) -> dict[str, Any]:
    """The training checkpoint ``resume``, checked to be one of ``model_name`` (``None``:
    any model's, to learn which) and of the command resuming it: a ``sparseformer
    bootstrap`` run's (``bootstrap``), else a ``sparseformer train`` run's (their optimizers
    differ, and torch would say only that a parameter group does not match)."""
    try:
        saved = ckpt_io.read_training_checkpoint(resume, model_name)
    except UnreadableCheckpoint as exc:  # cut short, overwritten: the run's best.pt may read
        best = Path(resume).with_name(ckpt_io.BEST)
        other = Path(resume).name != ckpt_io.BEST and best.is_file() and Path(resume).is_file()
        hint = f"; --resume {best} continues from the run's best epoch instead" if other else ""
        raise ResumeError(f"{exc}{hint}") from None
    except CheckpointError as exc:  # another model's run, ...: its best.pt would be too
        raise ResumeError(str(exc)) from None
    of_bootstrap = saved.get("bootstrap") is not None
    if bootstrap and not of_bootstrap:
        raise ResumeError(
            f"{resume} is a checkpoint of {saved.get('model_name') or 'a model'}, not of a "
            "bootstrap run; continue it with sparseformer train --resume"
        )
    if of_bootstrap and not bootstrap:
        raise ResumeError(
            f"{resume} is a checkpoint of a bootstrap run; continue it with sparseformer "
            f"bootstrap --resume, or fine-tune its student with --checkpoint {resume}"
        )
    return saved


def resumed_recipe(
    saved: dict[str, Any], resume: Path, asked: Recipe, flags: RecipeFlags
) -> Recipe:
    """The run's own recipe (``saved``: its checkpoint), with the ``--epochs`` and
    ``--workers`` of ``flags``; every other change ``asked`` holds is named in a warning.

    Raises:
        ResumeError: ``--epochs`` below the epochs the run already has.
    """
    done = int(saved.get("epoch", 0))
    epochs, workers = flags.fields.get("epochs"), flags.fields.get("num_workers")
    if epochs is not None and epochs < done:
        raise ResumeError(
            f"the run in {resume} already has {counted(done, 'epoch')}; --epochs "
            "is the total, so "
            f"give at least {done} (or leave it out to finish the run's own schedule)"
        )
    recipe = saved_recipe(saved["recipe"])
    if epochs is not None and epochs != recipe.epochs:
        logger.warning(
            "the learning-rate schedule now spans %d epochs where the run's spanned %d: from "
            "epoch %d on it follows the new length, so the run will not match one trained "
            "for %d epochs from the start", epochs, recipe.epochs, done + 1, epochs,
        )  # fmt: skip
        recipe = recipe.replace(epochs=epochs)
    if workers is not None:  # the data order stays; a machine's own setting
        recipe = recipe.replace(num_workers=workers)
    warn_ignored_on_resume(flags, asked, recipe)
    return recipe


def warn_ignored_on_resume(flags: RecipeFlags, asked: Recipe, recipe: Recipe) -> None:
    """Resuming keeps the run's recipe: name each field the flags (or ``--recipe`` and
    ``--set``) asked to change, with both values. ``--epochs`` and ``--workers`` do apply.
    ``--recipe`` naming the run's own shipped recipe (the training command typed again) asks
    for no more than its other flags do."""

    def flat(r) -> dict:
        d = r.to_dict()
        d.update({f"augmentation.{k}": v for k, v in d.pop("augmentation").items()})
        return d

    wanted, kept = flat(asked), flat(recipe)
    # the run's own shipped recipe typed again asks only what the flags ask; another recipe,
    # or a recipe file (which may have been edited since), every field of it
    same_shipped = flags.name in list_recipes() and wanted["name"] == kept["name"]
    if flags.name and not same_shipped:
        keys = [k for k in wanted if k not in ("epochs", "num_workers", "name", "precision")]
    else:  # only what the flags named
        keys = [f for f in flags.fields if f not in _APPLY_ON_RESUME]
        for item in flags.settings:
            key = item.partition("=")[0]
            keys.append(key if key in wanted else f"augmentation.{key}")
    changed = [
        f"{k} (asked {_shown(wanted[k])}, the run's {_shown(kept[k])})"
        for k in dict.fromkeys(keys)
        if k in wanted and wanted[k] != kept[k]
    ]
    if changed:
        logger.warning(
            "resuming continues the run's own recipe, so these changes are ignored: %s; start "
            f"a new run to change them {_NEW_RUN}",
            "; ".join(changed),
        )


def run_is_finished(saved: dict[str, Any], recipe: Recipe, output: Path) -> bool:
    """Whether the resumed run has nothing left to do: its checkpoint holds every epoch of
    ``recipe`` and ``output``'s summary says the run ended there."""
    done = int(saved.get("epoch", 0))
    return recipe.epochs <= done and summary_epochs(output) == done


# clip flag (argparse name) -> the checkpoint's video record key
CLIP_FLAGS = (("frames", "num_frames"), ("frame_stride", "stride"), ("sampling", "sampling"))


def keep_run_clips(asked: dict[str, Any], clips: dict[str, Any]) -> None:
    """A resumed video run samples its clips as it did (``clips``: its checkpoint's ``video``
    record); a clip flag in ``asked`` (``frames``, ``frame_stride``, ``sampling``; ``None``:
    not given) that asked otherwise is named in a warning, as recipe changes are."""
    changed = [
        f"--{flag.replace('_', '-')} (asked {asked[flag]!r}, the run's {clips[key]!r})"
        for flag, key in CLIP_FLAGS
        if asked.get(flag) is not None and key in clips and asked[flag] != clips[key]
    ]
    if changed:
        logger.warning(
            "resuming continues the run's own clip sampling, so these changes are ignored: %s; "
            f"start a new run to change them {_NEW_RUN}",
            "; ".join(changed),
        )


def resumed_seed(saved: dict[str, Any] | None, asked: int | None) -> int:
    """The seed a run goes on with: a resumed run's own (``saved``: its checkpoint; a different
    ``asked`` seed is named in a warning, as it would change the data order and the
    augmentations), else ``asked``, else 0. Checkpoints that record no seed take ``asked``."""
    own = (saved or {}).get("seed")
    if own is None:
        return 0 if asked is None else asked
    if asked is not None and asked != own:
        logger.warning(
            "resuming continues with the run's own seed %d, so --seed %d is ignored; start a "
            f"new run to change it {_NEW_RUN}", own, asked,
        )  # fmt: skip
    return int(own)


def warn_of_other_data(trained_on: str | None, given: str, resume) -> None:
    """Say that a run resumes on data other than it trained on (``trained_on``: the
    checkpoint's ``data``, a folder or a built-in data set's name): its best top-1 so far was
    scored on the other validation set. A folder named relative to another working folder,
    which cannot be told from here, is not said."""
    if trained_on is None or trained_on == given:
        return
    if os.path.exists(trained_on) and os.path.realpath(trained_on) == os.path.realpath(given):
        return
    if os.path.exists(given) and not os.path.exists(trained_on) and not os.path.isabs(trained_on):
        return  # relative to where the run started: unknown
    logger.warning(
        "resuming %s on %s, where the run trained on %s: its best top-1 so far was scored on "
        "that data's validation set", resume, given, trained_on,
    )  # fmt: skip


def check_same_classes(trained_on: list[str] | None, class_names: list[str], resume) -> None:
    """A run resumes on the classes it was trained on (``None``: not recorded, not checked).

    Raises:
        ResumeError: the data's classes differ.
    """
    if trained_on is not None and list(trained_on) != list(class_names):
        raise ResumeError(
            f"the run in {resume} was trained on classes {first_names(trained_on, 6)}, "
            f"the data has {first_names(class_names, 6)}; resume on the same data, or "
            "start a new run with --checkpoint to fine-tune"
        )


def keep_saved_data_order(sampler, state: dict) -> None:
    """A run saved before the repeated-augmentation sampler took ``--seed`` (its checkpoints
    lack ``data_order``) resumes with that sampler's old order, shuffled by the epoch alone."""
    sampler = getattr(sampler, "inner", sampler)  # an EpochSampler's indices
    if state.get("data_order") is None and isinstance(sampler, SeededRepeatAugSampler):
        sampler.seed = 0


@dataclass
class RunState:
    """Where a run stands: epochs and steps done, the best top-1 so far, training time, and
    what a resumed run carries on (RNG states, data order, the last epoch's metrics)."""

    start_epoch: int = 0
    step: int = 0
    best: float = -1.0
    best_epoch: int = 0
    best_source: str = "model"  # which of the two scored ``best``: "model" or "ema"
    train_seconds: float = 0.0
    rng_states: list | None = None
    data_order: str | None = DATA_ORDER
    record: dict[str, Any] = field(default_factory=dict)
    epoch_progress: EpochProgress | None = None  # this rank's part of a mid-epoch checkpoint

    def update_best(self, record: dict[str, Any], epoch: int) -> bool:
        """Take ``record``'s epoch as the best if it beats the best so far, as the authors
        define the best: the higher validation top-1 of the model (``val_acc1``) and its EMA
        (``ema_val_acc1``, when on), both evaluated in fp32; a tie goes to the model.

        Returns:
            Whether ``epoch`` is the new best.
        """
        # None: no accuracy (labels that are not the model's classes), so no best either
        score, source = record["val_acc1"], "model"
        ema = record.get("ema_val_acc1")
        if ema is not None and (score is None or ema > score):
            score, source = ema, "ema"
        if score is None or score <= self.best:
            return False
        self.best, self.best_epoch, self.best_source = score, epoch, source
        return True


def _shown(value: Any) -> str:
    """A recipe value in a message: floats as a person writes them (0.15, not
    0.15000000000000002)."""
    return repr(float(f"{value:.10g}")) if isinstance(value, float) else repr(value)


def _on_new_steps(state: dict, steps_per_epoch: int) -> bool:
    """Whether a run saved in ``state`` resumes over other steps per epoch (other data, another
    batch per process). Its saved count says so; a run saved before the count was kept is
    told by its step count, which a first-epoch checkpoint agrees with whatever the steps."""
    saved = int(state.get("steps_per_epoch") or 0)
    if saved:
        return saved != steps_per_epoch
    epoch, within = int(state["epoch"]), int(state.get("epoch_step", 0))
    return int(state["step"]) != epoch * steps_per_epoch + within


def _warn_new_schedule(state: dict, saved_world: int, world: int, parts) -> None:
    """Say that a run resumed on other data or another process count goes on over new steps
    per epoch: its schedule, its peak learning rate, and a part-way epoch trained again."""
    epoch, step = int(state["epoch"]), int(state["step"])
    within = int(state.get("epoch_step", 0))
    steps = state.get("steps_per_epoch") or ((step - within) // epoch if epoch else None)
    saved = f" and {steps} steps per epoch" if steps else ""
    again = (
        f"; the {counted(within, 'step')} it had trained of epoch {epoch + 1} "
        "are trained again from that "
        "epoch's start (their updates kept)"
        if within
        else ""
    )
    logger.warning(
        "the run was saved with %d process(es)%s, resumed with %d and %d steps per epoch "
        "(other data or another process count): the learning-rate schedule continues from "
        "epoch %d on the new steps, with the peak scaled to a total batch of %d%s, so the run "
        "will not match an uninterrupted one",
        saved_world, saved, world, parts.steps_per_epoch, epoch + 1, parts.total_batch, again,
    )  # fmt: skip


def _load_weights(model: nn.Module, weights: dict, resume: Path) -> None:
    """``weights`` into ``model``, strictly; a mismatch (a run of the same model name built
    otherwise: another teacher's head, other classes) in one line.

    Raises:
        CheckpointError: the weights do not fit, with the first difference.
    """
    try:  # torch's message, a line per difference (not a SparseFormer's shorter one)
        nn.Module.load_state_dict(model, weights, strict=True)
    except RuntimeError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        first = lines[1] if len(lines) > 1 else (lines[0] if lines else type(exc).__name__)
        raise CheckpointError(
            f"{resume} does not fit the model this command built ({first[:200]}); resume "
            "with the flags and teacher the run was started with, or give another --output"
        ) from None


def restore_run(
    resume: Path, model_name: str, model: nn.Module, parts: TrainingParts, dist: DistInfo
) -> RunState:
    """Load a training checkpoint into the model, EMA, optimizer and scaler of a run, and
    return where it stood. The schedule goes on from the same epoch over this run's steps.

    Raises:
        CheckpointError: a checkpoint of another model, or weights that do not fit it.
    """
    state = ckpt_io.read_training_checkpoint(resume, model_name)
    ema, scaler = parts.tools.ema, parts.tools.scaler
    _load_weights(model, state["model"], resume)
    if ema is not None and state.get("model_ema") is not None:
        _load_weights(ema.module, state["model_ema"], resume)
    parts.optimizer.load_state_dict(state["optimizer"])
    if scaler is not None and state.get("scaler"):
        scaler.load_state_dict(state["scaler"])
    start_epoch, step = int(state["epoch"]), int(state["step"])
    saved_world = int(state.get("world_size", dist.world_size))
    steps_per_epoch = parts.steps_per_epoch
    within = int(state.get("epoch_step", 0))  # batches of epoch start_epoch + 1 done
    if _on_new_steps(state, steps_per_epoch) or saved_world != dist.world_size:
        # other processes or other data: the schedule goes on from the same epoch, over
        # this run's steps per epoch (and learning rate scaled to its total batch)
        if dist.is_main:
            _warn_new_schedule(state, saved_world, dist.world_size, parts)
        step, within = start_epoch * steps_per_epoch, 0  # a part-way epoch starts over
    keep_saved_data_order(parts.train_loader.sampler, state)
    where = f"after step {within} of" if within else "at"
    logger.info(
        "resuming %s %s epoch %d (step %d of the schedule)", resume, where, start_epoch + 1, step
    )
    parts_done = state.get("epoch_progress") if within else None
    return RunState(
        start_epoch=start_epoch,
        step=step,
        best=float(state["best_acc1"]),
        best_epoch=int(state["best_epoch"]),
        best_source=str(state.get("best_source", "model")),  # older runs picked the model
        train_seconds=float(state.get("train_seconds", 0.0)),
        rng_states=state.get("rng"),
        data_order=state.get("data_order"),  # an old run keeps its old order in every resume
        record=state.get("metrics", {}),
        epoch_progress=progress_from_record(parts_done[dist.rank]) if parts_done else None,
    )
