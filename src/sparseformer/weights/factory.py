"""Build named SparseFormers and load weights into them, strictly and loudly.

SparseFormer (Gao et al., ICLR 2024). ``create_model`` is the one entry point: a name from
:mod:`sparseformer.weights.registry`, config overrides, and weights from the authors' release or any
local checkpoint in a supported format (see :mod:`sparseformer.weights.convert`).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import difflib
import fnmatch
import json
import logging
import os
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from sparseformer.config import SparseFormerConfig, VideoSparseFormerConfig
from sparseformer.models import SparseFormer, VideoSparseFormer
from sparseformer.weights.convert import (
    CheckpointError,
    ConversionReport,
    convert_state_dict,
    unwrap_checkpoint,
)
from sparseformer.weights.hub import download_weights
from sparseformer.weights.inflate import inflate_image_state_dict, is_image_state_dict
from sparseformer.weights.registry import MODELS, ModelSpec, WeightsSpec, image_model_of

__all__ = [
    "UnknownModelError",
    "list_models",
    "get_model_spec",
    "create_model",
    "read_checkpoint",
    "load_checkpoint",
    "check_all_keys_mapped",
    "checkpoint_num_classes",
    "checkpoint_replicates",
]

logger = logging.getLogger(__name__)

# Config class -> model class.
_MODEL_CLASSES: dict[type, type[nn.Module]] = {
    SparseFormerConfig: SparseFormer,
    VideoSparseFormerConfig: VideoSparseFormer,
}


class UnknownModelError(ValueError):
    """A model name that is not registered; the message lists close names."""


def list_models(pattern: str = "*") -> list[str]:
    """Registered model names matching a shell-style ``pattern``, sorted."""
    return sorted(name for name in MODELS if fnmatch.fnmatch(name, pattern))


def get_model_spec(name: str) -> ModelSpec:
    """The registry entry for ``name``; unknown names raise with close suggestions."""
    if name not in MODELS:
        close = difflib.get_close_matches(name, list(MODELS), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}{hint} (all models: sparseformer models)")
    return MODELS[name]


# safetensors metadata key under which `sparseformer convert` keeps a training checkpoint's
# model name, class names, preprocessing and clip settings (JSON)
RUN_INFO_KEY = "sparseformer_run"


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint file without executing code (safetensors or ``weights_only``).

    A safetensors file written by ``sparseformer convert`` from a training checkpoint comes
    back in the training checkpoint's shape: ``{"model": tensors, "class_names": ..., ...}``.

    Raises:
        CheckpointError: a missing, truncated or non-checkpoint file, with what to do.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist or is not a file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {str(path)!r} is empty")
    if path.suffix == ".safetensors" or _looks_like_safetensors(path):
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), "pt") as f:  # the tensors and the metadata in one read
                metadata = f.metadata() or {}
                tensors = {key: f.get_tensor(key) for key in f.keys()}
        except (SafetensorError, OSError, ValueError) as exc:
            raise CheckpointError(
                f"{str(path)!r} is not a readable safetensors file ({exc}); "
                "was the download or copy cut short?"
            ) from exc
        try:  # a converted training checkpoint: its classes, preprocessing, ... (convert)
            info = json.loads(metadata.get(RUN_INFO_KEY, "{}"))
        except ValueError:
            info = {}
        return {**info, "model": tensors} if isinstance(info, dict) and info else tensors
    with open(path, "rb") as f:
        head = f.read(64)
    if not (head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"):  # zip or pickle protocol 2+
        kind = "text" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "binary data"
        raise CheckpointError(
            f"{str(path)!r} is not a readable checkpoint: it holds {kind} "
            f"({head[:24]!r}...), not a PyTorch (.pth) or safetensors file"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(
            f"{str(path)!r} is not a readable PyTorch checkpoint "
            f"({exc.__class__.__name__}: {str(exc).splitlines()[0][:200]}); "
            "it may be truncated (download or copy again) or not a checkpoint at all"
        ) from exc
    except Exception as exc:  # the unpickler raises UnpicklingError for text, code, junk
        loaded = _load_with_stand_ins(path)
        if loaded is not None:
            return loaded
        raise CheckpointError(
            f"{str(path)!r} could not be loaded safely ({exc.__class__.__name__}: "
            f"{str(exc).splitlines()[0][:200]}); only a state dict of tensors, with plain "
            "data beside it, is accepted (weights_only=True): a pickled model object must be "
            "saved again as torch.save(model.state_dict(), path)"
        ) from exc


class NotLoaded:
    """What :func:`read_checkpoint` leaves in place of an object that a checkpoint pickles
    next to its tensors (a NumPy scalar, an instance of the training code's classes): its
    pickled name, arguments and state as inert data. The file's classes never run."""

    def __init__(self, name: str, args: tuple = ()) -> None:
        self.name, self.args, self.state = name, args, None

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"<{self.name}: not loaded>"


class _StandIn:
    """Takes the place of one global the safe unpickler refuses. Called (pickle's REDUCE) it
    gives a :class:`NotLoaded`; instantiated (NEWOBJ: ``cls.__new__(cls, *args)``, an object
    or a dict subclass such as ``argparse.Namespace`` or a yacs ``CfgNode``) a plain
    ``OrderedDict``, which takes the object's items and, as attributes, its ``__dict__``."""

    def __new__(cls, *args: Any) -> Any:
        if isinstance(cls, _StandIn):  # NEWOBJ, with this stand-in as the class
            return collections.OrderedDict()
        return object.__new__(cls)

    def __init__(self, name: str) -> None:
        self.name = name

    def __call__(self, *args: Any, **kwargs: Any) -> NotLoaded:
        return NotLoaded(self.name, args)


def _load_with_stand_ins(path: Path) -> Any | None:
    """Load a checkpoint that pickles objects besides tensors and plain containers (a release
    saved with its training ``args`` or config, NumPy metrics), with inert stand-ins for them:
    no code named by the file runs. ``None`` when that does not work either."""
    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    except Exception:  # noqa: BLE001 - not a zip checkpoint: the caller's error applies
        return None
    if not names:
        return None
    stand_ins = [(_StandIn(name), name) for name in names]
    stand_ins.append((NotLoaded, f"{NotLoaded.__module__}.{NotLoaded.__qualname__}"))
    try:
        with torch.serialization.safe_globals(stand_ins):
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - a structure the stand-ins cannot take (the caller says so)
        return None
    try:  # only for a state dict beside other things, not for a pickled model object
        unwrap_checkpoint(loaded)
    except CheckpointError:
        return None
    logger.info(
        "%s: read %d kind(s) of object besides the tensors as inert data (%s); the weights "
        "do not need them",
        path,
        len(names),
        ", ".join(sorted(names)[:6]) + (", ..." if len(names) > 6 else ""),
    )
    return loaded


def _looks_like_safetensors(path: Path) -> bool:
    """A safetensors file starts with an 8-byte header length followed by JSON ``{``."""
    with open(path, "rb") as f:
        header = f.read(9)
    if len(header) < 9:
        return False
    size = int.from_bytes(header[:8], "little")
    return header[8:9] == b"{" and 0 < size < path.stat().st_size


def load_checkpoint(
    model: nn.Module,
    checkpoint: str | os.PathLike | dict[str, Any],
    *,
    allow_classifier_mismatch: bool = True,
    prefer_ema: bool = False,
) -> ConversionReport:
    """Load weights of any supported format into ``model``, strictly.

    Args:
        model: the model to fill.
        checkpoint: a path, or an already-loaded checkpoint object.
        allow_classifier_mismatch: when the checkpoint's classifier has another number of
            classes than the model's, keep the model's fresh classifier (logged) instead of
            raising.
        prefer_ema: take ``model_ema`` over ``model`` when a checkpoint holds both.

    Returns:
        The conversion report (source format, renamed and dropped keys).

    Raises:
        CheckpointError: unreadable file, not a SparseFormer checkpoint, or keys/shapes that do
            not fit the model (listed).
    """
    source = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    state, wrapper = unwrap_checkpoint(source, prefer_ema=prefer_ema)
    converted, report = convert_state_dict(state)
    report.wrapper = wrapper
    check_all_keys_mapped(report)
    if getattr(model, "roi_dims", 2) == 3 and is_image_state_dict(converted):
        # An image checkpoint for a video model: inflate it (logged by inflate_image_state_dict).
        converted = inflate_image_state_dict(converted, model.config)
    own = model.state_dict()
    stem = converted.get("stem.conv.weight")
    if (
        stem is not None
        and "stem.conv.weight" in own
        and stem.shape[1] != own["stem.conv.weight"].shape[1]
    ):
        # RGB weights for a model of other input channels: timm's rule (sum to 1 channel,
        # repeat and rescale to more)
        from timm.models import adapt_input_conv

        in_chans = own["stem.conv.weight"].shape[1]
        if stem.dim() == 5:  # a video stem's (C, 3, 1, 7, 7) kernel: adapt its one time slice
            converted["stem.conv.weight"] = adapt_input_conv(in_chans, stem[:, :, 0]).unsqueeze(2)
        else:
            converted["stem.conv.weight"] = adapt_input_conv(in_chans, stem)
        logger.info("stem adapted from %d to %d input channels", stem.shape[1], in_chans)
    head_keys = {k for k in own if k.startswith("head.")}
    if allow_classifier_mismatch:
        mismatched = [k for k in head_keys if k in converted and converted[k].shape != own[k].shape]
        missing_head = [k for k in head_keys if k not in converted]
        if mismatched or (missing_head and len(missing_head) == len(head_keys)):
            for k in head_keys:
                converted.pop(k, None)
            converted.update({k: own[k] for k in head_keys})
            logger.info(
                "checkpoint classifier does not fit %d classes: keeping a freshly initialised "
                "classifier (fine-tuning)",
                getattr(model, "num_classes", -1),
            )
        extra_head = [k for k in converted if k.startswith("head.") and k not in own]
        for k in extra_head:  # a model built without classifier drops the checkpoint's
            converted.pop(k)
            report.dropped.append(k)
    try:
        _check_keys(own, converted, report)
    except CheckpointError as exc:
        saved_name = source.get("model_name") if isinstance(source, dict) else None
        if isinstance(saved_name, str) and saved_name:  # a training checkpoint names its model
            raise CheckpointError(f"{exc} (the checkpoint is a {saved_name} run)") from None
        raise
    model.load_state_dict(converted, strict=True)
    logger.info("loaded checkpoint: %s", report.summary())
    return report


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


def checkpoint_num_classes(checkpoint: str | Path | dict) -> int:
    """Classes of a checkpoint's classifier, in any supported layout (0: saved without one)."""
    source = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    state, _ = unwrap_checkpoint(source)
    converted, _ = convert_state_dict(state)
    head = converted.get("head.weight")
    return int(head.shape[0]) if head is not None else 0


def checkpoint_replicates(
    checkpoint: str | Path | dict, model: str | SparseFormerConfig
) -> int | None:
    """Token replicates R of a video checkpoint (its ``(N x R, 6)`` initial RoIs) for
    ``model``, a registered name or a config. ``None`` (and nothing read) when the model is
    not a video SparseFormer; ``None`` too for an image checkpoint (``(N, 4)`` RoIs, inflated
    on loading) or a count that is not a multiple of N (the shape check on loading names it)."""
    config = getattr(MODELS.get(model), "config", None) if isinstance(model, str) else model
    if not isinstance(config, VideoSparseFormerConfig):
        return None
    num_tokens = config.num_tokens
    source = checkpoint if isinstance(checkpoint, dict) else read_checkpoint(checkpoint)
    state, _ = unwrap_checkpoint(source)
    rois = convert_state_dict(state)[0].get("initial_rois")
    if rois is None or rois.dim() != 2 or rois.shape[-1] != 6 or rois.shape[0] % num_tokens:
        return None
    return int(rois.shape[0]) // num_tokens


def _check_keys(own: dict[str, Tensor], new: dict[str, Tensor], report: ConversionReport) -> None:
    missing = sorted(set(own) - set(new))
    unexpected = sorted(set(new) - set(own))
    shapes = [
        f"{k}: checkpoint {tuple(new[k].shape)} vs model {tuple(own[k].shape)}"
        for k in sorted(set(own) & set(new))
        if new[k].shape != own[k].shape
    ]
    if missing or unexpected or shapes:

        def show(items: list[str]) -> str:
            return ", ".join(items[:8]) + (f" (+{len(items) - 8} more)" if len(items) > 8 else "")

        parts = []
        if shapes:
            parts.append(f"shape mismatches: {show(shapes)}")
        if missing:
            parts.append(f"missing keys: {show(missing)}")
        if unexpected:
            parts.append(f"unexpected keys: {show(unexpected)}")
        raise CheckpointError(
            f"checkpoint ({report.source_format} format) does not fit this model: "
            + "; ".join(parts)
            + ". Is it a checkpoint of another model size? Pass the matching --model / name."
        )


def pretrained_cfg(name: str) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` of a registered model: eval preprocessing of its released
    weights (ImageNet defaults where none were released), classifier and first conv names.
    ``timm.data.resolve_data_config`` reads it."""
    spec = get_model_spec(name)
    w = spec.weights or WeightsSpec(url="")
    config = spec.config
    return {
        "url": w.url,
        "num_classes": config.num_classes,
        "input_size": (config.in_chans, *w.input_size[1:]),
        "crop_pct": w.crop_pct,
        "interpolation": w.interpolation,
        "mean": tuple(w.mean),
        "std": tuple(w.std),
        "first_conv": "stem.conv",
        "classifier": "head",
        "paper_ids": "arXiv:2304.03768",
        "architecture": name,
    }


def _run_cfg(checkpoint: dict, in_chans: int) -> dict[str, Any]:
    """The ``pretrained_cfg`` entries a ``sparseformer train`` checkpoint (or a file
    ``convert`` wrote from one) records: its eval preprocessing, so that timm's
    ``resolve_model_data_config`` prepares images as ``sparseformer predict`` does, and its
    class names (timm's ``label_names``; dropped when the model gets another classifier), and
    a video run's clip sampling (``clip``). Empty for official and bare checkpoints."""
    cfg: dict[str, Any] = {}
    pre = checkpoint.get("preprocessing")
    if isinstance(pre, dict):
        if isinstance(pre.get("img_size"), int):
            cfg["input_size"] = (in_chans, pre["img_size"], pre["img_size"])
        for key in ("crop_pct", "interpolation"):
            if pre.get(key) is not None:
                cfg[key] = pre[key]
        for key in ("mean", "std"):
            if isinstance(pre.get(key), (list, tuple)):
                cfg[key] = tuple(pre[key])
    names = checkpoint.get("class_names")
    if isinstance(names, (list, tuple)) and all(isinstance(n, str) for n in names):
        cfg["label_names"] = tuple(names)
    clip = checkpoint.get("video")
    if isinstance(clip, dict):  # a video run's clip sampling: frames, stride, sampling
        cfg["clip"] = {k: clip[k] for k in ("num_frames", "stride", "sampling") if k in clip}
    return cfg


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | None = None,
    num_classes: int | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build a registered SparseFormer, optionally with weights.

    Args:
        name: a name from :func:`list_models`.
        pretrained: download (once, into torch's hub cache) and load the authors' weights.
        checkpoint_path: load weights from this local file instead (either official format,
            or ours; bare or wrapped in ``model`` / ``state_dict`` / ``model_ema``). A
            checkpoint of ``sparseformer train`` also sets ``pretrained_cfg``'s preprocessing
            (input size, crop, interpolation, mean, std) and ``label_names`` to the run's.
        num_classes: classifier size; ``None``: the checkpoint's (so a trained 10-class run
            loads as it was trained; 0, no classifier, for a checkpoint saved without one),
            else the config's 1000. When it differs from the weights' the classifier is
            re-initialised (logged), for fine-tuning.
        **overrides: fields of the model's config (e.g. ``drop_path_rate=0.1``), and timm's
            arguments: ``global_pool`` (``"avg"``, or ``""`` for per-token outputs),
            ``device`` and ``dtype`` (build there, then cast), ``pretrained_cfg`` and
            ``pretrained_cfg_overlay`` (a ``file`` or ``url`` there is what ``pretrained``
            loads), ``cache_dir`` (where ``pretrained`` downloads to).

    Returns:
        The model, in training mode.
    """
    spec = get_model_spec(name)
    config = spec.config
    given_cfg = overrides.pop("pretrained_cfg", None)  # timm's extras
    if isinstance(given_cfg, str):  # timm passes a model-name tag (name.tag) it does not know
        raise ValueError(
            f"{name} has no pretrained tag {given_cfg!r}: each SparseFormer has one set of "
            f"released weights; use {name!r}"
        )
    overlay = overrides.pop("pretrained_cfg_overlay", None) or {}
    download_dir = overrides.pop("cache_dir", None)
    device, dtype = overrides.pop("device", None), overrides.pop("dtype", None)
    global_pool = overrides.pop("global_pool", None)
    if global_pool not in (None, "", "avg"):
        raise ValueError(
            f"global_pool must be 'avg' (SparseFormer averages its tokens) or '' (one output "
            f"per token), got {global_pool!r}"
        )
    if overrides.pop("features_only", False):
        raise NotImplementedError(
            "features_only is not supported: SparseFormer has no feature-map pyramid; "
            "forward_features gives the (B, N, D) latent tokens, and "
            "forward_with_details their RoIs and sampling points"
        )
    valid = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise TypeError(
            f"{name} has no config field(s) {unknown}; valid overrides: {sorted(valid)}"
        )
    cfg = pretrained_cfg(name)
    if given_cfg is not None:  # timm passes its resolved PretrainedCfg (or a dict)
        given = given_cfg.to_dict() if hasattr(given_cfg, "to_dict") else dict(given_cfg)
        cfg.update({k: v for k, v in given.items() if v is not None})
    cfg.update(overlay)
    # every argument checked: only now download or read weights
    if checkpoint_path is None and pretrained:
        checkpoint_path = _pretrained_file(name, spec, cfg, download_dir)
    checkpoint = read_checkpoint(checkpoint_path) if checkpoint_path is not None else None
    if isinstance(checkpoint, dict):  # a run of ours: its own preprocessing and classes
        cfg.update(_run_cfg(checkpoint, cfg["input_size"][0]))
        cfg.update(overlay)
    if checkpoint is not None and num_classes is None:  # the trained classifier, as it is
        num_classes = checkpoint_num_classes(checkpoint)
    if checkpoint is not None and "replicates" not in overrides:
        # a video model built with other replicates: the checkpoint's count of token copies
        replicates = checkpoint_replicates(checkpoint, dataclasses.replace(config, **overrides))
        if replicates is not None and replicates != config.replicates:
            logger.info("%s: the checkpoint holds %d token replicates (the default is %d)",
                        name, replicates, config.replicates)  # fmt: skip
            overrides["replicates"] = replicates
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    config = dataclasses.replace(config, **overrides)
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = _MODEL_CLASSES[type(config)](config)
    if global_pool == "":
        model.reset_classifier(config.num_classes, "")
    cfg["num_classes"] = config.num_classes
    if len(cfg.get("label_names") or ()) not in (0, config.num_classes):
        del cfg["label_names"]  # a new classifier (fine-tuning): the run's names no longer fit
    model.pretrained_cfg = model.default_cfg = cfg
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    if dtype is not None:
        model.to(dtype=dtype)
    return model


def _pretrained_file(name: str, spec, cfg: dict, directory) -> str | os.PathLike:
    """What ``pretrained=True`` loads: the pretrained config's ``file`` (timm's
    ``--pretrained-path``), else its ``url`` (the released one, hash-checked, unless changed).
    A video model without a release of its own takes its image model's, inflated on loading
    (the paper's start: ``video_sparseformer_v1_tiny`` from SparseFormer-T's ImageNet weights)."""
    if cfg.get("file"):
        return cfg["file"]
    released = spec.weights
    image = MODELS.get(image_model_of(name))
    if released is None and image is not None and image.weights is not None:
        released = image.weights
        logger.info("%s: no video release; inflating the image release %s", name, released.url)
    url = cfg.get("url") or (released.url if released is not None else None)
    if not url:
        raise ValueError(f"no released weights for {name}; train it or pass checkpoint_path")
    sha256 = released.sha256 if released is not None and url == released.url else None
    return download_weights(url, sha256, directory=directory)
