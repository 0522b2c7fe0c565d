"""A bootstrapping run: the student derived from the teacher, trained by the training engine
(:func:`sparseformer.engine.trainer.fit`) with the teacher-alignment objective.

Everything a ``sparseformer train`` run has, this run has (recipes, DDP, bf16/fp16, atomic
checkpoints, ``--resume auto``, ``metrics.jsonl`` with ``train_loss`` the alignment loss and
the student's top-1 where the data has labels, images/s): only the loss differs. Its checkpoints
name the template model with the student's own configuration fields (``architecture``), so
``create_model(TEMPLATE, checkpoint_path=...)``, ``eval``, ``predict``, ``viz`` and ``export``
build the student from them.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from sparseformer.bootstrap.derive import (
    TEMPLATE,
    BootstrapError,
    architecture_overrides,
    bootstrap_config,
    build_student,
)
from sparseformer.bootstrap.objective import AlignmentObjective, freeze_for_bootstrap
from sparseformer.bootstrap.teacher import Teacher
from sparseformer.data.datasets import DatasetBundle
from sparseformer.data.loader import build_eval_loader
from sparseformer.data.transforms import Preprocessing
from sparseformer.engine.distributed import DistInfo, setup_distributed
from sparseformer.engine.loop import BatchPrep, evaluate
from sparseformer.engine.recipe import Recipe
from sparseformer.engine.trainer import RunOptions, amp_dtype_for, fit

__all__ = ["BootstrapSettings", "make_student", "teacher_accuracy", "bootstrap"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class BootstrapSettings:
    """The student and what trains (see :func:`~sparseformer.bootstrap.derive.
    bootstrap_config` for the defaults of ``None``).

    Attributes:
        tokens, points, inherit, focus_width, student: the student's architecture.
        finetune: inherited blocks that train, the first ones (0: only the new parts).
        loss: ``"cosine"`` or ``"smooth_l1"`` (see :mod:`~sparseformer.bootstrap.objective`).
    """

    tokens: int | None = None
    points: int | None = None
    inherit: int | None = None
    focus_width: int | None = None
    student: str | None = None
    finetune: int = 0
    loss: str = "cosine"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BootstrapSettings:
        return cls(**{f.name: data[f.name] for f in dataclasses.fields(cls) if f.name in data})


def make_student(teacher: Teacher, settings: BootstrapSettings) -> torch.nn.Module:
    """The student of ``teacher``: derived, inherited tensors copied, frozen but for the new
    parts and the first ``settings.finetune`` inherited blocks."""
    config = bootstrap_config(
        teacher.model, tokens=settings.tokens, points=settings.points,
        inherit=settings.inherit, focus_width=settings.focus_width, student=settings.student,
    )  # fmt: skip
    student = build_student(teacher.model, config)
    freeze_for_bootstrap(student, settings.finetune)
    return student


def teacher_accuracy(
    teacher: Teacher,
    data: DatasetBundle,
    preprocessing: Preprocessing,
    batch_size: int,
    device: torch.device,
    dist: DistInfo,
    amp: torch.dtype | None = None,
) -> dict[str, float]:
    """The teacher's top-1/top-5 on the validation set (its classes must be the data's)."""
    loader = build_eval_loader(data.val, batch_size, 0, dist.rank, dist.world_size)
    prep = BatchPrep(preprocessing.mean, preprocessing.std, device)
    teacher.model.to(device)
    return evaluate(teacher.model, loader, prep, dist, amp)


def _check_classes(num_classes: int, data: DatasetBundle) -> bool:
    """Whether the student's outputs are the data's classes (accuracy means something)."""
    if num_classes < data.num_classes:
        raise BootstrapError(
            f"the teacher has {num_classes} outputs but the data {data.num_classes} classes; "
            "accuracy is reported on the teacher's classes: give a folder with at most "
            f"{num_classes} classes"
        )
    if num_classes != data.num_classes:
        logger.warning(
            "the teacher has %d outputs and the data %d classes: the top-1 reported is not "
            "a classification accuracy; the alignment loss is what the run optimises",
            num_classes, data.num_classes,
        )  # fmt: skip
    return num_classes == data.num_classes


def bootstrap(
    teacher: Teacher,
    data: DatasetBundle,
    recipe: Recipe,
    preprocessing: Preprocessing,
    options: RunOptions,
    settings: BootstrapSettings,
    dist: DistInfo | None = None,
) -> dict[str, Any]:
    """Bootstrap a SparseFormer from ``teacher`` on ``data``; returns the run summary
    (:func:`~sparseformer.engine.trainer.fit`'s, with the teacher's accuracy and the
    student's configuration).

    ``options.model_name`` is replaced by :data:`~sparseformer.bootstrap.derive.TEMPLATE`; a
    resumed run must be given the same settings (the command takes them from its checkpoint).
    """
    dist = dist or setup_distributed(options.device)
    student = make_student(teacher, settings)
    same_classes = _check_classes(student.config.num_classes, data)
    device = torch.device(options.device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", dist.local_rank)
    amp = amp_dtype_for(options.precision, options.device)
    teacher_val = {}
    if same_classes:
        teacher_val = teacher_accuracy(
            teacher, data, preprocessing, 2 * recipe.batch_size, device, dist, amp
        )
        logger.info("teacher %s: val top-1 %.2f%%", teacher.name, teacher_val["acc1"])
    record = {"name": teacher.name, "val_acc1": teacher_val.get("acc1")}
    names = list(data.class_names) if same_classes else list(teacher.class_names or [])
    objective = AlignmentObjective(teacher.model, settings.loss)
    options = dataclasses.replace(
        options,
        model_name=TEMPLATE,
        objective=objective,
        extra={
            **options.extra,
            "num_classes": student.config.num_classes,
            "class_names": names or None,
            "architecture": architecture_overrides(student.config),
            "teacher": record,
            "bootstrap": settings.to_dict(),
        },
    )
    summary = fit(student, data, recipe, preprocessing, options, dist)
    return {**summary, "teacher": record, "student": architecture_overrides(student.config)}
