"""Models for training and evaluation: our registered SparseFormers or any timm model.

Dense timm baselines (``resnet18``, ``vit_tiny_patch16_224``, ...) train through the same
engine, so comparisons use one recipe and one data pipeline.
"""

from __future__ import annotations

import difflib
import logging
import os
from typing import Any

from torch import nn

from sparseformer.weights.convert import CheckpointError, unwrap_checkpoint
from sparseformer.weights.factory import (
    UnknownModelError,
    create_model,
    list_models,
    load_checkpoint,
    read_checkpoint,
)

__all__ = ["build_model", "check_model_name", "is_sparseformer", "load_weights", "model_input_size"]

logger = logging.getLogger(__name__)


def is_sparseformer(model: nn.Module) -> bool:
    """Whether ``model`` (or the module DDP wraps) is a SparseFormer-family model, i.e. takes
    ``coord_grad_scale`` and has ``forward_with_details``."""
    model = getattr(model, "module", model)
    return hasattr(model, "forward_with_details")


def close_model_names(name: str) -> str:
    """``"; did you mean a, b?"`` with the registered SparseFormer or timm names closest to
    ``name``, or ``""`` when none is close."""
    import timm

    pool = list(dict.fromkeys(list_models() + timm.list_models()))  # timm lists ours too
    close = difflib.get_close_matches(name, pool, n=4, cutoff=0.5)
    return f"; did you mean {', '.join(close)}?" if close else ""


def check_model_name(name: str) -> str:
    """``"sparseformer"`` or ``"timm"``; an unknown name raises, listing close names."""
    import timm

    if name in list_models():
        return "sparseformer"
    if timm.is_model(name):
        return "timm"
    raise UnknownModelError(
        f"unknown model {name!r}{close_model_names(name)} (SparseFormers: sparseformer models; "
        "any timm model name also works)"
    )


def require_sparseformer(name: str, command: str) -> None:
    """Refuse a timm model in a command that handles SparseFormers only, saying so, and an
    unknown name with the closest SparseFormer names.

    Raises:
        UnknownModelError: not a registered SparseFormer.
    """
    import timm

    if name in list_models():
        return
    if timm.is_model(name):
        raise UnknownModelError(
            f"{command} handles SparseFormer models only (sparseformer models lists them); "
            f"{name!r} is a timm model: use timm's own tools for it"
        )
    close = difflib.get_close_matches(name, list_models(), n=4, cutoff=0.5)
    raise UnknownModelError(
        f"unknown model {name!r}"
        + (f"; did you mean {', '.join(close)}?" if close else "")
        + f" ({command} takes the SparseFormers that sparseformer models lists)"
    )


def build_model(
    name: str,
    num_classes: int,
    img_size: int | None = None,
    drop_path: float | None = None,
    num_frames: int | None = None,
    replicates: int | None = None,
) -> nn.Module:
    """A fresh model ``name`` with ``num_classes`` outputs.

    Args:
        name: a registered SparseFormer or any timm model name.
        num_classes: classifier outputs.
        img_size: input size, passed to timm models that take one (SparseFormers take any
            size).
        drop_path: stochastic-depth rate; ``None`` keeps the model's default.
        num_frames: a video model's clip length (its config records it; it warns when
            fewer than its token replicates); ``None`` keeps the model's default.
        replicates: a video model's token replicates (a checkpoint's, from
            :func:`~sparseformer.weights.factory.checkpoint_replicates`); ``None``: the default.
    """
    kind = check_model_name(name)
    if kind == "sparseformer":
        overrides: dict[str, Any] = {}
        if drop_path is not None:
            overrides["drop_path_rate"] = drop_path
        if num_frames is not None:
            overrides["num_frames"] = num_frames
        if replicates is not None:
            overrides["replicates"] = replicates
        return create_model(name, num_classes=num_classes, **overrides)
    import timm

    kwargs: dict[str, Any] = {"num_classes": num_classes}
    if drop_path is not None:
        kwargs["drop_path_rate"] = drop_path
    if img_size is not None:
        try:
            return timm.create_model(name, pretrained=False, img_size=img_size, **kwargs)
        except TypeError:  # convolutional nets take any size and no img_size argument
            pass
    return timm.create_model(name, pretrained=False, **kwargs)


def model_input_size(name: str) -> int | None:
    """The input size a timm model was designed for (``None`` for SparseFormers and unknown)."""
    if check_model_name(name) == "sparseformer":
        return None
    import timm

    cfg = timm.models.get_pretrained_cfg(name)
    return int(cfg.input_size[-1]) if cfg is not None else None


def load_weights(
    model: nn.Module, checkpoint: str | os.PathLike | dict, prefer_ema: bool = False
) -> None:
    """Load a checkpoint into ``model`` strictly (SparseFormers: any supported format).

    A classifier of another size is replaced by a fresh one (fine-tuning), logged.
    """
    if is_sparseformer(model):
        load_checkpoint(model, checkpoint, prefer_ema=prefer_ema)
        return
    source = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    state, _ = unwrap_checkpoint(source, prefer_ema=prefer_ema)
    own = model.state_dict()
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    head_keys = {f"{n}.{k}" for n, m in model.named_modules() if m is head for k in m.state_dict()}
    for k in head_keys:
        if k in state and state[k].shape != own[k].shape:
            logger.info("checkpoint classifier does not fit: keeping a fresh one (fine-tuning)")
            state = {**{k: v for k, v in state.items() if k not in head_keys}}
            state.update({k: own[k] for k in head_keys})
            break
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in set(own) & set(state) if own[k].shape != state[k].shape]
    if missing or unexpected or shapes:
        raise CheckpointError(
            f"checkpoint does not fit {model.__class__.__name__}: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}; is it a checkpoint "
            "of another model? Pass the matching --model"
        )
    model.load_state_dict(state, strict=True)
