"""Loading a checkpoint into a model, strictly and loudly.

SparseFormer (Gao et al., ICLR 2024). Whatever the layout (ours, the ImageNet release, the
authors' library v2), the weights arrive through
:func:`sparseformer.weights.checkpoint.read_checkpoint`; this module fits them to a built
model: image weights inflated for a video model, an RGB stem adapted to other input channels,
a classifier of another size replaced (fine-tuning, on an explicit allow-list), and every
missing, unexpected or misshapen key listed.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from sparseformer.weights.checkpoint import FOREIGN, Checkpoint, read_checkpoint
from sparseformer.weights.convert import (
    CheckpointError,
    ConversionReport,
    NotASparseFormerCheckpoint,
    detect_format,
)
from sparseformer.weights.convert_btsp import (
    BTSP_FORMAT,
    fill_missing_stage_embeddings,
    warn_on_variant_mismatch,
)
from sparseformer.weights.inflate import inflate_image_state_dict, is_image_state_dict
from sparseformer.weights.mismatch import check_keys
from sparseformer.weights.registry import classes_of_outputs

__all__ = [
    "load_checkpoint",
    "load_weights",
    "is_sparseformer",
    "check_all_keys_mapped",
    "require_sparseformer_layout",
    "warn_about_weights",
    "non_finite",
]

logger = logging.getLogger(__name__)


def is_sparseformer(model: nn.Module) -> bool:
    """Whether ``model`` (or the module DDP wraps) is a SparseFormer-family model, i.e. takes
    ``coord_grad_scale`` and has ``forward_with_details``."""
    model = getattr(model, "module", model)
    return hasattr(model, "forward_with_details")


def load_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike | Mapping[str, Any] | Checkpoint,
    *,
    allow_classifier_mismatch: bool = True,
    prefer_ema: bool = False,
) -> ConversionReport:
    """Load weights of any supported format into ``model``, strictly but for its classifier
    (see ``allow_classifier_mismatch``).

    Args:
        model: the model to fill.
        checkpoint: a path, an already-loaded checkpoint object, or a :class:`Checkpoint`
            (see :func:`~sparseformer.weights.checkpoint.read_checkpoint`).
        allow_classifier_mismatch: when the checkpoint's classifier has another number of
            classes than the model's, keep the model's fresh classifier (logged, and the
            file's listed in the report's ``dropped``) instead of raising.
        prefer_ema: take ``model_ema`` over ``model`` when a checkpoint holds both.

    Returns:
        The conversion report (source format, renamed and dropped keys).

    Raises:
        CheckpointError: unreadable file, not a SparseFormer checkpoint, or keys/shapes that do
            not fit the model (listed).
    """
    ckpt = read_checkpoint(checkpoint, prefer_ema=prefer_ema)
    report = require_sparseformer_layout(ckpt)
    converted = dict(ckpt.state_dict)
    if getattr(model, "roi_dims", 2) == 3 and is_image_state_dict(converted):
        # An image checkpoint for a video model: inflate it (logged by inflate_image_state_dict).
        converted = inflate_image_state_dict(converted, model.config)
    own = model.state_dict()
    if report.source_format == BTSP_FORMAT:  # released files may lack stage embeddings
        fill_missing_stage_embeddings(converted, own)
    # a file that says nothing of its model (the authors', a bare state dict) is told by its
    # head: a run's records its model, whose activation and head need no guessing (a LAION
    # CLIP tower's student runs GELU without a head bias); before a new classifier comes in
    silent = ckpt.model_name is None and not ckpt.architecture
    if _bootstrapped(model) and (report.source_format == BTSP_FORMAT or silent):
        warn_on_variant_mismatch(converted, model.config)
    _adapt_stem(converted, own)
    if allow_classifier_mismatch:
        _fit_classifier(converted, own, report, getattr(model, "num_classes", -1))
    try:
        check_keys(own, converted, report)
    except CheckpointError as exc:
        if ckpt.model_name is not None:  # a training checkpoint names its model
            raise CheckpointError(f"{exc} (the checkpoint is a {ckpt.model_name} run)") from None
        raise
    model.load_state_dict(converted, strict=True)
    logger.info("loaded checkpoint: %s", report.summary())
    warn_about_weights(ckpt)
    return report


def warn_about_weights(ckpt: Checkpoint) -> None:
    """A warning where ``ckpt`` holds the model's weights of a run's best epoch that its EMA
    weights scored (:attr:`~sparseformer.weights.checkpoint.Checkpoint.ema_scored_best`), and
    where weights are NaN or infinite (a run that diverged: its outputs will be too)."""
    broken = non_finite(ckpt.state_dict.items())
    if broken:
        logger.warning("%s holds NaN or infinite weights (%s): its outputs will be NaN; a run "
                       "that diverged?", ckpt.path or "the checkpoint", some(broken))  # fmt: skip
    if ckpt.ema_scored_best and not ckpt.ema:
        logger.warning(
            "%s scored best (%.2f%% top-1) with its EMA weights; these are the model's: ask "
            "for the EMA's with --ema (Python: prefer_ema=True)",
            ckpt.path or "the checkpoint", float(ckpt.extras.get("best_acc1") or 0.0),
        )  # fmt: skip


warn_of_unscored_weights = warn_about_weights  # its name before it said NaN weights too


def non_finite(named: Iterable[tuple[str, object]]) -> list[str]:
    """The names of the floating-point tensors among ``named`` that hold a NaN or an
    infinity: a diverged run's weights (a state dict's items, a model's named parameters). One
    wait for the device in all, not one per tensor."""
    tensors = [(k, v.detach()) for k, v in named if isinstance(v, Tensor) and v.is_floating_point()]
    if not tensors:
        return []
    finite = [v.isfinite().all() for _, v in tensors]
    flags = torch.stack([f.to(finite[0].device) for f in finite]).tolist()
    return [k for (k, _), ok in zip(tensors, flags, strict=True) if not ok]


def some(names: Sequence[str]) -> str:
    """``"3 tensors, e.g. head.weight"``: the :func:`non_finite` names, in a message."""
    return f"{len(names)} tensor{'s' if len(names) != 1 else ''}, e.g. {names[0]}"


def require_sparseformer_layout(checkpoint: Checkpoint) -> ConversionReport:
    """A copy of ``checkpoint``'s conversion report, once sure that its weights are a
    SparseFormer's and that conversion left nothing behind.

    Raises:
        NotASparseFormerCheckpoint: weights in no SparseFormer layout, with what they look
            like; CheckpointError: keys that no conversion maps (see
            :func:`check_all_keys_mapped`).
    """
    if checkpoint.source_format == FOREIGN:
        try:
            detect_format(list(checkpoint.state_dict))  # raises, naming what the keys look like
        except NotASparseFormerCheckpoint as exc:
            if checkpoint.model_name is None:
                raise
            raise NotASparseFormerCheckpoint(  # a run of a timm model says which
                f"{exc} (the checkpoint is a {checkpoint.model_name} run)"
            ) from None
    report = dataclasses.replace(
        checkpoint.report,
        renamed=dict(checkpoint.report.renamed),
        dropped=list(checkpoint.report.dropped),
    )
    check_all_keys_mapped(report)
    return report


def _adapt_stem(converted: dict[str, Tensor], own: Mapping[str, Tensor]) -> None:
    """RGB weights for a model of other input channels: timm's rule (sum to 1 channel,
    repeat and rescale to more), in place."""
    stem = converted.get("stem.conv.weight")
    if stem is None or "stem.conv.weight" not in own:
        return
    in_chans = own["stem.conv.weight"].shape[1]
    if stem.shape[1] == in_chans:
        return
    if stem.shape[1] != 3 and in_chans != 1:  # timm's rule: from RGB, or summed to 1 channel
        raise CheckpointError(
            f"the checkpoint's stem takes {stem.shape[1]} input channel(s), the model's "
            f"{in_chans}; build the model with in_chans={stem.shape[1]} (Python: create_model"
            f"(..., in_chans={stem.shape[1]})): weights adapt to more channels only from RGB"
        )
    from timm.models import adapt_input_conv

    if stem.dim() == 5:  # a video stem's (C, 3, 1, 7, 7) kernel: adapt its one time slice
        converted["stem.conv.weight"] = adapt_input_conv(in_chans, stem[:, :, 0]).unsqueeze(2)
    else:
        converted["stem.conv.weight"] = adapt_input_conv(in_chans, stem)
    logger.info("stem adapted from %d to %d input channels", stem.shape[1], in_chans)


def _fit_classifier(
    converted: dict[str, Tensor],
    own: Mapping[str, Tensor],
    report: ConversionReport,
    num_classes: int,
) -> None:
    """The allow-list of strict loading, in place: a checkpoint classifier of another size
    (or none) gives way to the model's fresh one (fine-tuning), and a model built without a
    classifier drops the checkpoint's (either listed in ``report.dropped``). A classifier that fits
    but for its bias (a CLIP tower's projection has none) is left to strict loading to name."""
    head_keys = {k for k in own if k.startswith("head.")}
    mismatched = [k for k in head_keys if k in converted and converted[k].shape != own[k].shape]
    missing_head = {k for k in head_keys if k not in converted}
    # a classifier over features of another width is another model's: strict loading names it
    same_width = all(converted[k].shape[1:] == own[k].shape[1:] for k in mismatched)
    replaced = same_width and bool(mismatched or (missing_head and missing_head == head_keys))
    if replaced:  # the file's classifier is dropped: listed, as a model without one drops it
        report.dropped.extend(sorted(k for k in head_keys if k in converted))
        for k in head_keys:
            converted.pop(k, None)
        converted.update({k: own[k] for k in head_keys})
        logger.info(
            "checkpoint classifier does not fit %d classes: keeping a freshly initialised "
            "classifier (fine-tuning)",
            num_classes,
        )
    if replaced or not head_keys:  # a kept classifier's extra bias is another model's
        for k in [k for k in converted if k.startswith("head.") and k not in own]:
            converted.pop(k)
            report.dropped.append(k)


def _bootstrapped(model: nn.Module) -> bool:
    """Whether ``model`` is of the bootstrapped family (a CLS token; AugReg and CLIP kinds)."""
    config = getattr(model, "config", None)
    return getattr(config, "cls_token_unit", None) is not None


def load_weights(
    model: nn.Module,
    checkpoint: str | os.PathLike | Mapping[str, Any] | Checkpoint,
    prefer_ema: bool = False,
    class_names: Sequence[str] | None = None,
) -> None:
    """Load a checkpoint into ``model`` strictly: a SparseFormer in any supported layout
    (:func:`load_checkpoint`), any other model (a timm baseline) as the file has it.

    A classifier of another size is replaced by a fresh one (fine-tuning), logged. With
    ``class_names`` (the classes of the data about to be trained on), a classifier whose
    checkpoint records other names is matched to them by name: reordered when they are the
    same classes in another order, replaced by a fresh one otherwise (logged either way).
    """
    ckpt = read_checkpoint(checkpoint, prefer_ema=prefer_ema)
    own = model.state_dict()
    if is_sparseformer(model):
        head_keys = {k for k in own if k.startswith("head.")}
    else:
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        head_keys = {
            f"{n}.{k}" for n, m in model.named_modules() if m is head for k in m.state_dict()
        }
    if class_names is not None:
        state = dict(ckpt.state_dict)
        saved = classes_of_outputs(ckpt.class_names, ckpt.num_classes, class_names)
        _match_class_names(state, own, head_keys, saved, list(class_names))
        ckpt = dataclasses.replace(ckpt, state_dict=state)
    if is_sparseformer(model):
        load_checkpoint(model, ckpt)
        return
    state = _timm_layout(dict(ckpt.state_dict), model)
    if any(k in state and state[k].shape != own[k].shape for k in head_keys):
        logger.info("checkpoint classifier does not fit: keeping a fresh one (fine-tuning)")
        state = {k: v for k, v in state.items() if k not in head_keys}
        state.update({k: own[k] for k in head_keys})
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
    warn_about_weights(ckpt)  # as load_checkpoint does for a SparseFormer


def _timm_layout(state: dict[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """A timm model's weights mapped by its module's ``checkpoint_filter_fn``, as timm maps
    the files it loads (an OpenCLIP or OpenAI CLIP tower's keys for a timm CLIP ViT); as they
    are when the module has none or the map does not apply."""
    import sys

    module = sys.modules.get(type(getattr(model, "module", model)).__module__)
    remap = getattr(module, "checkpoint_filter_fn", None)
    if remap is None or not str(getattr(module, "__name__", "")).startswith("timm."):
        return state
    try:
        return dict(remap(state, model))
    except Exception:  # noqa: BLE001 - a map for other files: strict loading says what differs
        return state


def _match_class_names(
    state: dict[str, Tensor],
    own: Mapping[str, Tensor],
    head_keys: set[str],
    saved: list[str] | None,
    wanted: list[str],
) -> None:
    """In place: the classifier rows of ``saved`` classes put in the order of ``wanted``
    when both name the same classes, or the model's fresh classifier when they do not (a
    classifier of another size is left to :func:`_fit_classifier`). A classifier that names
    no classes is kept as it is, and said so."""
    rows = [k for k in head_keys if k in state and k in own and state[k].dim() >= 1]
    rows = [k for k in rows if state[k].shape == own[k].shape and len(own[k]) == len(wanted)]
    if not rows:
        return
    if saved is None:
        logger.info(
            "keeping the checkpoint's classifier of %d classes; it records no class names, so "
            "its outputs are taken in this data's class order",
            len(wanted),
        )
        return
    if saved == wanted or len(saved) != len(wanted):
        return
    if sorted(saved) == sorted(wanted) and len(set(saved)) == len(saved):
        index = {name: i for i, name in enumerate(saved)}
        order = [index[name] for name in wanted]
        for k in rows:
            state[k] = state[k][order]
        logger.info("checkpoint classifier reordered by class name to this data's class order")
        return
    known = set(wanted)
    other = [name for name in saved if name not in known]
    for k in rows:
        state[k] = own[k]
    logger.info(
        "checkpoint classifier is of other classes (%s%s): keeping a freshly initialised "
        "classifier (fine-tuning)",
        ", ".join(repr(n) for n in other[:3]),
        f" and {len(other) - 3} more" if len(other) > 3 else "",
    )


def check_all_keys_mapped(report: ConversionReport) -> None:
    """Every key of both official layouts has a mapping: a dropped key means a checkpoint of
    another architecture or a modified model.

    Raises:
        CheckpointError: the report dropped keys (listed).
    """
    if report.dropped:
        shown = ", ".join(report.dropped[:8])
        more = f" (+{len(report.dropped) - 8} more)" if len(report.dropped) > 8 else ""
        raise CheckpointError(
            f"the {report.source_format} checkpoint holds keys that this model does not have "
            f"and no conversion maps: {shown}{more}; is it a checkpoint of another "
            "architecture or a modified model?"
        )
