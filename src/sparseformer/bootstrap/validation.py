"""The validation pass of a bootstrapping run (Gao et al., CVPR 2024, arXiv 2312.01987): the
alignment loss on the validation images and, where the teacher's outputs are the data's
classes, the top-1/top-5 of the student and of the teacher side by side.

It takes the place of :func:`sparseformer.engine.loop.evaluate` in the training engine (same
arguments, same keys), so each line of ``metrics.jsonl`` holds the student's and the teacher's
numbers of that epoch.
"""

from __future__ import annotations

from collections.abc import Iterable
from contextlib import nullcontext
from typing import Any

import torch
from torch import Tensor, nn
from tqdm import tqdm

from sparseformer.bootstrap.objective import AlignmentObjective, alignment_loss
from sparseformer.engine.distributed import DistInfo, all_reduce_sum
from sparseformer.engine.loop import BatchPrep
from sparseformer.engine.metrics import TOP5_MIN_CLASSES, top5_or_none

__all__ = ["AlignmentValidation"]


def _hits(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """Top-1 and top-5 hits of ``(B, K)`` logits against ``(B,)`` class indices."""
    top = logits.topk(min(5, logits.shape[-1]), dim=-1).indices  # (B, k)
    hit = top == targets[:, None]  # (B, k)
    return hit[:, 0].sum().double(), hit.any(dim=-1).sum().double()


class AlignmentValidation:
    """``validation(model, loader, prep, dist, amp_dtype, progress)`` for a student and its
    teacher: what :func:`~sparseformer.engine.loop.evaluate` returns, with ``loss`` the
    alignment loss (mean over images, the training loss's kind), and two more keys that the
    engine writes on the epoch's line, ``teacher_val_acc1`` and ``teacher_val_acc5``.

    The teacher runs on the validation images every epoch anyway (the loss needs its
    features), so its accuracy costs one product with its head; being frozen, in eval mode, on
    the same images, it gives the same number each epoch, beside the student's. Without
    ``labels`` (the teacher's outputs are not the data's classes: a CLIP embedding), the four
    accuracies are ``None``: the labels are never compared with the outputs.

    Args:
        objective: the run's training objective (its teacher and loss).
        labels: whether the data's labels index the teacher's (and so the student's) outputs.
    """

    def __init__(self, objective: AlignmentObjective, labels: bool) -> None:
        self.objective, self.labels = objective, labels

    @torch.no_grad()
    def __call__(
        self,
        model: nn.Module,
        loader: Iterable,
        prep: BatchPrep,
        dist: DistInfo,
        amp_dtype: torch.dtype | None = None,
        progress: bool = False,
    ) -> dict[str, Any]:
        model.eval()
        device, objective = prep.device, self.objective
        # alignment loss, student top-1, top-5, teacher top-1, top-5, images
        sums = torch.zeros(6, dtype=torch.float64, device=device)
        num_classes = TOP5_MIN_CLASSES  # read from the logits, as evaluate() reads them
        amp = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
        for x, y in tqdm(loader, desc="eval", leave=False, disable=not progress):
            if len(y) == 0:  # every image of the batch failed to decode (logged by the data)
                continue
            x, y = prep(x, y, train=False)
            with amp:
                target = objective.teacher_features(x)  # (B, D)
                features, logits = objective.student_features(model, x)  # (B, D), (B, K)
                teacher_logits = objective.teacher.head(target)  # (B, K): head_drop is off
            num_classes = logits.shape[-1]
            loss = alignment_loss(features.float(), target.float(), objective.loss)
            zero = torch.zeros((), dtype=torch.float64, device=device)
            student_hits = _hits(logits.float(), y) if self.labels else (zero, zero)
            teacher_hits = _hits(teacher_logits.float(), y) if self.labels else (zero, zero)
            n = torch.tensor(float(len(y)), dtype=torch.float64, device=device)
            sums += torch.stack([loss.double() * n, *student_hits, *teacher_hits, n])
        sums = all_reduce_sum(sums, dist)
        n = sums[5].item()  # 0: every file failed to decode, so no loss and no accuracy

        def percent(i: int) -> float | None:
            return 100.0 * sums[i].item() / n if self.labels and n else None

        def top5(i: int) -> float | None:  # 100% by construction for 5 classes or fewer
            value = percent(i)
            return None if value is None else top5_or_none(value, num_classes)

        return {
            "loss": sums[0].item() / n if n else None,
            "acc1": percent(1),
            "acc5": top5(2),
            "images": int(sums[5].item()),
            "teacher_val_acc1": percent(3),
            "teacher_val_acc5": top5(4),
        }
