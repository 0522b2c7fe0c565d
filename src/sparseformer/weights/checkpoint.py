"""One way in for checkpoints: a file read once, its layout converted once, and what it says
about itself, in one value.

SparseFormer (Gao et al., ICLR 2024); official layouts at github.com/showlab/sparseformer.
:func:`read_checkpoint` reads a file (:mod:`sparseformer.weights.reading`) or takes an
already-loaded mapping, finds the state dict in its wrapper, recognises the layout (ours, the
ImageNet release, the authors' library v2) and converts it to ours with
:func:`~sparseformer.weights.convert.convert_state_dict`, and returns one :class:`Checkpoint`.
:func:`checkpoint_metadata` is the one parser of what a file says about itself and
:func:`check_model` the one check of a model name against it. ``create_model``, every command
(train, eval, predict, viz, export, convert) and video inflation read checkpoints here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

from sparseformer.weights.convert import (
    EMA_WRAPPERS,
    CheckpointError,
    ConversionReport,
    NotASparseFormerCheckpoint,
    convert_state_dict,
    unwrap_checkpoint,
)
from sparseformer.weights.reading import keep_usable_preprocessing, read_file
from sparseformer.weights.registry import MODELS, image_model_of

__all__ = [
    "FOREIGN",
    "RUN_FIELDS",
    "Checkpoint",
    "read_checkpoint",
    "checkpoint_metadata",
    "check_model",
    "checkpoint_replicates",
    "holds_tensors",
    "record_of",
]

logger = logging.getLogger(__name__)

# source_format of weights in no SparseFormer layout (a timm model's run), kept as they are
FOREIGN = "foreign"
# what a `sparseformer train` checkpoint says about itself that `convert` carries over
RUN_FIELDS = (
    "model_name", "num_classes", "class_names", "preprocessing", "video", "architecture",
)  # fmt: skip
PREPROCESSING_FIELDS = ("img_size", "mean", "std", "crop_pct", "interpolation")
# where checkpoints of other code keep their metadata, after the top level
_META_CONTAINERS = (
    "preprocessing",  # sparseformer train's checkpoints
    "meta",
    "metadata",
    "data",
    "data_config",
    "config",
    "train_config",
    "args",
)
# classifier weights of our layout first, then of other architectures (timm runs)
_HEAD_KEYS = ("head.weight", "head.fc.weight", "fc.weight", "classifier.weight")


@dataclass(frozen=True)
class Checkpoint:
    """A checkpoint read and converted to this library's layout, with what it says about itself.

    Attributes:
        state_dict: the weights, under this library's keys (``source_format`` ``"foreign"``:
            another architecture's, as the file has them).
        report: what conversion did (source format, renamed and unmapped keys, wrapper).
        path: the file read, or ``None`` for a mapping given in memory.
        ema: whether ``state_dict`` holds the EMA weights; ``has_ema``: whether the file has
            EMA weights at all.
        model_name: the model a ``sparseformer train`` run was of (``None``: not recorded).
        num_classes: classifier outputs (as recorded, else the classifier's rows; 0: none).
        class_names: names of the classifier's outputs, where recorded.
        preprocessing: the eval preprocessing found (any of ``img_size``, ``mean``, ``std``,
            ``crop_pct``, ``interpolation``); empty when the file records none.
        video: a video run's clip settings (``num_frames``, ``stride``, ``sampling``, ...).
        architecture: config fields that differ from the named model's (a student derived by
            ``sparseformer bootstrap``); ``create_model`` builds with them.
        extras: the file's top-level entries as read (a training run's optimizer, scaler,
            step, epoch, RNG states, recipe: what ``--resume`` continues from); empty for a
            bare state dict.
    """

    state_dict: Mapping[str, Tensor]
    report: ConversionReport
    path: str | None = None
    ema: bool = False
    has_ema: bool = False
    model_name: str | None = None
    num_classes: int = 0
    class_names: tuple[str, ...] | None = None
    preprocessing: Mapping[str, Any] = field(default_factory=dict)
    video: Mapping[str, Any] | None = None
    architecture: Mapping[str, Any] = field(default_factory=dict)
    extras: Mapping[str, Any] = field(default_factory=dict)

    @property
    def source_format(self) -> str:
        """``"sparseformer"``, ``"imagenet"``, ``"v2"``, or ``"foreign"``."""
        return self.report.source_format

    def without_weights(self) -> Checkpoint:
        """This checkpoint's record without its tensors (:func:`record_of`): what a run keeps
        of the checkpoint it started from once its model holds the weights."""
        return dataclasses.replace(self, state_dict={}, extras=record_of(self.extras))

    @property
    def img_size(self) -> int | None:
        """The input size the file records (``None``: official and bare checkpoints)."""
        return self.preprocessing.get("img_size")

    @property
    def ema_scored_best(self) -> bool:
        """Whether the file holds the end of a run's best epoch, scored by its EMA weights
        (a run's ``best.pt`` whose EMA beat the model): the weights that scored are the EMA's,
        which ``prefer_ema`` (``--ema``) takes."""
        x = self.extras
        return (
            self.has_ema
            and x.get("best_source") == "ema"
            and x.get("epoch") is not None
            and x.get("best_epoch") == x.get("epoch")
            and "epoch_progress" not in x  # saved within a later epoch
        )

    @property
    def num_frames(self) -> int | None:
        """A video run's clip length, where recorded."""
        frames = (self.video or {}).get("num_frames")
        return int(frames) if isinstance(frames, int) else None

    def replicates(self, num_tokens: int) -> int | None:
        """Token replicates R of video weights (``(N x R, 6)`` initial RoIs) for a model of
        ``num_tokens`` N; ``None`` for image weights (inflated on loading) or a count that is
        not a multiple of N (the shape check on loading names it)."""
        rois = self.state_dict.get("initial_rois")
        if rois is None or rois.dim() != 2 or rois.shape[-1] != 6 or rois.shape[0] % num_tokens:
            return None
        return int(rois.shape[0]) // num_tokens

    def run_info(self) -> dict[str, Any]:
        """What a run of ours says about itself, as plain data (what ``convert`` keeps in a
        safetensors file's metadata, and eval / predict report): ``model_name``,
        ``num_classes``, ``class_names``, ``preprocessing`` (when complete), ``video``,
        ``architecture`` and ``ema``."""
        info: dict[str, Any] = {"num_classes": self.num_classes, "ema": self.ema}
        if self.model_name is not None:
            info["model_name"] = self.model_name
        if self.class_names is not None:
            info["class_names"] = list(self.class_names)
        if all(k in self.preprocessing for k in PREPROCESSING_FIELDS):
            info["preprocessing"] = {k: self.preprocessing[k] for k in PREPROCESSING_FIELDS}
        if self.video is not None:
            info["video"] = dict(self.video)
        if self.architecture:
            info["architecture"] = dict(self.architecture)
        return info


def read_checkpoint(
    source: str | os.PathLike | Mapping[str, Any] | Checkpoint, *, prefer_ema: bool = False
) -> Checkpoint:
    """Read a checkpoint once: file, wrapper, layout, conversion and metadata.

    Args:
        source: a path (safetensors, or a ``.pth`` read with ``weights_only``), a mapping
            already loaded (bare state dict or wrapped in ``model`` / ``state_dict`` /
            ``model_ema``), or a :class:`Checkpoint` (returned as it is, unless ``prefer_ema``
            asks for other weights of the same file).
        prefer_ema: take the EMA weights when the file has them (logged when it has none).

    Returns:
        The :class:`Checkpoint`. Weights in no SparseFormer layout are kept as they are
        (format ``"foreign"``: a timm model's run); loading them into a SparseFormer raises.

    Raises:
        CheckpointError: a missing, unreadable or unsafe file, or one without tensors.
    """
    if isinstance(source, Checkpoint):
        if prefer_ema and not source.has_ema:
            logger.warning("the checkpoint has no EMA weights; using the model weights")
        if not (prefer_ema and source.has_ema and not source.ema):
            return source
        path, raw = source.path, source.extras
    elif isinstance(source, Mapping):
        path, raw = None, source
    else:
        path, raw = str(source), read_file(source)
    if not isinstance(raw, Mapping):
        unwrap_checkpoint(raw)  # raises, naming what it got instead
    meta = checkpoint_metadata(raw)
    has_ema = any(raw.get(k) is not None for k in EMA_WRAPPERS)
    if prefer_ema and not has_ema:
        logger.warning("the checkpoint has no EMA weights; using the model weights")
    try:
        state, wrapper = unwrap_checkpoint(raw, prefer_ema=prefer_ema and has_ema)
    except NotASparseFormerCheckpoint:
        record = meta["model_name"] is not None or any(
            isinstance(raw.get(k), Mapping) for k in ("model", "state_dict", *EMA_WRAPPERS)
        )
        if not record:
            raise
        state, wrapper = {}, None  # a run's record without weights: its metadata still reads
    try:
        converted, report = convert_state_dict(state)
    except NotASparseFormerCheckpoint:  # raised again by whatever loads it into a SparseFormer
        converted, report = dict(state), ConversionReport(FOREIGN)
    report.wrapper = wrapper
    return Checkpoint(
        converted,
        report,
        path=path,
        ema=wrapper in EMA_WRAPPERS,
        has_ema=has_ema,
        num_classes=_num_classes(meta.pop("num_classes"), _head_rows(converted), path),
        extras={} if all(hasattr(v, "shape") for v in raw.values()) else raw,
        **meta,
    )


def _num_classes(recorded: int | None, rows: int, path: str | None) -> int:
    """The classifier's rows where the file has one (a record that disagrees is said and set
    aside: the weights are what predicts), else what the file records."""
    if recorded is not None and rows and recorded != rows:
        where = repr(path) if path is not None else "the checkpoint"
        logger.warning("%s records %d classes but its classifier has %d outputs: taking %d, as "
                       "the weights have it", where, recorded, rows, rows)  # fmt: skip
    return rows if recorded is None or rows else recorded


def _head_rows(state: Mapping[str, Tensor]) -> int:
    """The classifier's outputs: its weight's rows, else its bias's length (a weight left out
    of a file is then a missing key to strict loading, not a model without a classifier)."""
    for key in _HEAD_KEYS:
        for name in (key, key.removesuffix("weight") + "bias"):
            if name in state and hasattr(state[name], "shape") and state[name].dim() >= 1:
                return int(state[name].shape[0])
    return 0


def checkpoint_metadata(checkpoint: Mapping[str, Any]) -> dict[str, Any]:
    """What a checkpoint says about itself, from its top level and from nested dicts such as
    ``preprocessing``, ``meta`` or ``config`` (the first value found wins).

    Returns:
        ``model_name``, ``num_classes`` (``None`` when not recorded), ``class_names`` (from
        ``class_names`` / ``classes``), ``preprocessing`` (any of ``img_size`` (also read from
        ``input_size`` / ``image_size``), ``mean``, ``std``, ``crop_pct``, ``interpolation``)
        ``video`` (a video run's clip settings) and ``architecture`` (config fields of a
        derived model), each ``None`` or empty when absent.
    """
    scopes = [checkpoint] + [
        checkpoint[k] for k in _META_CONTAINERS if isinstance(checkpoint.get(k), Mapping)
    ]
    names, pre = None, {}
    for scope in scopes:
        for key in ("class_names", "classes"):
            if names is None and _is_str_list(scope.get(key)):
                names = tuple(str(n) for n in scope[key])
        for key in ("mean", "std"):
            if key not in pre and _is_number_seq(scope.get(key), 3):
                pre[key] = tuple(float(v) for v in _as_list(scope[key]))
        for key in ("crop_pct", "interpolation"):
            value = scope.get(key)
            kind = str if key == "interpolation" else (int, float)
            if key not in pre and isinstance(value, kind) and not isinstance(value, bool):
                pre[key] = value if key == "interpolation" else float(value)
        for key in ("img_size", "input_size", "image_size"):
            size = _square_side(scope.get(key))
            if "img_size" not in pre and size is not None:
                pre["img_size"] = size
    keep_usable_preprocessing(pre)  # each value out of bounds warned and replaced
    model_name, classes = checkpoint.get("model_name"), checkpoint.get("num_classes")
    video, architecture = checkpoint.get("video"), checkpoint.get("architecture")
    return {
        "model_name": model_name if isinstance(model_name, str) and model_name else None,
        "num_classes": classes if isinstance(classes, int) and classes >= 0 else None,
        "class_names": names,
        "preprocessing": pre,
        "video": dict(video) if isinstance(video, Mapping) else None,
        "architecture": dict(architecture) if isinstance(architecture, Mapping) else {},
    }


def _as_list(value: object) -> object:
    return value.tolist() if isinstance(value, Tensor) else value


def _is_str_list(value: object) -> bool:
    return (
        isinstance(value, (list, tuple)) and bool(value) and all(isinstance(v, str) for v in value)
    )


def _is_number_seq(value: object, length: int | None) -> bool:
    value = _as_list(value)
    return (
        isinstance(value, (list, tuple))
        and (length is None or len(value) == length)
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
    )


def _square_side(value: object) -> int | None:
    """An input size as S, (S,), (H, W) or (3, H, W): its (last) side."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if _is_number_seq(value, None) and len(_as_list(value)) in (1, 2, 3):
        return int(_as_list(value)[-1])
    return None


def holds_tensors(value: Any) -> bool:
    """Whether ``value`` is a tensor or holds one (in mappings, lists and tuples)."""
    if isinstance(value, Tensor):
        return True
    if isinstance(value, Mapping):
        return any(holds_tensors(v) for v in value.values())
    return isinstance(value, (list, tuple)) and any(holds_tensors(v) for v in value)


def record_of(entries: Mapping[str, Any]) -> dict[str, Any]:
    """A checkpoint's top-level ``entries`` without those that hold tensors (the weights, a
    run's EMA, optimizer and RNG states): what a run keeps, for its whole length, of the
    checkpoint it resumes or starts from. Kept whole, they were a second copy of the model
    and AdamW's state (SparseFormer-T: about 310 MB more at a run's peak)."""
    return {k: v for k, v in entries.items() if not holds_tensors(v)}


def check_model(
    checkpoint: Checkpoint,
    model_name: str | None,
    *,
    resume: bool = False,
    sparseformers_only: str | None = None,
    advice: str = "pass --model {}",
) -> str:
    """The model to build for ``checkpoint``: ``model_name``, checked against the model the
    checkpoint names; ``None`` takes the checkpoint's. A video model takes its image model's
    checkpoint (``video_sparseformer_v1_tiny`` one of ``sparseformer_v1_tiny``), inflated on
    loading, except to resume a run, which continues the same model.

    Args:
        resume: the checkpoint continues a run: only the very model it names fits.
        sparseformers_only: refuse a run of a model that is not a SparseFormer (a timm
            model's), for this reason (``"which has no RoIs to draw; ..."``).
        advice: what a refusal tells the caller to do, ``{}`` the model the checkpoint names
            (the library's :func:`~sparseformer.create_model` says "create it as").

    Raises:
        CheckpointError: a checkpoint of another model, naming it and the ``--model`` to pass.
        ValueError: no model given and none recorded.
    """
    trained_as = checkpoint.model_name
    where = repr(checkpoint.path) if checkpoint.path is not None else "the checkpoint"
    if sparseformers_only and trained_as is not None and trained_as not in MODELS:
        raise CheckpointError(f"{where} is a checkpoint of {trained_as!r}, {sparseformers_only}")
    if model_name is None:
        if trained_as is None:
            raise ValueError("which model? pass --model NAME (see `sparseformer models`)")
        return trained_as
    if trained_as == model_name or (trained_as is None and not resume):
        return model_name
    if not resume and trained_as == image_model_of(model_name):
        return model_name  # inflated on loading (logged there)
    raise CheckpointError(
        f"{where} is a checkpoint of {trained_as!r}, not {model_name!r}; "
        + advice.format(trained_as)
        + (" to resume it" if resume else "")
    )


def checkpoint_replicates(
    checkpoint: str | os.PathLike | Mapping[str, Any] | Checkpoint, model: str | Any
) -> int | None:
    """Token replicates of a video checkpoint for ``model`` (a registered name or a config);
    ``None``, and nothing read, when the model is not a video SparseFormer (see
    :meth:`Checkpoint.replicates`)."""
    config = getattr(MODELS.get(model), "config", None) if isinstance(model, str) else model
    if getattr(config, "replicates", None) is None:
        return None
    return read_checkpoint(checkpoint).replicates(config.num_tokens)
