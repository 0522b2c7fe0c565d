"""A whole training run: build the collaborators from a recipe, loop over epochs, never lose work.

Each epoch trains, evaluates (the model and, when on, its EMA), appends one line to
``metrics.jsonl``, redraws ``metrics.png`` and saves ``last.pt`` (and ``best.pt`` on a new best
top-1) atomically, with everything needed to resume the same trajectory. Only rank 0 writes.
"""

from __future__ import annotations

import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from sparseformer.data.datasets import DatasetBundle
from sparseformer.data.loader import (
    SeededRepeatAugSampler,
    build_eval_loader,
    build_train_loader,
    failed_loads,
)
from sparseformer.data.transforms import Preprocessing
from sparseformer.engine import checkpoint as ckpt_io
from sparseformer.engine.distributed import (
    DistInfo,
    all_reduce_sum,
    broadcast_buffers,
    gather_objects,
    setup_distributed,
    weights_in_sync,
)
from sparseformer.engine.loop import (
    BatchPrep,
    NonFiniteLossError,
    StepTools,
    evaluate,
    train_one_epoch,
)
from sparseformer.engine.metrics import MetricsLog, plot_metrics
from sparseformer.engine.modeling import is_sparseformer
from sparseformer.engine.optim import LRSchedule, build_optimizer
from sparseformer.engine.recipe import Recipe
from sparseformer.engine.session import available_cores
from sparseformer.weights.convert import CheckpointError

__all__ = ["TrainingError", "RunOptions", "seed_everything", "amp_dtype_for", "fit"]

logger = logging.getLogger(__name__)

# How the training order is drawn, saved in checkpoints: "seed+epoch" since the repeated-
# augmentation sampler took --seed; checkpoints without it resume with its old, epoch-only order.
DATA_ORDER = "seed+epoch"

_TEMPORARIES = (
    ".last.pt.tmp-*",
    ".best.pt.tmp-*",
    ".metrics.jsonl.tmp",
    ".metrics.tmp.png",
    ".summary.json.tmp",
    ".skipped_files.tsv.tmp",
)


SKIPPED_LIST = "skipped_files.tsv"  # every file the scan left out, with the reason
_RUN_FILES = (
    ckpt_io.LAST, ckpt_io.BEST, "metrics.jsonl", "metrics.png", "summary.json", SKIPPED_LIST
)  # fmt: skip


def _write_skipped_list(path: Path, skipped: list[tuple[str, str]]) -> None:
    """``path``: one ``file<TAB>reason`` row per file the folder scan left out (atomically;
    tab-separated CSV, quoted where a name holds a tab, a newline or a quote); removed when
    nothing was skipped, so that it never describes another scan."""
    if not skipped:
        path.unlink(missing_ok=True)
        return
    import csv

    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        out = csv.writer(f, delimiter="\t", lineterminator="\n")  # quotes a tab in a name
        out.writerow(["file", "reason"])
        out.writerows((file, " ".join(str(reason).split())) for file, reason in skipped)
    tmp.replace(path)


class TrainingError(RuntimeError):
    """A run that cannot go on; the message says what to do."""


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
        extra: JSON-able facts stored in checkpoints (command line, data source).
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
    extra: dict[str, Any] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
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
            raise TrainingError("--precision fp16 needs a CUDA GPU; use bf16 or fp32 on CPU")
        return torch.float16
    raise TrainingError(f"unknown precision {precision!r}; use fp32, bf16 or fp16")


def keep_saved_data_order(sampler, state: dict) -> None:
    """A run saved before the repeated-augmentation sampler took ``--seed`` (its checkpoints
    lack ``data_order``) resumes with that sampler's old order, shuffled by the epoch alone."""
    if state.get("data_order") is None and isinstance(sampler, SeededRepeatAugSampler):
        sampler.seed = 0


def _workers(asked: int, dist: DistInfo) -> int:
    """Data-loading processes per training process: the recipe's, but no more than this
    process's share of the cores (more only queue for them). The data order does not depend
    on the count; which random augmentation an image draws does, as with any DataLoader."""
    cores = available_cores()
    # the same share as the threads get (session.set_threads): cores / processes on this node
    share = max(1, cores // max(dist.local_world_size, 1))
    if asked > share:
        logger.warning("%d data-loading processes (the recipe's num_workers, or --workers) on "
                       "%d core(s) for this process: using %d", asked, share, share)  # fmt: skip
        return share
    return asked


def _roi_stats(model: nn.Module, batch: torch.Tensor | None, amp) -> dict[str, float]:
    if batch is None:
        return {}
    from sparseformer.models.roi_stats import roi_statistics

    model.eval()
    with torch.no_grad(), torch.autocast(batch.device.type, dtype=amp, enabled=amp is not None):
        return roi_statistics(model.forward_with_details(batch))


def fit(
    model: nn.Module,
    data: DatasetBundle,
    recipe: Recipe,
    preprocessing: Preprocessing,
    options: RunOptions,
    dist: DistInfo | None = None,
) -> dict[str, Any]:
    """Train ``model`` on ``data`` with ``recipe``; returns the run summary.

    With ``options.overwrite`` (and no ``options.resume``) the checkpoints, metrics and
    summary of an earlier run in ``options.output`` are removed once the set-up has passed
    (a setting that does not fit the data keeps the old run), before the first epoch, so
    that a stop in it cannot leave the old run's ``last.pt`` beside the new run's metrics;
    nothing is removed otherwise. A run resumed from a checkpoint in another folder continues in
    ``options.output``; its earlier epochs' metrics and ``best.pt`` stay where they were.

    Raises:
        TrainingError: non-finite loss (the last good checkpoint is kept), or a resume
            checkpoint of another model.
    """
    dist = dist or setup_distributed(options.device)
    device = torch.device(options.device)  # "cuda:N" keeps its GPU; torchrun's is LOCAL_RANK
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank)
    amp = amp_dtype_for(options.precision, options.device)
    out = Path(options.output)
    if dist.is_main:
        out.mkdir(parents=True, exist_ok=True)
        for pattern in _TEMPORARIES:  # left by a run killed while writing
            for stale in out.glob(pattern):
                stale.unlink()
    model.to(device)
    total_batch = recipe.batch_size * dist.world_size
    peak_lr, warmup_lr, min_lr = recipe.scaled_lr(total_batch)
    optimizer = build_optimizer(
        model, peak_lr, recipe.weight_decay, recipe.betas, recipe.eps, recipe.layer_decay
    )
    if recipe.layer_decay is not None and dist.is_main:
        scales = sorted({g.get("lr_scale", 1.0) for g in optimizer.param_groups})
        logger.info(
            "layer decay %g: %d depths, learning rate x %.3g (deepest) to x %g (head)",
            recipe.layer_decay, len(scales), scales[0], scales[-1],
        )  # fmt: skip
    ema = None
    if recipe.ema_decay:
        ema = ModelEmaV3(model, decay=recipe.ema_decay, use_warmup=recipe.ema_warmup)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None

    workers = _workers(recipe.num_workers, dist)
    pin = device.type == "cuda"
    train_loader = build_train_loader(
        data.train, recipe.batch_size, workers, options.seed,
        dist.rank, dist.world_size, recipe.repeated_aug, pin_memory=pin,
    )  # fmt: skip
    val_loader = build_eval_loader(
        data.val, 2 * recipe.batch_size, workers, dist.rank, dist.world_size, pin_memory=pin
    )
    if recipe.warmup_epochs >= recipe.epochs and dist.is_main:
        logger.warning(
            "the warm-up (%g epochs) is as long as the run (%d epochs): the learning rate "
            "never reaches its peak; set --warmup-epochs below --epochs",
            recipe.warmup_epochs,
            recipe.epochs,
        )
    steps_per_epoch = len(train_loader)
    schedule = LRSchedule(
        peak_lr, warmup_lr, min_lr,
        round(recipe.warmup_epochs * steps_per_epoch), recipe.epochs * steps_per_epoch,
    )  # fmt: skip
    mixup = None
    if recipe.mixup > 0 or recipe.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, prob=recipe.mixup_prob,
            switch_prob=recipe.mixup_switch_prob, mode=recipe.mixup_mode,
            label_smoothing=recipe.label_smoothing, num_classes=data.num_classes,
        )  # fmt: skip
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif recipe.label_smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(recipe.label_smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    erasing = None
    if recipe.augmentation.re_prob > 0:
        erasing = RandomErasing(
            recipe.augmentation.re_prob, mode=recipe.augmentation.re_mode,
            max_count=recipe.augmentation.re_count, device=str(device),
        )  # fmt: skip
    prep = BatchPrep(preprocessing.mean, preprocessing.std, device, erasing)

    start_epoch, step, best, best_epoch, train_seconds = 0, 0, -1.0, 0, 0.0
    rng_states, data_order = None, DATA_ORDER
    if options.resume is not None:
        state = ckpt_io.read_training_checkpoint(options.resume)
        if state.get("model_name") != options.model_name:
            raise CheckpointError(
                f"{str(options.resume)!r} is a checkpoint of {state.get('model_name')!r}, not "
                f"{options.model_name!r}; pass --model {state.get('model_name')} to resume it"
            )
        model.load_state_dict(state["model"], strict=True)
        if ema is not None and state.get("model_ema") is not None:
            ema.module.load_state_dict(state["model_ema"], strict=True)
        optimizer.load_state_dict(state["optimizer"])
        if scaler is not None and state.get("scaler"):
            scaler.load_state_dict(state["scaler"])
        start_epoch, step = int(state["epoch"]), int(state["step"])
        saved_world = int(state.get("world_size", dist.world_size))
        if step != start_epoch * steps_per_epoch or saved_world != dist.world_size:
            # other processes or other data: the schedule goes on from the same epoch, over
            # this run's steps per epoch (and learning rate scaled to its total batch)
            if dist.is_main:
                logger.warning(
                    "the run was saved with %d process(es) and %d steps per epoch, resumed with "
                    "%d and %d (other data or another process count): the learning-rate "
                    "schedule continues from epoch %d on the new steps, with the peak scaled "
                    "to a total batch of %d, so the run will not match an uninterrupted one",
                    saved_world, step // max(start_epoch, 1), dist.world_size, steps_per_epoch,
                    start_epoch, total_batch,
                )  # fmt: skip
            step = start_epoch * steps_per_epoch
        best, best_epoch = float(state["best_acc1"]), int(state["best_epoch"])
        train_seconds = float(state.get("train_seconds", 0.0))
        rng_states = state.get("rng")
        keep_saved_data_order(train_loader.sampler, state)
        data_order = state.get("data_order")  # an old run keeps its old order in every resume
        logger.info("resuming %s from epoch %d (step %d)", options.resume, start_epoch, step)
    if dist.is_main and options.overwrite and options.resume is None:
        # asked to start over: clear the old run, only now that every setting has been
        # checked against the data (batch size, optimizer, loaders), so a mistake keeps it
        for name in _RUN_FILES:
            (out / name).unlink(missing_ok=True)
    if dist.is_main:
        _write_skipped_list(out / SKIPPED_LIST, data.skipped_files)
    log = MetricsLog(out / "metrics.jsonl", start_epoch) if dist.is_main else None

    roi_batch = None
    if options.roi_stats_images > 0 and is_sparseformer(model) and dist.is_main:
        idx = range(min(options.roi_stats_images, len(data.val)))
        x, y = val_loader.collate_fn([data.val[i] for i in idx])
        roi_batch = prep(x, y, train=False)[0] if len(y) else None
    if rng_states is not None and dist.rank < len(rng_states):  # after the set-up's RNG use
        ckpt_io.restore_rng(rng_states[dist.rank], device)
    elif rng_states is not None:  # a rank the saved run did not have: its own fresh stream
        seed_everything(options.seed + dist.rank + 1000 * int(step))
    else:  # ranks share the model's initialisation but not their augmentation
        seed_everything(options.seed + dist.rank)

    net = model
    if dist.enabled:
        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)
    tools = StepTools(criterion, schedule, prep, amp, scaler, recipe.clip_grad, mixup, ema)
    progress = options.progress and dist.is_main
    common = {
        "model_name": options.model_name,
        "num_classes": data.num_classes,
        "class_names": list(data.class_names),
        "preprocessing": preprocessing.to_dict(),
        "recipe": recipe.to_dict(),
        "world_size": dist.world_size,
        "checkpoint_version": ckpt_io.CHECKPOINT_VERSION,
        **options.extra,
    }
    record: dict[str, Any] = state.get("metrics", {}) if options.resume is not None else {}
    for epoch in range(start_epoch, recipe.epochs):
        train_loader.sampler.set_epoch(epoch)
        try:
            stats = train_one_epoch(net, train_loader, optimizer, tools, step, dist, progress)
        except NonFiniteLossError as exc:
            last = out / ckpt_io.LAST
            kept = f"the last good checkpoint {last} is kept" if last.exists() else "no checkpoint"
            raise TrainingError(
                f"training stopped in epoch {epoch + 1}: {exc}; {kept}. Lower the learning rate "
                "(--lr), keep gradient clipping on, or use --precision bf16/fp32"
            ) from exc
        step = int(stats["steps"])
        train_seconds += stats["epoch_seconds"]
        # the module itself: DDP adds nothing to evaluation, and its first no-grad forward
        # broadcasts buffers, a collective a rank with no validation batch would never join
        broadcast_buffers(model, dist)  # rank 0's BatchNorm statistics, which it saves
        val = evaluate(model, val_loader, prep, dist, amp, progress)
        record = {
            "epoch": epoch + 1,
            "step": step,
            "train_loss": stats["train_loss"],
            "val_loss": val["loss"],
            "val_acc1": val["acc1"],
            "val_acc5": val["acc5"],
            "val_images": val["images"],  # scored: files that failed to decode are left out
            "lr": stats["lr"],
            "images_per_second": stats["images_per_second"],
            "epoch_seconds": stats["epoch_seconds"],
            "train_seconds": train_seconds,
        }
        if ema is not None:
            broadcast_buffers(ema.module, dist)
            ema_val = evaluate(ema.module, val_loader, prep, dist, amp, progress)
            record.update(ema_val_loss=ema_val["loss"], ema_val_acc1=ema_val["acc1"])
            record.update(ema_val_acc5=ema_val["acc5"])
        record.update(_roi_stats(model, roi_batch, amp))
        is_best = record["val_acc1"] > best
        if is_best:
            best, best_epoch = record["val_acc1"], epoch + 1
        rng = gather_objects(ckpt_io.capture_rng(device), dist)  # every rank's generators
        if dist.is_main:
            log.append(record)
            state = {
                **common,
                "model": model.state_dict(),
                "model_ema": ema.module.state_dict() if ema is not None else None,
                "optimizer": optimizer.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
                "epoch": epoch + 1,
                "step": step,
                "best_acc1": best,
                "best_epoch": best_epoch,
                "train_seconds": train_seconds,
                "rng": rng,
                "metrics": record,
                "data_order": data_order,
            }
            if is_best:  # before last.pt: a last.pt naming a best epoch implies its best.pt
                ckpt_io.save_atomic(state, out / ckpt_io.BEST)
                ckpt_io.link_atomic(out / ckpt_io.BEST, out / ckpt_io.LAST)  # written once
            else:
                ckpt_io.save_atomic(state, out / ckpt_io.LAST)
            plot_metrics(log.records, out / "metrics.png")
            logger.info(
                "epoch %d/%d: train loss %.4f, val loss %.4f, top-1 %.2f%%, top-5 %.2f%%, "
                "%.0f %s/s%s",
                epoch + 1, recipe.epochs, record["train_loss"], record["val_loss"],
                record["val_acc1"], record["val_acc5"], record["images_per_second"],
                "clips" if data.video else "img",
                f", EMA top-1 {record['ema_val_acc1']:.2f}%" if ema is not None else "",
            )  # fmt: skip
    # files that passed the folder scan but failed to decode in this run (logged each time)
    replaced = all_reduce_sum(torch.tensor([float(failed_loads(data.train))], device=device), dist)
    summary = {
        "model": options.model_name,
        "epochs": recipe.epochs,
        "epochs_run": max(recipe.epochs - start_epoch, 0),
        "best_val_acc1": best,
        "best_epoch": best_epoch,
        "final": record,
        "train_seconds": train_seconds,
        "skipped_files": len(data.skipped_files),  # unreadable (or too short) at the scan
        "skipped_list": str(out / SKIPPED_LIST) if data.skipped_files else None,
        "train_loads_replaced": int(replaced.item()),  # decode failures, each replaced
        "val_left_out": len(data.val) - record["val_images"] if "val_images" in record else 0,
        "world_size": dist.world_size,
        "ranks_in_sync": weights_in_sync(model, dist),
        "output": str(out),
        "last_checkpoint": str(out / ckpt_io.LAST) if (out / ckpt_io.LAST).exists() else None,
        # None when this folder holds no best.pt (a run resumed from another folder, whose
        # best epoch came before the move)
        "best_checkpoint": str(out / ckpt_io.BEST) if (out / ckpt_io.BEST).exists() else None,
        "metrics": str(out / "metrics.jsonl"),
        "plot": str(out / "metrics.png"),
    }
    if dist.is_main:
        tmp = out / ".summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(out / "summary.json")
    return summary
