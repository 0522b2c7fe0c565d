"""One epoch of a run: train it (or what is left of it, resumed part-way), validate the model and
its EMA, and save: ``last.pt`` (and ``best.pt`` on a new best) with everything a resume needs,
mid-epoch checkpoints when due (:mod:`sparseformer.engine.step_saves`), then a line of
``metrics.jsonl`` and the plot. A signal stops the epoch at a step boundary
(:mod:`sparseformer.engine.stopping`). Only rank 0 writes.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparseformer.data.datasets import DatasetBundle
from sparseformer.data.loader import start_epoch
from sparseformer.engine import checkpoint as ckpt_io
from sparseformer.engine.collaborators import TrainingParts
from sparseformer.engine.distributed import DistInfo, broadcast_buffers, gather_objects
from sparseformer.engine.loop import (
    NonFiniteLossError,
    check_finite_weights,
    evaluate,
    train_one_epoch,
)
from sparseformer.engine.metrics import (
    NOTHING_SCORED,
    MetricsLog,
    TensorBoardScalars,
    format_accuracy,
    format_loss,
    plot_metrics,
)
from sparseformer.engine.recipe import Recipe
from sparseformer.engine.resume import RunState
from sparseformer.engine.step_saves import StepHook, progress_record
from sparseformer.engine.stopping import CheckpointEvery, RunStopped, StopSignals

__all__ = ["TrainingError", "RunLoop", "run_epoch"]

logger = logging.getLogger(__name__)


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says what to do."""


@dataclass
class RunLoop:
    """What every epoch of a run works with."""

    net: nn.Module  # the model, wrapped in DDP when distributed
    model: nn.Module
    parts: TrainingParts
    data: DatasetBundle
    recipe: Recipe
    dist: DistInfo
    out: Path
    progress: bool
    log: MetricsLog | None  # rank 0's metrics.jsonl
    roi_batch: torch.Tensor | None  # validation images for the RoI statistics
    facts: dict[str, Any] = field(default_factory=dict)  # stored in every checkpoint
    every: CheckpointEvery | None = None  # mid-epoch checkpoints
    save_on_signal: bool = True
    signals: StopSignals = field(default_factory=StopSignals)
    board: TensorBoardScalars | None = None  # rank 0's TensorBoard scalars, when asked
    validation: Callable[..., dict[str, Any]] | None = None  # see RunOptions; None: evaluate


def _roi_stats(model: nn.Module, batch: torch.Tensor | None, amp) -> dict[str, float]:
    if batch is None:
        return {}
    from sparseformer.models.roi_stats import roi_statistics

    model.eval()
    with torch.no_grad(), torch.autocast(batch.device.type, dtype=amp, enabled=amp is not None):
        return roi_statistics(model.forward_with_details(batch))


def run_epoch(loop: RunLoop, state: RunState, epoch: int) -> None:
    """Train one epoch, evaluate, and (rank 0) log, save the checkpoints and plot."""
    parts, dist = loop.parts, loop.dist
    try:
        stats, hook = _train_part(loop, state, epoch)
        check_finite_weights(loop.model, int(stats["steps"]))  # a last step's NaN update
    except NonFiniteLossError as exc:
        raise _diverged(loop, epoch, str(exc)) from exc
    state.step = int(stats["steps"])
    state.train_seconds += stats["epoch_seconds"]
    trained = ckpt_io.capture_rng(parts.tools.prep.device)  # before validation draws from it
    record = _validate(loop, stats, state, epoch)
    if not math.isfinite(record["val_loss"] if record["val_loss"] is not None else 0.0):
        # finite weights, no finite output (RoIs run off to infinity): not a best model
        raise _diverged(loop, epoch, "every validation output is NaN or infinite")
    if hook.agreed()[0]:  # stopped during validation: the epoch is trained, not scored
        # on SIGTERM, saved as its last step with the generators as training left them: the
        # resumed run validates again from there, as the run left alone does
        hook.stop(hook.last, rng=trained)
        raise RunStopped(hook.signum, hook.saved)
    is_best = state.update_best(record, epoch + 1)  # the model or its EMA, as the authors
    state.record = record
    rng = gather_objects(ckpt_io.capture_rng(parts.tools.prep.device), dist)  # every rank's
    if dist.is_main:
        try:  # the checkpoint first: metrics.jsonl never holds an epoch no checkpoint does
            _save_checkpoints(loop, state, epoch, rng, is_best)
            loop.log.append(record)
            if loop.board is not None:
                loop.board.add(record)
            plot_metrics(loop.log.records, loop.out / "metrics.png")
        except OSError as exc:  # no space, a file-size limit, a lost permission, read-only
            hint = ", to continue with --resume auto" if (loop.out / ckpt_io.LAST).exists() else ""
            raise TrainingError(f"{exc}; {_kept(loop.out)}{hint}") from exc
        logger.info(
            "epoch %d/%d: train loss %.4f, val loss %s, %s, %.0f %s/s",
            epoch + 1, loop.recipe.epochs, record["train_loss"], format_loss(record["val_loss"]),
            _scores(record), record["images_per_second"], "clips" if loop.data.video else "img",
        )  # fmt: skip


def _scores(record: dict[str, Any]) -> str:
    """The epoch's accuracies for its log line: the model's, its EMA's and, in a bootstrapping
    run, its teacher's; none where the labels are not the model's classes."""
    if record.get("val_images") == 0:
        return NOTHING_SCORED
    if record["val_acc1"] is None:
        return "no top-1 (the labels are not the model's classes)"
    text = format_accuracy(record["val_acc1"], record["val_acc5"])
    if record.get("teacher_val_acc1") is not None:
        text += f" (teacher top-1 {record['teacher_val_acc1']:.2f}%)"
    if record.get("ema_val_acc1") is not None:
        text += f", EMA top-1 {record['ema_val_acc1']:.2f}%"
    return text


def _diverged(loop: RunLoop, epoch: int, what: str) -> TrainingError:
    """The run's end on a NaN or infinite loss or weights: what is kept, what to change."""
    last = loop.out / ckpt_io.LAST
    return TrainingError(
        f"training stopped in epoch {epoch + 1}: {what}; {_kept(loop.out)}. "
        f"{_non_finite_advice(loop.parts.tools.amp_dtype, last if last.exists() else None)}"
    )


def _non_finite_advice(amp_dtype: torch.dtype | None, last: Path | None = None) -> str:
    """What to change after a non-finite loss: a wider precision only where there is one; a
    lower learning rate by a new run from the last checkpoint (a resumed run keeps its own)."""
    wider = {torch.float16: "bf16 (or fp32)", torch.bfloat16: "fp32"}.get(amp_dtype)
    lower = "Lower the learning rate (--lr"
    lower += f"; from {last}: a new run, --checkpoint {last} --lr ... --output NEW" if last else ""
    lower += ")"  # NEW: --overwrite of this folder would remove the checkpoint it starts from
    if wider is None:  # fp32 already: precision is not the cause
        return f"{lower} and keep gradient clipping on"
    return f"{lower}, keep gradient clipping on, or use --precision {wider}"


def _kept(out: Path) -> str:
    """What a stopped run leaves to continue from."""
    last = out / ckpt_io.LAST
    return f"the last good checkpoint {last} is kept" if last.exists() else "no checkpoint"


def _train_part(loop: RunLoop, state: RunState, epoch: int) -> tuple[dict, StepHook]:
    """Train epoch ``epoch`` (its remaining batches, when resumed part-way), saving
    mid-epoch checkpoints when due; a signal stops it at a step boundary.

    Raises:
        RunStopped: a signal stopped the epoch (saved first on SIGTERM).
    """
    parts, resumed = loop.parts, state.epoch_progress if epoch == state.start_epoch else None
    start_epoch(parts.train_loader, epoch, resumed.batches if resumed else 0)
    base = state.step - (resumed.batches if resumed else 0)  # the epoch's first step

    def save(progress, rng: dict | None = None) -> None:  # rng: this rank's, else now's
        check_finite_weights(loop.model, base + progress.batches)  # every rank: the same weights
        rng = rng if rng is not None else ckpt_io.capture_rng(parts.tools.prep.device)
        rng = gather_objects(rng, loop.dist)
        parts_done = gather_objects(progress_record(progress), loop.dist)
        if loop.dist.is_main:
            extra = {"step": base + progress.batches, "epoch_step": progress.batches,
                     "epoch_progress": parts_done}  # fmt: skip
            _save_checkpoints(loop, state, epoch - 1, rng, False, extra)
            logger.info("epoch %d, step %d: checkpoint saved", epoch + 1, progress.batches)

    def report(progress) -> None:  # a job's log: no progress bar, a line every few minutes
        rate = progress.seen / max(progress.seconds, 1e-9)  # this process's images a second
        left = (parts.steps_per_epoch - progress.batches) * progress.seconds / progress.batches
        logger.info(
            "epoch %d, step %d of %d: train loss %.4f, %.0f img/s, %.0f min left in the epoch",
            epoch + 1, progress.batches, parts.steps_per_epoch,
            float(progress.loss_sum) / max(progress.seen, 1), rate * loop.dist.world_size,
            left / 60,
        )  # fmt: skip

    device = parts.tools.prep.device
    quiet = not loop.progress and loop.dist.is_main
    hook = StepHook(save, loop.every, loop.signals, loop.save_on_signal, loop.dist, device,
                    report if quiet else None)  # fmt: skip
    stats = train_one_epoch(
        loop.net, parts.train_loader, parts.optimizer, parts.tools, state.step, loop.dist,
        loop.progress, start=resumed, after_step=hook,
    )  # fmt: skip
    state.epoch_progress = None
    if stats["stopped"]:
        raise RunStopped(hook.signum, hook.saved)
    return stats, hook


def _validate(loop: RunLoop, stats: dict, state: RunState, epoch: int) -> dict[str, Any]:
    """The epoch's metrics record: training statistics, validation of the model and its EMA,
    and the RoI statistics."""
    parts, dist, tools = loop.parts, loop.dist, loop.parts.tools
    # the module itself: DDP adds nothing to evaluation, and its first no-grad forward
    # broadcasts buffers, a collective a rank with no validation batch would never join
    broadcast_buffers(loop.model, dist)  # rank 0's BatchNorm statistics, which it saves
    validate = loop.validation or evaluate  # looked up here: tests wrap the module's evaluate
    val = validate(loop.model, parts.val_loader, tools.prep, dist, None, loop.progress)
    stopping = loop.signals.requested  # a validation a signal cut short: not a failure
    bad = val.get("non_finite", 0)  # all of them: the run stops (run_epoch)
    if 0 < bad < val["images"] and dist.is_main:
        logger.warning("epoch %d: %d of %d validation images gave NaN or infinite outputs; "
                       "they are scored as wrong", epoch + 1, bad, val["images"])  # fmt: skip
    if val["images"] == 0 and dist.is_main and not stopping:
        logger.warning(
            "validation scored nothing: none of its %d files could be decoded (the log names "
            "them); the epoch has no validation loss or accuracy, and no best checkpoint",
            len(loop.data.val),
        )
    own = {
        k: v for k, v in val.items() if k not in ("loss", "acc1", "acc5", "images", "non_finite")
    }
    record = {  # the model evaluated in fp32
        "epoch": epoch + 1,
        "step": state.step,
        "train_loss": stats["train_loss"],
        "val_loss": val["loss"],
        "val_acc1": val["acc1"],
        "val_acc5": val["acc5"],
        "val_images": val["images"],  # scored: files that failed to decode are left out
        **own,  # a validation pass's own numbers (bootstrap: the teacher's top-1)
        "lr": stats["lr"],
        "images_per_second": stats["images_per_second"],
        "epoch_seconds": stats["epoch_seconds"],
        "train_seconds": state.train_seconds,
    }
    if tools.ema is not None:
        broadcast_buffers(tools.ema.module, dist)
        ema_val = validate(
            tools.ema.module, parts.val_loader, tools.prep, dist, None, loop.progress
        )
        record.update(ema_val_loss=ema_val["loss"], ema_val_acc1=ema_val["acc1"])
        record.update(ema_val_acc5=ema_val["acc5"])
    record.update(_roi_stats(loop.model, loop.roi_batch, tools.amp_dtype))
    return record


def _save_checkpoints(
    loop: RunLoop, state: RunState, epoch: int, rng, is_best: bool, extra: dict | None = None
) -> None:
    """``last.pt`` (and ``best.pt`` on a new best top-1), atomically, with all a resume needs."""
    tools, out = loop.parts.tools, loop.out
    saved = {
        **loop.facts,
        "model": loop.model.state_dict(),
        "model_ema": tools.ema.module.state_dict() if tools.ema is not None else None,
        "optimizer": loop.parts.optimizer.state_dict(),
        "scaler": tools.scaler.state_dict() if tools.scaler is not None else None,
        "epoch": epoch + 1,
        "step": state.step,
        "steps_per_epoch": loop.parts.steps_per_epoch,  # a first epoch's resume checks it
        "best_acc1": state.best,
        "best_epoch": state.best_epoch,
        "best_source": state.best_source,
        "train_seconds": state.train_seconds,
        "rng": rng,
        "metrics": state.record,
        "data_order": state.data_order,
        **(extra or {}),  # a mid-epoch checkpoint's place in its epoch
    }
    if is_best:  # before last.pt: a last.pt naming a best epoch implies its best.pt
        ckpt_io.save_atomic(saved, out / ckpt_io.BEST)
        ckpt_io.link_atomic(out / ckpt_io.BEST, out / ckpt_io.LAST)  # written once
    else:
        ckpt_io.save_atomic(saved, out / ckpt_io.LAST)
