"""A bootstrapping run: the student derived from the teacher, trained by the training engine
(:func:`sparseformer.engine.trainer.fit`) with the teacher-alignment objective.

Everything a ``sparseformer train`` run has, this run has (recipes, DDP, bf16/fp16, atomic
checkpoints, ``--resume auto``, ``metrics.jsonl`` with ``train_loss`` and ``val_loss`` the
alignment loss, the student's and the teacher's top-1 where the teacher's outputs are the data's
classes, images/s): only the loss and the validation pass differ. Its checkpoints
name a registered bootstrapped model (:func:`~sparseformer.bootstrap.derive.student_name`:
``sparseformer_btsp_openai_clip_base`` for a CLIP tower's student) with the student's own
configuration fields (``architecture``), so ``create_model(NAME, checkpoint_path=...)``,
``eval``, ``predict``, ``viz`` and ``export`` build the student from them.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from sparseformer.bootstrap.derive import (
    architecture_overrides,
    bootstrap_config,
    build_student,
    student_name,
)
from sparseformer.bootstrap.objective import (
    AlignmentObjective,
    check_finetune,
    freeze_for_bootstrap,
)
from sparseformer.bootstrap.teacher import Teacher, fingerprint
from sparseformer.bootstrap.validation import AlignmentValidation
from sparseformer.config import SparseFormerConfig
from sparseformer.data.datasets import DatasetBundle
from sparseformer.data.scan import first_names
from sparseformer.data.transforms import Preprocessing
from sparseformer.engine.distributed import DistInfo, setup_distributed
from sparseformer.engine.recipe import Recipe
from sparseformer.engine.resume import read_resume_checkpoint
from sparseformer.engine.trainer import RunOptions, fit
from sparseformer.weights.registry import MODELS

__all__ = [
    "BootstrapSettings",
    "student_config",
    "make_student",
    "accuracy_defined",
    "bootstrap",
]

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

    def changes_from(self, run: BootstrapSettings) -> list[str]:
        """What these settings (a resumed command's) ask that the ``run``'s differ in, each as
        ``"tokens (asked 9, the run's 4)"``, ``"inherit (asked 6, the run's default)"`` (the
        teacher's, not recorded as a number); a field left at its default asks nothing."""

        def shown(value: Any) -> str:
            return "default" if value is None else repr(value)

        return [
            f"{f.name} (asked {shown(getattr(self, f.name))}, the run's "
            f"{shown(getattr(run, f.name))})"
            for f in dataclasses.fields(self)
            if getattr(self, f.name) != f.default and getattr(self, f.name) != getattr(run, f.name)
        ]


def student_config(teacher: Teacher, settings: BootstrapSettings) -> SparseFormerConfig:
    """The student's configuration, every setting checked (``finetune`` too): cheap, so a
    command can call it before reading data.

    Raises:
        BootstrapError: a setting the teacher cannot give (more blocks than it has, a student
            of another width).
        ValueError: ``finetune`` beyond the inherited blocks.
    """
    config = bootstrap_config(
        teacher.model, tokens=settings.tokens, points=settings.points,
        inherit=settings.inherit, focus_width=settings.focus_width, student=settings.student,
    )  # fmt: skip
    check_finetune(config, settings.finetune)
    return config


def make_student(teacher: Teacher, settings: BootstrapSettings) -> torch.nn.Module:
    """The student of ``teacher``: derived, inherited tensors copied, frozen but for the new
    parts and the first ``settings.finetune`` inherited blocks."""
    config = student_config(teacher, settings)
    student = build_student(teacher.model, config, teacher.preprocessing)  # as its run had it
    freeze_for_bootstrap(student, settings.finetune)
    return student


def accuracy_defined(teacher: Teacher, config: SparseFormerConfig, data: DatasetBundle) -> bool:
    """Whether top-1 means something on ``data``: the teacher's outputs (the student's, whose
    head is the teacher's) are the data's classes. Where they are not, one INFO line says why
    and the run trains all the same: bootstrapping needs no labels.

    The outputs are taken for the data's classes when they are as many, the head is not a
    bias-free projection (a CLIP tower's embedding), and the teacher's checkpoint, where it
    names its classes, names the data's in the same order.
    """
    outputs, classes = config.num_classes, data.num_classes
    why = None
    if not outputs:
        why = "the teacher has no head (its outputs are features)"
    elif not config.head_bias:
        why = f"the teacher's head is a {outputs}-d projection (a CLIP embedding), not classes"
    elif outputs != classes:
        why = f"the teacher has {outputs} outputs and the data {classes} classes"
    elif teacher.class_names is not None and list(teacher.class_names) != data.class_names:
        why = (f"the teacher's classes ({first_names(teacher.class_names, 3, quote=False)}) "
               f"are not the data's ({first_names(data.class_names, 3, quote=False)})")  # fmt: skip
    if why is not None:
        logger.info(
            "no accuracy is reported: %s; the alignment loss is what the run optimises (a "
            "teacher whose head holds the data's classes, e.g. a `sparseformer train` run of "
            "it on them, gives the student's and the teacher's top-1)", why,
        )  # fmt: skip
    return why is None


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

    ``options.model_name``: the name a resumed run's checkpoint records (runs of earlier
    versions name :data:`~sparseformer.bootstrap.derive.TEMPLATE` whatever the student), or
    anything else for :func:`~sparseformer.bootstrap.derive.student_name`'s. A resumed run
    must be given the same settings (the command takes them from its checkpoint).
    """
    dist = dist or setup_distributed(options.device)
    student = make_student(teacher, settings)
    labels = accuracy_defined(teacher, student.config, data)
    names = list(data.class_names) if labels else list(teacher.class_names or [])
    objective = AlignmentObjective(teacher.model, settings.loss)
    name = _run_name(options, student.config, settings)
    student_fields = architecture_overrides(student.config, name)  # what the checkpoints record
    options = dataclasses.replace(
        options,
        model_name=name,
        objective=objective,
        validation=AlignmentValidation(objective, labels),
        extra={
            **options.extra,
            "num_classes": student.config.num_classes,
            "class_names": names or None,
            "architecture": student_fields,
            "teacher": {"name": teacher.name, "fingerprint": fingerprint(teacher.model)},
            "bootstrap": settings.to_dict(),
        },
    )
    summary = fit(student, data, recipe, preprocessing, options, dist)
    final = summary["final"] or {}
    record = {"name": teacher.name, "val_acc1": final.get("teacher_val_acc1")}
    _doubt_a_chance_teacher(record["val_acc1"], data.num_classes, teacher.class_names)
    return {**summary, "teacher": record, "student": student_fields}


def _run_name(options: RunOptions, config: SparseFormerConfig, settings: BootstrapSettings) -> str:
    """The registered name the run's checkpoints give the student: ``options.model_name``
    where it is one (the command passes a resumed run's), else a resumed run's own (runs of
    earlier versions name the AugReg template whatever the student), else
    :func:`~sparseformer.bootstrap.derive.student_name`'s."""

    def registered(name: Any) -> bool:
        return isinstance(name, str) and name.startswith("sparseformer_btsp_") and name in MODELS

    if registered(options.model_name):
        return options.model_name
    if options.resume is not None:
        saved = read_resume_checkpoint(Path(options.resume), None, bootstrap=True).get("model_name")
        if registered(saved):
            return saved
    return student_name(config, settings.student)


def _doubt_a_chance_teacher(acc1: float | None, classes: int, named: Any) -> None:
    """A teacher scoring no better than chance on the data's classes, whose checkpoint names
    none, was probably trained on other classes: its outputs were taken as these by count."""
    if acc1 is None or named is not None or classes < 2 or acc1 > 100 / classes:
        return
    logger.warning(
        "the teacher's top-1 on the validation images is %.2f%%, no better than chance "
        "(%.2f%%): its weights name no classes, so its %d outputs were taken as this folder's "
        "by count; if it was trained on other classes, the student's accuracy means nothing "
        "(the alignment it learnt holds all the same)",
        acc1, 100 / classes, classes,
    )  # fmt: skip
