"""A whole training run: build the collaborators from a recipe, loop over epochs, never lose work.

Each epoch trains, evaluates in fp32 (the model and, when on, its EMA), appends one line to
``metrics.jsonl``, redraws ``metrics.png`` and saves ``last.pt`` (and ``best.pt`` when either
scores a new best top-1, the authors' best) atomically, with everything needed to resume the
same trajectory. Only rank 0 writes.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sparseformer import __version__
from sparseformer.data.datasets import DatasetBundle
from sparseformer.data.loader import FewerThanABatch, end_workers, failed_loads
from sparseformer.data.transforms import Preprocessing
from sparseformer.engine import checkpoint as ckpt_io
from sparseformer.engine.collaborators import TrainingParts, build_training_parts
from sparseformer.engine.distributed import (
    DistInfo,
    all_reduce_sum,
    setup_distributed,
    weights_in_sync,
)
from sparseformer.engine.epoch import RunLoop, TrainingError, run_epoch
from sparseformer.engine.metrics import MetricsLog, TensorBoardScalars, require_tensorboard
from sparseformer.engine.recipe import Recipe
from sparseformer.engine.resume import DATA_ORDER, RunState, keep_saved_data_order, restore_run
from sparseformer.engine.run_folder import (
    SKIPPED_LIST,
    TENSORBOARD,
    RunFolderLock,
    carry_best,
    clear_old_run,
    earlier_folder,
    prepare_output,
    refuse_overwriting_a_run,
    write_skipped_list,
    write_summary,
)
from sparseformer.engine.step_saves import UntilStopped
from sparseformer.engine.stopping import CheckpointEvery, StopSignals
from sparseformer.layers.linear import one_linear_kernel
from sparseformer.weights.loading import is_sparseformer

__all__ = [
    "DATA_ORDER",
    "TrainingError",
    "RunOptions",
    "seed_everything",
    "amp_dtype_for",
    "keep_saved_data_order",
    "fit",
]

logger = logging.getLogger(__name__)


@dataclass
class RunOptions:
    """Where and how to run (the recipe says what to train with).

    Attributes:
        output: run folder (``last.pt``, ``best.pt``, ``metrics.jsonl``, ``metrics.png``,
            ``summary.json``).
        model_name: name the model was built from (stored, checked on resume and eval).
        device: ``"cpu"`` or ``"cuda"``.
        precision: ``fp32``, ``bf16`` or ``fp16`` (fp16 needs CUDA).
        seed: base seed; rank ``r`` uses ``seed + r`` for augmentation.
        resume: a training checkpoint to continue from.
        overwrite: start over in a folder that holds a run: its files are removed first.
        progress: show progress bars (rank 0).
        roi_stats_images: validation images for the per-epoch RoI statistics (0 = off).
        checkpoint_every: mid-epoch checkpoints (steps or a duration), or per epoch only.
        save_on_signal: on SIGTERM, save a checkpoint at the next step boundary, then stop.
        tensorboard: also write each epoch's numbers as TensorBoard scalars in
            ``output/tensorboard``.
        extra: JSON-able facts stored in checkpoints (command line, data source).
        objective: the training loss from ``(model, images, targets)`` in place of the
            recipe's loss on the logits (``sparseformer bootstrap``'s teacher alignment).
        validation: the validation pass in place of :func:`~sparseformer.engine.loop.
            evaluate` (same arguments and keys; ``acc1``/``acc5`` may be ``None`` where the
            labels are not the model's classes, and further keys join the epoch's record:
            ``sparseformer bootstrap``'s alignment loss and teacher top-1).
    """

    output: Path
    model_name: str
    device: str = "cpu"
    precision: str = "fp32"
    seed: int = 0
    resume: Path | None = None
    overwrite: bool = False
    progress: bool = True
    roi_stats_images: int = 32
    checkpoint_every: CheckpointEvery | None = None
    save_on_signal: bool = True
    tensorboard: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    objective: Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor] | None = None
    validation: Callable[..., dict[str, Any]] | None = None


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators with ``seed`` (NumPy's modulo 2^32)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def amp_dtype_for(precision: str, device: str) -> torch.dtype | None:
    """Autocast dtype for ``precision`` (``None`` for fp32); fp16 is refused on CPU."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if precision == "fp16":
        if not device.startswith("cuda"):
            raise TrainingError("fp16 needs a CUDA GPU; use bf16 or fp32 on CPU (--precision)")
        return torch.float16
    raise TrainingError(f"unknown precision {precision!r}; use fp32, bf16 or fp16")


def fit(
    model: nn.Module,
    data: DatasetBundle,
    recipe: Recipe,
    preprocessing: Preprocessing,
    options: RunOptions,
    dist: DistInfo | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``data`` with ``recipe``; returns the run summary.

    The steps: build the collaborators (:func:`~sparseformer.engine.collaborators.
    build_training_parts`), restore a resumed run (:func:`~sparseformer.engine.resume.
    restore_run`), run the epochs (:func:`~sparseformer.engine.epoch.run_epoch`: train,
    evaluate, save) and write the summary (:func:`_summary`).

    With ``options.overwrite`` (and no ``options.resume``) the checkpoints, metrics and
    summary of an earlier run in ``options.output`` are removed once the set-up has passed
    (a setting that does not fit the data keeps the old run), before the first epoch, so
    that a stop in it cannot leave the old run's ``last.pt`` beside the new run's metrics;
    nothing is removed otherwise. A run resumed from a checkpoint in another folder continues in
    ``options.output``; its earlier epochs' metrics and ``best.pt`` stay where they were.

    Raises:
        TrainingError: non-finite loss or a failed write (the last good checkpoint is kept,
            and ``metrics.jsonl`` never holds an epoch it does not), or a resume checkpoint
            of another model.
        RunFolderBusy: another live run holds ``options.output``.
    """
    dist = dist or setup_distributed(options.device)
    device = torch.device(options.device)  # "cuda:N" keeps its GPU; torchrun's is LOCAL_RANK
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank)
    amp = amp_dtype_for(options.precision, options.device)
    out = Path(options.output)
    lock = RunFolderLock(out) if dist.is_main else nullcontext()
    with lock:  # the folder is this run's alone until it ends (rank 0 writes for all)
        return _fit_in(out, device, amp, model, data, recipe, preprocessing, options, dist)


def _fit_in(
    out: Path,
    device: torch.device,
    amp: torch.dtype | None,
    model: nn.Module,
    data: DatasetBundle,
    recipe: Recipe,
    preprocessing: Preprocessing,
    options: RunOptions,
    dist: DistInfo,
) -> dict[str, Any]:
    """:func:`fit` in the run folder ``out``, once it holds it."""
    _check_before_work(out, model, data, options)
    if dist.is_main:
        prepare_output(out)
    model.to(device)
    seed = options.seed
    try:
        parts = build_training_parts(model, data, recipe, preprocessing, seed, dist, device, amp)
    except FewerThanABatch as exc:  # a resumed run keeps its batch size: what may change
        if options.resume is None:
            raise
        fewer = "resume with fewer processes, or " if dist.world_size > 1 else ""
        raise FewerThanABatch(
            f"{exc.samples} training samples per process is fewer than one batch of "
            f"{exc.batch_size}, the resumed run's batch size, which a resume keeps: {fewer}"
            f"start a new run from its weights (--checkpoint {options.resume} --batch-size N "
            "--output NEW)"
        ) from None
    parts.tools.objective = options.objective
    state = RunState()
    if options.resume is not None:
        state = restore_run(options.resume, options.model_name, model, parts, dist)
    if dist.is_main and options.overwrite and options.resume is None:
        # asked to start over: clear the old run, only now that every setting has been
        # checked against the data (batch size, optimizer, loaders), so a mistake keeps it
        clear_old_run(out)
    if dist.is_main:
        write_skipped_list(out / SKIPPED_LIST, data.skipped_files)
    log = _continued_log(out, options.resume, state) if dist.is_main else None
    roi_batch = _roi_batch(model, data, parts, options.roi_stats_images, dist)
    _seed_ranks(state, options.seed, dist, device)  # after the set-up's RNG use
    net = model
    if dist.enabled:
        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)
    facts = _checkpoint_facts(data, recipe, preprocessing, options, dist)
    progress = options.progress and dist.is_main
    loop = RunLoop(net, model, parts, data, recipe, dist, out, progress, log, roi_batch, facts)
    loop.every, loop.save_on_signal = options.checkpoint_every, options.save_on_signal
    if options.validation is not None:
        loop.validation = options.validation
    if options.tensorboard and dist.is_main:
        loop.board = TensorBoardScalars(out / TENSORBOARD)
        if log.restored is not None:  # killed before its line: nor had TensorBoard its scalars
            loop.board.add(log.restored)
    # validation takes one linear kernel, not each process the faster it measured: a resumed
    # run scores as the run it continues
    with StopSignals(announce=dist.is_main) as loop.signals, one_linear_kernel():
        parts.val_loader = UntilStopped(parts.val_loader, loop.signals)
        try:
            for epoch in range(state.start_epoch, recipe.epochs):
                run_epoch(loop, state, epoch)
        finally:  # while a stop signal is only noted, not raised into their shutdown
            end_workers(parts.train_loader, parts.val_loader.loader)
    if loop.board is not None:
        loop.board.close()
    summary = _summary(loop, state, options.model_name)
    if dist.is_main:
        write_summary(out, summary)
    return summary


def _check_before_work(out: Path, model: nn.Module, data: DatasetBundle, options: RunOptions):
    """What the CLI checks before it builds anything, checked for callers of :func:`fit`
    too: a run already in ``out`` is not overwritten unless asked, and a classifier trained
    on the data's labels has an output for each class (the loss would fail part-way through
    an epoch on too few, and a run's checkpoint would not load as its classes on too many).

    Raises:
        TrainingError: naming the problem and what to do.
    """
    try:
        refuse_overwriting_a_run(out, resume=options.resume, overwrite=options.overwrite)
        if options.tensorboard:  # before prepare_output writes anything
            require_tensorboard()
    except ValueError as exc:
        raise TrainingError(str(exc)) from None
    if options.objective is not None:  # another loss: its outputs need not be the classes
        return
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    outputs = getattr(head, "out_features", None)
    if outputs is not None and outputs != data.num_classes:
        raise TrainingError(
            f"the model's classifier has {outputs} outputs for the data's {data.num_classes} "
            f"classes; build it with num_classes={data.num_classes}"
        )


def _checkpoint_facts(
    data: DatasetBundle,
    recipe: Recipe,
    preprocessing: Preprocessing,
    options: RunOptions,
    dist: DistInfo,
) -> dict[str, Any]:
    """What every checkpoint of the run says about it (read back by eval, predict, resume)."""
    return {
        "model_name": options.model_name,
        "num_classes": data.num_classes,
        "class_names": list(data.class_names),
        "preprocessing": preprocessing.to_dict(),
        "recipe": recipe.to_dict(),
        "world_size": dist.world_size,
        "seed": options.seed,  # a resumed run's (engine.resume.resumed_seed)
        "checkpoint_version": ckpt_io.CHECKPOINT_VERSION,
        "sparseformer": __version__,  # the code that trained it
        **options.extra,
    }


def _continued_log(out: Path, resume: str | Path | None, state: RunState) -> MetricsLog:
    """The run's metrics log. A run resumed from another folder's checkpoint takes that run's
    history: its epochs up to the resumed one, its ``best.pt``, and the resumed checkpoint as
    its ``last.pt``, which ``--resume auto`` there continues from before an epoch ends (it
    took that ``best.pt``, an earlier epoch maybe, and trained it again without a word)."""
    earlier = earlier_folder(resume, out)
    if earlier is not None:
        ckpt_io.link_atomic(resume, out / ckpt_io.LAST)  # replaced by renames only: safe
    if earlier is not None and carry_best(resume, out, state.best_epoch) is not None:
        logger.info("%s holds the best epoch so far (%s)", out / "best.pt", state.best_epoch)
    history = earlier / "metrics.jsonl" if earlier is not None else None
    return MetricsLog(out / "metrics.jsonl", state.start_epoch, state.record, history=history)


def _roi_batch(
    model: nn.Module, data: DatasetBundle, parts: TrainingParts, images: int, dist: DistInfo
) -> torch.Tensor | None:
    """The first ``images`` validation images, prepared, for the per-epoch RoI statistics
    (rank 0, SparseFormers only)."""
    if images > 0 and is_sparseformer(model) and dist.is_main:
        idx = range(min(images, len(data.val)))
        x, y = parts.val_loader.collate_fn([data.val[i] for i in idx])
        return parts.tools.prep(x, y, train=False)[0] if len(y) else None
    return None


def _seed_ranks(state: RunState, seed: int, dist: DistInfo, device: torch.device) -> None:
    """A resumed run's saved random streams; a fresh run's per-rank seeds."""
    rng_states = state.rng_states
    if rng_states is not None and dist.rank < len(rng_states):
        ckpt_io.restore_rng(rng_states[dist.rank], device)
    elif rng_states is not None:  # a rank the saved run did not have: its own fresh stream
        seed_everything(seed + dist.rank + 1000 * int(state.step))
    else:  # ranks share the model's initialisation but not their augmentation
        seed_everything(seed + dist.rank)


def _summary(loop: RunLoop, state: RunState, model_name: str) -> dict[str, Any]:
    """The run's summary (``summary.json``): scores, time, skipped files, where the files are."""
    data, out, dist, record = loop.data, loop.out, loop.dist, state.record
    # files that passed the folder scan but failed to decode in this run (logged each time)
    device = loop.parts.tools.prep.device
    replaced = all_reduce_sum(torch.tensor([float(failed_loads(data.train))], device=device), dist)
    return {
        "model": model_name,
        "sparseformer": __version__,
        "epochs": loop.recipe.epochs,
        "epochs_run": max(loop.recipe.epochs - state.start_epoch, 0),
        "best_val_acc1": state.best if state.best_epoch else None,  # None: never scored
        "best_epoch": state.best_epoch or None,  # None: never scored
        "best_source": state.best_source,  # "ema": best.pt's EMA weights (eval --ema)
        "final": record,
        "train_seconds": state.train_seconds,
        "skipped_files": len(data.skipped_files),  # unreadable (or too short) at the scan
        "skipped_list": str(out / SKIPPED_LIST) if data.skipped_files else None,
        "train_loads_replaced": int(replaced.item()),  # decode failures, each replaced
        "val_left_out": len(data.val) - record["val_images"] if "val_images" in record else 0,
        "world_size": dist.world_size,
        "ranks_in_sync": weights_in_sync(loop.model, dist),
        "output": str(out),
        "last_checkpoint": str(out / ckpt_io.LAST) if (out / ckpt_io.LAST).exists() else None,
        # None when this folder holds no best.pt (a run resumed from another folder, whose
        # best epoch came before the move)
        "best_checkpoint": str(out / ckpt_io.BEST) if (out / ckpt_io.BEST).exists() else None,
        "metrics": str(out / "metrics.jsonl"),
        "plot": str(out / "metrics.png"),
    }
