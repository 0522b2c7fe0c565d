"""The teacher of a bootstrapping run: a timm ViT from its name (with or without a checkpoint),
or a ``sparseformer train`` run of one; frozen, in eval mode.

Checkpoints are read through :func:`sparseformer.weights.checkpoint.read_checkpoint` (never with
code execution) and mapped to the named architecture by timm's own ``checkpoint_filter_fn``
(OpenAI CLIP, DINO, ... layouts; position embeddings resampled to the input size).
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from sparseformer.bootstrap.facts import BootstrapError, describe_teacher, teacher_preprocessing
from sparseformer.data.transforms import Preprocessing
from sparseformer.weights.build import close_model_names, patch_grid_problem, timm_model
from sparseformer.weights.checkpoint import PREPROCESSING_FIELDS, read_checkpoint
from sparseformer.weights.registry import MODELS

__all__ = [
    "Teacher",
    "load_teacher",
    "freeze",
    "fingerprint",
    "check_resumed_teacher",
    "check_teacher_weights",
]

logger = logging.getLogger(__name__)


@dataclass
class Teacher:
    """A frozen teacher and what its inputs look like.

    Attributes:
        model: the timm ViT, in eval mode, without gradients.
        name: its timm name.
        preprocessing: its input size, mean and std (the student's too: both see one image).
        class_names: names of its outputs, where its checkpoint records them.
    """

    model: nn.Module
    name: str
    preprocessing: Preprocessing
    class_names: tuple[str, ...] | None = None


def freeze(model: nn.Module) -> nn.Module:
    """``model`` in eval mode with every parameter's gradient off."""
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def _build_by_name(name: str, img_size: int | None, ckpt) -> nn.Module:
    """The timm model ``name`` without weights: at ``img_size``, and with as many classes as
    the head of the checkpoint ``ckpt`` has (a ViT fine-tuned on one's own classes).

    Raises:
        BootstrapError: an ``img_size`` that is not a whole number of the teacher's patches.
        UnknownModelError, ValueError: a pretrained tag timm lacks, a size timm cannot build.
    """
    head = ckpt.state_dict.get("head.weight") if ckpt is not None else None
    kwargs = {"num_classes": head.shape[0]} if head is not None and head.dim() == 2 else {}
    model = timm_model(name, img_size, **kwargs)
    problem = patch_grid_problem(model, img_size, "the teacher's") if img_size else None
    if problem is not None:
        raise BootstrapError(problem)
    return model


def _load_into(model: nn.Module, name: str, ckpt, path: str | os.PathLike) -> None:
    """The read checkpoint ``ckpt`` (from ``path``) into the timm model ``name``, strictly.

    Raises:
        BootstrapError: a checkpoint of another architecture, in one line.
    """
    from timm.models.vision_transformer import checkpoint_filter_fn

    if ckpt.model_name is not None and ckpt.model_name != name:
        advice = (
            "a SparseFormer cannot teach; give a ViT's checkpoint"
            if ckpt.model_name in MODELS
            else f"pass --teacher {path} (a run's checkpoint names its model)"
        )
        raise BootstrapError(
            f"{path} is a checkpoint of {ckpt.model_name!r}, not the teacher {name!r}; {advice}"
        )
    state = dict(ckpt.state_dict)
    if "class_embedding" in state and "conv1.weight" in state:  # OpenCLIP's model.visual alone
        state = {f"visual.{k}": v for k, v in state.items()}  # as in its whole model's
    state = checkpoint_filter_fn(state, model)
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [
        f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
        for k in own
        if k in state and state[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:
        found = [
            f"{len(missing)} missing ({missing[0]}, ...)" if missing else "",
            f"{len(unexpected)} unexpected ({unexpected[0]}, ...)" if unexpected else "",
            f"shapes differ: {shapes[0]}" if shapes else "",
        ]
        raise BootstrapError(
            f"{path} does not match the teacher {name}: {'; '.join(f for f in found if f)}; "
            "pass the --teacher it was trained as"
        )
    model.load_state_dict(state)


def load_teacher(
    teacher: str | os.PathLike | nn.Module,
    checkpoint: str | os.PathLike | None = None,
    img_size: int | None = None,
    *,
    random_ok: bool = True,
) -> Teacher:
    """The frozen teacher: a timm model object, a timm name (built without weights, then
    ``checkpoint`` loaded into it), or a ``sparseformer train`` checkpoint of a timm ViT.

    Args:
        img_size: the teacher's input size when built from a name (timm resamples its position
            embedding); a run's checkpoint keeps its own.
        random_ok: a name without ``checkpoint`` gives an untrained teacher, with a warning
            (``False``: an error; an untrained teacher teaches nothing).

    Raises:
        BootstrapError: not a ViT, an unknown name, a checkpoint of another architecture, or
            a name without weights where ``random_ok`` is false.
    """
    import timm

    from sparseformer.weights.build import model_from_checkpoint

    if isinstance(teacher, nn.Module):
        name = str((getattr(teacher, "pretrained_cfg", None) or {}).get("architecture", ""))
        model, names = teacher, None
    elif Path(teacher).is_file():
        if checkpoint is not None:
            raise BootstrapError(
                f"--teacher {teacher} is a checkpoint already; give --teacher-checkpoint only "
                "with a timm name"
            )
        ckpt = read_checkpoint(teacher)
        if ckpt.model_name is None:  # weights alone: which model?
            raise BootstrapError(
                f"--teacher {teacher} holds weights without a model name; give the timm name "
                f"and the file: --teacher NAME --teacher-checkpoint {teacher}"
            )
        model, ckpt = model_from_checkpoint(None, ckpt)
        if img_size is not None and ckpt.img_size not in (None, img_size):
            raise BootstrapError(
                f"the teacher {teacher} was trained at {ckpt.img_size}px and takes no other "
                "size; leave the size out (--img-size, or img_size in --set)"
            )
        name, names = str(ckpt.model_name), ckpt.class_names
        pre = ckpt.preprocessing
        if all(k in pre for k in PREPROCESSING_FIELDS):
            describe_teacher(model)  # not a ViT: one line, before anything else
            return Teacher(freeze(model), name, Preprocessing.from_dict(dict(pre)), names)
    else:
        name = str(teacher)
        if not timm.is_model(name.partition(".")[0]):
            raise BootstrapError(
                f"--teacher {name} is neither a file nor a timm model name (timm.list_models)"
                + close_model_names(name.partition(".")[0])
            )
        ckpt = read_checkpoint(checkpoint) if checkpoint is not None else None
        if ckpt is not None and ckpt.model_name == name.partition(".")[0] and ckpt.preprocessing:
            raise BootstrapError(  # as weights for a name it would lose its size and mean
                f"--teacher-checkpoint {checkpoint} is a run of {ckpt.model_name}, which "
                "records the size and normalisation it trained with: give it as --teacher "
                f"{checkpoint}, without a name"
            )
        model = _build_by_name(name, img_size, ckpt)
        describe_teacher(model)
        if ckpt is not None:
            _load_into(model, name.partition(".")[0], ckpt, checkpoint)
        else:
            _untrained(name, random_ok)
        names = None
    return Teacher(freeze(model), name, teacher_preprocessing(model), names)


def check_teacher_weights(
    teacher: str | os.PathLike, checkpoint: str | os.PathLike | None, random_teacher: bool
) -> None:
    """Before anything is built: a timm name needs weights (``checkpoint``) unless an untrained
    teacher is asked for (``random_teacher``), which takes none.

    Raises:
        BootstrapError: weights missing, or given with ``random_teacher``.
    """
    import timm

    has_weights = checkpoint is not None or Path(teacher).is_file()
    if random_teacher and has_weights:
        raise BootstrapError(
            "--random-teacher asks for an untrained teacher: give it without weights (no "
            "--teacher-checkpoint, a timm name as --teacher), or leave it out"
        )
    named = timm.is_model(str(teacher).partition(".")[0])  # else load_teacher says what it is
    if named and not has_weights and not random_teacher:
        _untrained(str(teacher), random_ok=False)


def _untrained(name: str, random_ok: bool) -> None:
    """Say (or refuse, unless ``random_ok``) that the teacher ``name`` has no weights."""
    if not random_ok:
        raise BootstrapError(
            f"--teacher {name} is a name without weights, and an untrained teacher teaches "
            "nothing: give its weights with --teacher-checkpoint FILE (e.g. timm's file for "
            "it), or --random-teacher to check that a run works"
        )
    logger.warning("the teacher %s has random weights (no checkpoint given)", name)


def fingerprint(model: nn.Module) -> str:
    """A short hash of ``model``'s tensors (names, dtypes, shapes, values): the same teacher
    gives the same fingerprint, any other one another."""
    digest = hashlib.sha256()
    for key, tensor in model.state_dict().items():
        digest.update(f"{key}:{tensor.dtype}:{tuple(tensor.shape)};".encode())
        flat = tensor.detach().to("cpu").contiguous().reshape(-1)
        digest.update(flat.view(torch.uint8).numpy().tobytes() if flat.numel() else b"")
    return digest.hexdigest()[:16]


def check_resumed_teacher(teacher: Teacher, saved: dict) -> None:
    """Refuse to resume the run checkpoint ``saved`` with another teacher than its own (a
    student aligned to two teachers); checkpoints that record no fingerprint pass.

    Raises:
        BootstrapError: the teacher's fingerprint differs from the run's.
    """
    record = saved.get("teacher") or {}
    recorded = record.get("fingerprint")
    if recorded is None:
        return
    current = fingerprint(teacher.model)  # hashes every weight: once
    if recorded == current:
        return
    raise BootstrapError(
        f"the run was bootstrapped from another teacher ({record.get('name')}, weights "
        f"{recorded}) than this one ({teacher.name}, weights {current}); "
        "resume with the run's own --teacher and --teacher-checkpoint, or start a new --output"
    )
