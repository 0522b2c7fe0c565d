"""Shared set-up of the train / eval / predict commands: device, threads, preprocessing, and
models rebuilt from checkpoints with what those checkpoints say about themselves."""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from sparseformer.data.transforms import Preprocessing
from sparseformer.engine.distributed import DistInfo
from sparseformer.engine.modeling import build_model, is_sparseformer, load_weights
from sparseformer.weights.convert import CheckpointError, unwrap_checkpoint
from sparseformer.weights.factory import checkpoint_replicates, read_checkpoint
from sparseformer.weights.registry import MODELS, image_model_of

__all__ = [
    "pick_device",
    "set_threads",
    "weights_preprocessing",
    "checkpoint_info",
    "stored_img_size",
    "model_from_checkpoint",
    "resolve_preprocessing",
    "output_dir_ok",
]

logger = logging.getLogger(__name__)


def pick_device(requested: str | None, *, allow_mps: bool = False) -> str:
    """The device a ``--device`` value names, checked before any work: ``"cpu"``, ``"cuda"`` or
    ``"cuda:N"`` (then also made the current CUDA device, so that pinned memory and CUDA's
    context go to GPU N, not GPU 0); ``None`` or ``"auto"`` is ``"cuda"`` when a GPU is
    visible, else ``"cpu"``. ``allow_mps``: also ``"mps"`` (Apple GPUs), for callers that keep
    float64 work on the CPU.

    Raises:
        ValueError: a name torch does not know (``"gpu"``), a CUDA device that is not there,
            or a device type these commands do not run on (``"mps"`` for train / eval /
            predict: their metric sums are float64, which MPS lacks).
    """
    if requested in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    known = "auto, cpu, cuda, cuda:N or mps" if allow_mps else "auto, cpu, cuda or cuda:N"
    try:
        device = torch.device(requested)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown --device {requested!r}; use {known}") from None
    if device.type == "cpu":
        return "cpu"
    if device.type == "mps" and allow_mps:
        if not torch.backends.mps.is_available():
            raise ValueError("--device mps asked for, but MPS is not available; use --device cpu")
        return "mps"
    if device.type != "cuda":
        raise ValueError(f"--device {requested} is not supported; use {known}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"--device {requested} asked for, but no CUDA GPU is visible; "
                         "use --device cpu")  # fmt: skip
    if device.index is not None:
        if device.index >= count:
            raise ValueError(f"--device {requested}: {count} CUDA GPU(s) visible, "
                             f"cuda:0 to cuda:{count - 1}")  # fmt: skip
        torch.cuda.set_device(device.index)
    return str(device)


def available_cores() -> int:
    """The CPU cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0)) or 1
    return os.cpu_count() or 1


def set_threads(requested: int | None, dist: DistInfo) -> int:
    """Intra-op CPU threads: the cores this process may use, shared among local ranks.

    Busy-waiting OpenMP threads on cores that other jobs hold are ruinous: on a 2-core machine
    with a load average near 4 we measured 73 images/s with 2 threads against 505 with 1, while
    at a load of 1.5 two threads still ran at 730. So when the 1-minute load average already
    exceeds the cores, the default gives up one thread per extra unit of load (at least 1);
    ``--threads`` sets the number.
    """
    if requested is None:
        cores = available_cores()
        load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
        usable = cores if load <= cores else max(1, cores - math.ceil(load - cores))
        requested = max(1, usable // max(dist.local_world_size, 1))
        if usable < cores:
            logger.info("the machine is busy (load %.1f on %d cores): using %d thread(s)",
                        load, cores, requested)  # fmt: skip
    torch.set_num_threads(requested)
    return requested


def weights_preprocessing(model_name: str) -> Preprocessing:
    """The eval preprocessing of a registered model's released weights (ImageNet default)."""
    spec = MODELS.get(model_name)
    if spec is not None and spec.weights is not None:
        w = spec.weights
        return Preprocessing(w.input_size[-1], w.mean, w.std, w.crop_pct, w.interpolation)
    return Preprocessing()


def checkpoint_info(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """What one of our checkpoints says about itself (empty for official/bare ones)."""
    keys = ("model_name", "num_classes", "class_names", "preprocessing", "recipe", "epoch", "video")
    return {k: checkpoint[k] for k in keys if k in checkpoint}


def _head_classes(state: dict[str, Any]) -> int | None:
    for key in ("head.weight", "head.classifier.weight", "proj.weight", "fc.weight"):
        if key in state and hasattr(state[key], "shape"):
            return int(state[key].shape[0])
    return None


def stored_img_size(checkpoint: dict[str, Any]) -> int | None:
    """The input size a ``sparseformer train`` checkpoint (or its :func:`checkpoint_info`)
    records in its preprocessing; ``None`` for official and bare checkpoints."""
    pre = checkpoint.get("preprocessing") if isinstance(checkpoint, dict) else None
    size = pre.get("img_size") if isinstance(pre, dict) else None
    return size if isinstance(size, int) else None


def model_from_checkpoint(
    model_name: str,
    checkpoint_path: str | os.PathLike,
    num_classes: int | None = None,
    prefer_ema: bool = False,
) -> tuple[nn.Module, dict[str, Any]]:
    """Build ``model_name`` and load ``checkpoint_path`` (ours or either official layout).

    Args:
        num_classes: the classes the caller needs (eval: the data set's); ``None`` takes the
            checkpoint's.
        prefer_ema: load the EMA weights when the checkpoint has them.

    Returns:
        The model in eval mode, and :func:`checkpoint_info` with ``num_classes`` filled in and
        ``ema``: whether the EMA weights were loaded.

    A video model also takes a checkpoint of its image model (``video_sparseformer_v1_tiny``
    one of ``sparseformer_v1_tiny``): the weights are inflated on loading.

    Raises:
        CheckpointError: a checkpoint of another model, or of another number of classes.
    """
    ckpt = read_checkpoint(checkpoint_path)
    info = checkpoint_info(ckpt)
    trained_as = info.get("model_name")
    # a video model takes its image model's checkpoint, inflated on loading (as train does)
    inflates = trained_as is not None and trained_as == image_model_of(model_name)
    if inflates:
        logger.info("%s: inflating the image checkpoint %s", model_name, checkpoint_path)
    elif trained_as is not None and trained_as != model_name:
        raise CheckpointError(
            f"{str(checkpoint_path)!r} is a checkpoint of {trained_as!r}, not {model_name!r}; "
            f"pass --model {trained_as}"
        )
    has_ema = any(ckpt.get(k) is not None for k in ("model_ema", "state_dict_ema"))
    if prefer_ema and not has_ema:
        logger.warning("the checkpoint has no EMA weights; using the model weights")
    state, _ = unwrap_checkpoint(ckpt, prefer_ema=prefer_ema and has_ema)
    classes = info.get("num_classes") or _head_classes(state) or 1000
    if num_classes is not None and num_classes != classes:
        raise CheckpointError(
            f"{str(checkpoint_path)!r} classifies {classes} classes but the data has "
            f"{num_classes}; evaluate on data with the same classes, or fine-tune first "
            "(sparseformer train --checkpoint ...)"
        )
    info["num_classes"] = classes
    info["ema"] = prefer_ema and has_ema  # which weights were loaded
    model = build_model(
        model_name,
        classes,
        stored_img_size(info),  # timm models fix their size
        replicates=checkpoint_replicates(ckpt, model_name),
    )
    if is_sparseformer(model):
        from sparseformer.weights.factory import load_checkpoint

        load_checkpoint(model, {"model": state}, allow_classifier_mismatch=False)
    else:
        load_weights(model, {"model": state})
    return model.eval(), info


def resolve_preprocessing(
    base: Preprocessing, img_size: int | None, crop_pct: float | None, interpolation: str | None
) -> Preprocessing:
    """``base`` with the given fields replaced (``None`` keeps them)."""
    changes: dict[str, Any] = {}
    if img_size is not None:
        changes["img_size"] = int(img_size)
    if crop_pct is not None:
        changes["crop_pct"] = float(crop_pct)
    if interpolation is not None:
        changes["interpolation"] = interpolation
    return dataclasses.replace(base, **changes)


def output_dir_ok(path: Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse an output path that exists as a file, or that holds a run this one would
    overwrite (unless resuming it or told to overwrite)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output {str(path)!r} is a file; give a directory")
    held = [name for name in ("last.pt", "best.pt") if (path / name).is_file()]
    if not (resume or overwrite) and held:
        raise ValueError(
            f"--output {str(path)!r} already holds a run ({', '.join(held)}); continue it "
            "with --resume auto, start it over with --overwrite, or choose another folder"
        )
