"""Build named SparseFormers, with the authors' released weights or any local checkpoint.

SparseFormer (Gao et al., ICLR 2024). ``create_model`` is the one entry point: a name from
:mod:`sparseformer.weights.registry` (timm-style ``name.tag`` picks one of the released
weights), config overrides, and weights read by
:func:`sparseformer.weights.checkpoint.read_checkpoint` from the authors' release or any local
checkpoint in a supported format (see :mod:`sparseformer.weights.convert`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import fnmatch
import logging
import os
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from sparseformer.config import SparseFormerConfig, VideoSparseFormerConfig
from sparseformer.models import SparseFormer, VideoSparseFormer
from sparseformer.weights.checkpoint import Checkpoint, check_model, read_checkpoint
from sparseformer.weights.convert import CheckpointError
from sparseformer.weights.hub import download_weights
from sparseformer.weights.loading import load_checkpoint
from sparseformer.weights.registry import MODELS, ModelSpec, WeightsSpec, image_model_of, split_tag

__all__ = [
    "UnknownModelError",
    "list_models",
    "get_model_spec",
    "create_model",
    "pretrained_cfg",
    "pretrained_tags",
    "tag_problem",
]

logger = logging.getLogger(__name__)

# Config class -> model class.
_MODEL_CLASSES: dict[type, type[nn.Module]] = {
    SparseFormerConfig: SparseFormer,
    VideoSparseFormerConfig: VideoSparseFormer,
}


class UnknownModelError(ValueError):
    """A model name that is not registered; the message lists close names."""


def list_models(
    pattern: str | Sequence[str] = "*",
    pretrained: bool = False,
    exclude: str | Sequence[str] = (),
) -> list[str]:
    """Registered model names matching a shell-style ``pattern`` (or any of several), sorted,
    as ``timm.list_models`` takes them: with ``pretrained``, the models with released weights
    as ``name.tag``, one per tag (patterns match that whole name); ``exclude`` leaves out the
    names matching its patterns."""
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    excluded = [exclude] if isinstance(exclude, str) else list(exclude)
    if pretrained:
        names = [f"{name}.{tag}" for name, spec in MODELS.items() for tag in spec.tags]
    else:
        names = list(MODELS)

    def matches(name: str, globs: list[str]) -> bool:
        return any(fnmatch.fnmatch(name, g) for g in globs)

    return sorted(n for n in names if matches(n, patterns) and not matches(n, excluded))


def get_model_spec(name: str) -> ModelSpec:
    """The registry entry for ``name`` (a ``.tag`` is ignored); unknown names raise with close
    suggestions."""
    name = split_tag(name)[0]
    if name not in MODELS:
        close = difflib.get_close_matches(name, list(MODELS), n=3, cutoff=0.4)
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        raise UnknownModelError(f"unknown model {name!r}{hint} (all models: sparseformer models)")
    return MODELS[name]


def pretrained_tags(name: str) -> tuple[str, ...]:
    """The pretrained tags of ``name``, its default first: its own releases, else (a video
    model) its image model's, which it inflates."""
    tags = get_model_spec(name).tags
    image = image_model_of(split_tag(name)[0])
    return tags or (MODELS[image].tags if image is not None else ())


def tag_problem(name: str) -> str | None:
    """Why a registered model's ``name.tag`` names no weights of it, with the tags it has;
    ``None`` for a name without a tag, with a tag it has, or not registered."""
    base, tag = split_tag(name)
    tags = pretrained_tags(base) if base in MODELS else ()
    if base not in MODELS or tag is None or tag in tags:
        return None
    hint = f"its tags: {', '.join(tags)}" if tags else "it has no released weights"
    return f"{base} has no pretrained tag {tag!r} ({hint})"


def released_weights(name: str, tag: str | None = None) -> WeightsSpec | None:
    """The released weights ``pretrained=True`` loads for ``name`` and ``tag`` (``None``:
    the default; a ``name.tag`` also picks it): the model's own, else (a video model without
    a release) its image model's, inflated on loading. ``None`` where none were released.

    Raises:
        ValueError: a tag the model has no weights under, listing its tags.
    """
    name, named_tag = split_tag(name)
    tag = tag or named_tag
    spec, image = get_model_spec(name), image_model_of(name)
    source = spec if spec.weights is not None or image is None else MODELS[image]
    try:
        return source.weights_for(tag)
    except ValueError:
        if tag is None:
            raise ValueError(f"{name} has no released weights") from None
        raise ValueError(tag_problem(f"{name}.{tag}")) from None


def pretrained_cfg(name: str, tag: str | None = None) -> dict[str, Any]:
    """timm's ``pretrained_cfg`` of a registered model (``name`` or ``name.tag``): eval
    preprocessing of its released weights (ImageNet defaults where none were released),
    classifier and first conv names. ``timm.data.resolve_data_config`` reads it."""
    spec = get_model_spec(name)
    w = released_weights(name, tag) if spec.weights is not None else None
    w = w or WeightsSpec(url="")
    config = spec.config
    if isinstance(config, VideoSparseFormerConfig):  # clips are resized one way
        w = dataclasses.replace(w, interpolation=_clip_interpolation())
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
        "paper_ids": spec.paper,
        "architecture": split_tag(name)[0],
        "tag": w.tag if w.url else "",  # the release's, as timm's cfgs name it
    }


def _clip_interpolation() -> str:
    """How a video model's clips are resized (imported here only for video models)."""
    from sparseformer.data.clips import CLIP_INTERPOLATION

    return CLIP_INTERPOLATION


def create_model(
    name: str,
    *,
    pretrained: bool = False,
    checkpoint_path: str | os.PathLike | Checkpoint | None = None,
    num_classes: int | None = None,
    prefer_ema: bool = False,
    **overrides: Any,
) -> nn.Module:
    """Build a registered SparseFormer, optionally with weights.

    Args:
        name: a name from :func:`list_models`, optionally with a pretrained tag
            (``sparseformer_v1_tiny.in1k_v2``: the authors' library release of the weights).
        pretrained: download (once, into torch's hub cache) and load the authors' weights (a
            video model: its image model's, inflated).
        checkpoint_path: load weights from this local file instead (either official format,
            or ours; bare or wrapped in ``model`` / ``state_dict`` / ``model_ema``), or from a
            :class:`~sparseformer.weights.checkpoint.Checkpoint` already read. A checkpoint of
            ``sparseformer train`` also sets ``pretrained_cfg``'s preprocessing (input size,
            crop, interpolation, mean, std) and ``label_names`` to the run's.
        num_classes: classifier size; ``None``: the checkpoint's (so a trained 10-class run
            loads as it was trained; 0, no classifier, for a checkpoint saved without one),
            else the model's registered count (1000 for the ImageNet classifiers; a CLIP
            image tower's output is its embedding, 512 or 768 wide). When it differs from the
            weights' the classifier is re-initialised (logged), for fine-tuning.
        prefer_ema: load a checkpoint's EMA weights (``model_ema``, timm's
            ``state_dict_ema``) where it holds them; warned and the model's taken where not.
        **overrides: fields of the model's config (e.g. ``drop_path_rate=0.1``), and timm's
            arguments: ``global_pool`` (``"avg"``, ``"token"``: the CLS, ``""``: per token),
            ``device`` and ``dtype`` (build there, then cast), ``pretrained_cfg`` (a tag, or a
            config) and ``pretrained_cfg_overlay`` (a ``file`` or ``url`` there is what
            ``pretrained`` loads), ``cache_dir`` (where ``pretrained`` downloads to).

    Returns:
        The model, in training mode.
    """
    name, tag = split_tag(name)
    spec = get_model_spec(name)
    given_cfg = overrides.pop("pretrained_cfg", None)  # timm's extras
    if isinstance(given_cfg, str):  # timm passes the tag of a `name.tag` it was given
        tag, given_cfg = given_cfg, None
    weights = released_weights(name, tag)  # an unknown tag fails here, before anything else
    timm_args = _timm_arguments(overrides)
    _check_arguments(
        name, spec.config, overrides, timm_args["device"], bool(checkpoint_path or pretrained)
    )
    cfg = pretrained_cfg(name, tag)
    if given_cfg is not None:  # timm passes its resolved PretrainedCfg (or a dict)
        given = given_cfg.to_dict() if hasattr(given_cfg, "to_dict") else dict(given_cfg)
        cfg.update({k: v for k, v in given.items() if v is not None})
    cfg.update(timm_args["overlay"])
    # every argument checked: only now download or read weights
    if checkpoint_path is None and pretrained:
        checkpoint_path = _pretrained_file(name, weights, cfg, timm_args["cache_dir"])
    ckpt = None
    if checkpoint_path is not None:
        ckpt = read_checkpoint(checkpoint_path, prefer_ema=prefer_ema)
        check_model(ckpt, name, advice="create it as {!r}", sparseformers_only=_TIMM_RUN)
    if ckpt is not None:
        cfg.update(_checkpoint_cfg(ckpt, cfg["input_size"][0]))  # a run's own preprocessing
        cfg.update(timm_args["overlay"])
        num_classes = ckpt.num_classes if num_classes is None else num_classes
        overrides = _checkpoint_overrides(name, ckpt, spec.config, overrides)
    if num_classes is not None:
        overrides["num_classes"] = num_classes
    config = dataclasses.replace(spec.config, **overrides)
    device = timm_args["device"]
    with torch.device(device) if device is not None else contextlib.nullcontext():
        model = _MODEL_CLASSES[type(config)](config)
    if timm_args["global_pool"] == "":
        model.reset_classifier(config.num_classes, "")
    model.pretrained_cfg = model.default_cfg = _built_cfg(cfg, config, timm_args)
    if ckpt is not None:
        load_checkpoint(model, ckpt)
    if timm_args["dtype"] is not None:
        model.to(dtype=timm_args["dtype"])
    return model


def _check_arguments(name: str, config, overrides: dict, device, loads: bool) -> None:
    """Refuse config fields the model does not have, and weights (``loads``) asked into a
    meta-device model (``device="meta"`` or built under ``with torch.device("meta")``), which
    has no storage to hold them.

    Raises:
        TypeError: an unknown field. ValueError: weights into a meta model.
    """
    valid = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(overrides) - valid)
    if unknown:
        raise TypeError(
            f"{name} has no config field(s) {unknown}; valid overrides: {sorted(valid)}"
        )
    target = torch.device(device) if device is not None else torch.get_default_device()
    if loads and target.type == "meta":
        raise ValueError(
            "device='meta' (or torch.device('meta') as the default) builds a model without "
            "storage, into which no weights load; build it on 'cpu' (or another device), or "
            "load into the meta model with "
            "model.load_state_dict(state_dict, assign=True)"
        )


_TIMM_RUN = "a timm model: load it with timm.create_model(NAME, checkpoint_path=...)"


def _checkpoint_overrides(
    name: str, ckpt: Checkpoint, config: SparseFormerConfig, overrides: dict[str, Any]
) -> dict[str, Any]:
    """``overrides`` over the config fields a checkpoint records (a bootstrapped student's
    own, a video run's token replicates).

    Raises:
        CheckpointError: fields this version's config does not have.
    """
    valid = {f.name for f in dataclasses.fields(config)}
    strange = sorted(set(ckpt.architecture) - valid)
    if strange:  # written by another version, or edited
        raise CheckpointError(
            f"{ckpt.path or 'the checkpoint'} records architecture field(s) {strange} "
            f"that {name} does not have; was it written by another version of sparseformer?"
        )
    merged = {**ckpt.architecture, **overrides}
    _take_replicates(name, ckpt, config, merged)
    return merged


def _built_cfg(cfg: dict[str, Any], config, timm_args: dict[str, Any]) -> dict[str, Any]:
    """``cfg`` made true of the model built from ``config``: its classes, its input channels,
    the input size asked for, class names only where they fit, and a video model's clip
    interpolation."""
    cfg["num_classes"] = config.num_classes
    # the channels it takes; the size asked for, what the user will feed it (any size works)
    cfg["input_size"] = (config.in_chans, *(timm_args["img_size"] or cfg["input_size"][1:]))
    if len(cfg.get("label_names") or ()) not in (0, config.num_classes):
        del cfg["label_names"]  # a new classifier (fine-tuning): the run's names no longer fit
    if isinstance(config, VideoSparseFormerConfig) and "interpolation" not in timm_args["overlay"]:
        cfg["interpolation"] = _clip_interpolation()  # whatever an image checkpoint says
    return cfg


def _timm_arguments(overrides: dict[str, Any]) -> dict[str, Any]:
    """Take timm's arguments out of ``overrides`` (checked): ``pretrained_cfg_overlay``,
    ``cache_dir``, ``device``, ``dtype``, ``global_pool`` (``"avg"`` and ``"token"`` go back
    as the config's pooling) and ``img_size`` (SparseFormer takes any input size: it sets the
    ``pretrained_cfg`` input size that timm's data config reads); ``features_only`` is
    refused."""
    taken = {
        "overlay": overrides.pop("pretrained_cfg_overlay", None) or {},
        "cache_dir": overrides.pop("cache_dir", None),
        "device": overrides.pop("device", None),
        "dtype": overrides.pop("dtype", None),
        "global_pool": overrides.pop("global_pool", None),
        "img_size": _img_size(overrides.pop("img_size", None)),
    }
    if taken["global_pool"] not in (None, "", "avg", "token"):
        raise ValueError(
            f"global_pool must be 'avg' (average the tokens), 'token' (the CLS token, for "
            f"models with one) or '' (one output per token), got {taken['global_pool']!r}"
        )
    if taken["global_pool"]:  # "avg" or "token": the config's pooling
        overrides["global_pool"] = taken["global_pool"]
    if overrides.pop("features_only", False):
        raise NotImplementedError(
            "features_only is not supported: SparseFormer has no feature-map pyramid; "
            "forward_features gives the (B, N, D) latent tokens, and "
            "forward_with_details their RoIs and sampling points"
        )
    return taken


def _img_size(size: Any) -> tuple[int, int] | None:
    """timm's ``img_size`` (an int or ``(h, w)``) as ``(h, w)``, checked."""
    if size is None:
        return None
    pair = (size, size) if isinstance(size, int) else tuple(size)
    if len(pair) != 2 or not all(isinstance(s, int) and s > 0 for s in pair):
        raise ValueError(f"img_size must be a positive int or (height, width), got {size!r}")
    return pair


def _checkpoint_cfg(checkpoint: Checkpoint, in_chans: int) -> dict[str, Any]:
    """The ``pretrained_cfg`` entries a checkpoint records: its eval preprocessing, so that
    timm's ``resolve_model_data_config`` prepares images as ``sparseformer predict`` does, its
    class names (timm's ``label_names``; dropped when the model gets another classifier), and
    a video run's clip sampling (``clip``). Empty for official and bare checkpoints."""
    pre = checkpoint.preprocessing
    cfg: dict[str, Any] = {
        k: pre[k] for k in ("crop_pct", "interpolation", "mean", "std") if k in pre
    }
    if checkpoint.img_size is not None:
        cfg["input_size"] = (in_chans, checkpoint.img_size, checkpoint.img_size)
    if checkpoint.class_names is not None:
        cfg["label_names"] = tuple(checkpoint.class_names)
    if checkpoint.video is not None:  # a video run's clip sampling: frames, stride, sampling
        video = checkpoint.video
        cfg["clip"] = {k: video[k] for k in ("num_frames", "stride", "sampling") if k in video}
    return cfg


def _take_replicates(
    name: str, checkpoint: Checkpoint, config: SparseFormerConfig, overrides: dict[str, Any]
) -> None:
    """A video model takes the checkpoint's count of token replicates, unless given one."""
    if "replicates" in overrides or not isinstance(config, VideoSparseFormerConfig):
        return
    replicates = checkpoint.replicates(config.num_tokens)
    if replicates is not None and replicates != config.replicates:
        logger.info("%s: the checkpoint holds %d token replicates (the default is %d)",
                    name, replicates, config.replicates)  # fmt: skip
        overrides["replicates"] = replicates


def _pretrained_file(
    name: str, released: WeightsSpec | None, cfg: dict[str, Any], directory: Any
) -> str | os.PathLike:
    """What ``pretrained=True`` loads: the pretrained config's ``file`` (timm's
    ``--pretrained-path``), else its ``url`` (the released one, from ``released_weights``,
    unless changed). A video model without a release of its own takes its image model's,
    inflated on loading (the paper's start: ``video_sparseformer_v1_tiny`` from
    SparseFormer-T's ImageNet weights)."""
    if cfg.get("file"):
        return cfg["file"]
    if released is not None and MODELS[name].weights is None:
        logger.info("%s: no video release; inflating the image release %s", name, released.url)
    url = cfg.get("url") or (released.url if released is not None else None)
    if not url:
        raise ValueError(f"no released weights for {name}; train it or pass checkpoint_path")
    sha256 = released.sha256 if released is not None and url == released.url else None
    return download_weights(url, sha256, directory=directory)
