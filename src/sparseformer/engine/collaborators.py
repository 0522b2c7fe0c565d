"""What a training run works with, built from its recipe: optimizer, learning-rate schedule,
loss, Mixup/CutMix, random erasing, EMA, GradScaler and data loaders.

In the manner of DeiT's ``main.py``: every collaborator is built here, once, and handed to the
epoch loop (:mod:`sparseformer.engine.loop`) explicitly.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from timm.data import Mixup
from timm.data.random_erasing import RandomErasing
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from torch import nn
from torch.utils.data import DataLoader

from sparseformer.data.datasets import DatasetBundle
from sparseformer.data.loader import build_eval_loader, build_train_loader
from sparseformer.data.scan import counted
from sparseformer.data.transforms import Preprocessing
from sparseformer.engine.device import available_cores
from sparseformer.engine.distributed import DistInfo
from sparseformer.engine.loop import BatchPrep, StepTools
from sparseformer.engine.optim import build_optimizer, build_schedule
from sparseformer.engine.recipe import Recipe

__all__ = ["TrainingParts", "build_training_parts", "enable_grad_checkpointing"]

logger = logging.getLogger(__name__)


@dataclass
class TrainingParts:
    """The collaborators of one run.

    Attributes:
        optimizer: AdamW over the model's parameter groups.
        tools: loss, schedule, batch preparation, precision, scaler, clipping, Mixup, EMA.
        train_loader, val_loader: this rank's loaders.
        total_batch: images per step over all processes (the learning rate is scaled to it).
    """

    optimizer: torch.optim.Optimizer
    tools: StepTools
    train_loader: DataLoader
    val_loader: DataLoader
    total_batch: int

    @property
    def steps_per_epoch(self) -> int:
        return len(self.train_loader)


def _workers(asked: int, dist: DistInfo) -> int:
    """Data-loading processes per training process: the recipe's, but no more than this
    process's share of the cores (more only queue for them). The data order does not depend
    on the count; which random augmentation an image draws does, as with any DataLoader."""
    cores = available_cores()
    # the same share as the threads get (engine.device.set_threads): cores / processes on this node
    share = max(1, cores // max(dist.local_world_size, 1))
    if asked > share:
        logger.warning("%d data-loading processes (the recipe's num_workers, or --workers) on "
                       "%d core(s) for this process: using %d", asked, share, share)  # fmt: skip
        return share
    return asked


def _loss_and_mixup(recipe: Recipe, num_classes: int) -> tuple[nn.Module, Mixup | None]:
    """The training loss, and Mixup/CutMix when the recipe turns it on (soft targets)."""
    mixup = None
    if recipe.mixup > 0 or recipe.cutmix > 0:
        mixup = Mixup(
            mixup_alpha=recipe.mixup, cutmix_alpha=recipe.cutmix, prob=recipe.mixup_prob,
            switch_prob=recipe.mixup_switch_prob, mode=recipe.mixup_mode,
            label_smoothing=recipe.label_smoothing, num_classes=num_classes,
        )  # fmt: skip
        criterion: nn.Module = SoftTargetCrossEntropy()
    elif recipe.label_smoothing > 0:
        criterion = LabelSmoothingCrossEntropy(recipe.label_smoothing)
    else:
        criterion = nn.CrossEntropyLoss()
    return criterion, mixup


def _warn_upside_down(recipe: Recipe) -> None:
    """Say where the schedule climbs where it should fall: a warm-up start above the peak
    (with a warm-up), or a floor above it (a low --lr on a recipe whose floor is fixed)."""
    above = [
        f"{name} {getattr(recipe, name):g}"
        for name in ("warmup_lr", "min_lr")
        if getattr(recipe, name) > recipe.lr and (name == "min_lr" or recipe.warmup_epochs)
    ]
    if above:
        logger.warning(
            "%s above the peak lr %g: the learning rate falls through the warm-up or rises "
            "through the run; lower them with --set (e.g. --set min_lr=%g warmup_lr=%g)",
            " and ".join(above), recipe.lr, recipe.lr / 100, recipe.lr / 100,
        )  # fmt: skip


def build_training_parts(
    model: nn.Module,
    data: DatasetBundle,
    recipe: Recipe,
    preprocessing: Preprocessing,
    seed: int,
    dist: DistInfo,
    device: torch.device,
    amp: torch.dtype | None,
) -> TrainingParts:
    """Every collaborator of a run on ``device`` (``model`` is already there)."""
    total_batch = recipe.batch_size * dist.world_size
    peak_lr, warmup_lr, min_lr = recipe.scaled_lr(total_batch)
    optimizer = build_optimizer(
        model, peak_lr, recipe.weight_decay, recipe.betas, recipe.eps, recipe.layer_decay
    )
    if dist.is_main:  # --lr is per 512 images: what it comes to at this run's batch
        logger.info(
            "learning rate: peak %.3g at a total batch of %d (%g per %d images), from %.3g "
            "over %g warm-up epochs, down to %.3g",
            peak_lr, total_batch, recipe.lr, recipe.lr_base_batch, warmup_lr,
            recipe.warmup_epochs, min_lr,
        )  # fmt: skip
        _warn_upside_down(recipe)
    if recipe.layer_decay is not None and dist.is_main:
        scales = sorted({g.get("lr_scale", 1.0) for g in optimizer.param_groups})
        logger.info(
            "layer decay %g: %d depths, learning rate x %.3g (deepest) to x %g (head)",
            recipe.layer_decay, len(scales), scales[0], scales[-1],
        )  # fmt: skip
    ema = None
    if recipe.ema_decay:
        ema = ModelEmaV3(model, decay=recipe.ema_decay, use_warmup=recipe.ema_warmup)
    # the initial loss scale of the authors' fp16 runs (torch's default, stated)
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**16) if amp == torch.float16 else None

    workers = _workers(recipe.num_workers, dist)
    pin = device.type == "cuda"
    train_loader = build_train_loader(
        data.train, recipe.batch_size, workers, seed,
        dist.rank, dist.world_size, recipe.repeated_aug, pin_memory=pin,
    )  # fmt: skip
    val_loader = build_eval_loader(
        data.val, 2 * recipe.batch_size, workers, dist.rank, dist.world_size, pin_memory=pin
    )
    if recipe.warmup_epochs >= recipe.epochs and dist.is_main:
        logger.warning(
            "the warm-up (%g epochs) is as long as the run (%s): the learning rate never "
            "reaches its peak; set --warmup-epochs below --epochs",
            recipe.warmup_epochs,
            counted(recipe.epochs, "epoch"),
        )
    schedule = build_schedule(
        recipe.schedule, (peak_lr, warmup_lr, min_lr), recipe.warmup_epochs, recipe.epochs,
        len(train_loader),
    )  # fmt: skip
    criterion, mixup = _loss_and_mixup(recipe, data.num_classes)
    erasing = None
    if recipe.augmentation.re_prob > 0:
        erasing = RandomErasing(
            recipe.augmentation.re_prob, mode=recipe.augmentation.re_mode,
            max_count=recipe.augmentation.re_count, device=str(device),
        )  # fmt: skip
    prep = BatchPrep(preprocessing.mean, preprocessing.std, device, erasing)
    tools = StepTools(criterion, schedule, prep, amp, scaler, recipe.clip_grad, mixup, ema)
    return TrainingParts(optimizer, tools, train_loader, val_loader, total_batch)


def enable_grad_checkpointing(model: nn.Module, name: str) -> None:
    """``model.set_grad_checkpointing()``.

    Raises:
        ValueError: ``model`` (named ``name`` in the message) has no gradient checkpointing.
    """
    try:
        model.set_grad_checkpointing(True)
        logger.info("gradient checkpointing: on")
    except (AttributeError, AssertionError, NotImplementedError) as exc:
        raise ValueError(
            f"{name} does not support gradient checkpointing ({exc or type(exc).__name__}); "
            "train without --grad-checkpointing"
        ) from None
