"""Optimizer and learning-rate schedule of the recipe.

AdamW with weight decay on weight matrices only: norms, biases and the parameters a model
names in ``no_weight_decay()`` (SparseFormer's initial RoIs) are not decayed; timm's
``create_optimizer_v2`` builds exactly these groups, and with ``layer_decay`` scales each
group's learning rate by depth (``lr_scale``, from the model's ``group_matcher()``). The
schedule is a pure function of the optimizer step (linear warm-up, then cosine to the floor),
so resuming needs only the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from timm.optim import create_optimizer_v2
from torch import nn
from torch.optim import Optimizer

__all__ = ["LRSchedule", "build_optimizer", "set_lr"]


@dataclass(frozen=True)
class LRSchedule:
    """Linear warm-up from ``warmup_lr`` to ``peak_lr`` over ``warmup_steps``, then a cosine
    decay to ``min_lr`` at ``total_steps``."""

    peak_lr: float
    warmup_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return self.warmup_lr + (self.peak_lr - self.warmup_lr) * step / self.warmup_steps
        decay_steps = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / decay_steps, 1.0)
        return self.min_lr + (self.peak_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * progress))


def build_optimizer(
    model: nn.Module,
    lr: float,
    weight_decay: float,
    betas: tuple[float, float] = (0.9, 0.999),
    eps: float = 1e-8,
    layer_decay: float | None = None,
) -> Optimizer:
    """AdamW over ``model``'s parameters, without decay on norms, biases and
    ``model.no_weight_decay()``; with ``layer_decay``, each parameter group's ``lr_scale``
    is ``layer_decay ** (groups above it)``, which :func:`set_lr` applies."""
    return create_optimizer_v2(
        model,
        "adamw",
        lr=lr,
        weight_decay=weight_decay,
        betas=tuple(betas),
        eps=eps,
        filter_bias_and_bn=True,
        layer_decay=layer_decay,
    )


def set_lr(optimizer: Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
