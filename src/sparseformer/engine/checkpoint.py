"""Training checkpoints: everything needed to continue a run exactly, written atomically.

A checkpoint is a plain dict saved with ``torch.save`` and read back with
``weights_only=True`` (no code execution). Its ``"model"`` entry is the model's state dict, so
``create_model(name, checkpoint_path=...)`` and ``sparseformer eval`` read it like any other
checkpoint; the other entries (EMA weights, optimizer, scaler, step, RNG states, recipe, class
names, preprocessing) let ``--resume`` continue the same trajectory.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from sparseformer.engine.atomic import WriteError, temporary_for, write_atomic
from sparseformer.weights.checkpoint import check_model, read_checkpoint
from sparseformer.weights.convert import CheckpointError

__all__ = [
    "CHECKPOINT_VERSION",
    "LAST",
    "BEST",
    "save_atomic",
    "read_training_checkpoint",
    "capture_rng",
    "restore_rng",
]

logger = logging.getLogger(__name__)

CHECKPOINT_VERSION = 1
LAST = "last.pt"
BEST = "best.pt"


def save_atomic(obj: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``obj`` to ``path`` through a temporary file and an atomic rename.

    A kill at any moment leaves either the previous file or the new one, never half a file.
    A failed write raises :class:`~sparseformer.engine.atomic.WriteError` (one line: the
    path and the cause) and keeps the previous file. Tensors are written as CPU tensors, so a
    plain ``torch.load(path, weights_only=True)`` reads a GPU run's checkpoint on a machine
    without one.
    """
    obj = _on_cpu(obj)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, lambda f: torch.save(obj, f))


def link_atomic(source: str | os.PathLike, path: str | os.PathLike) -> None:
    """Make ``path`` hold what ``source`` holds, atomically: a hard link to the same file
    (instant, no second copy on disk), or a copy where the file system has no hard links.
    Safe because checkpoints are only ever replaced by renames, never written in place."""
    path = Path(path)
    tmp = temporary_for(path)
    try:
        os.link(source, tmp)
    except OSError:  # no hard links here (some network or FAT file systems): a copy
        with open(source, "rb") as src:
            write_atomic(path, lambda f: shutil.copyfileobj(src, f))
        return
    try:
        os.replace(tmp, path)
    except OSError as exc:
        raise WriteError(exc.errno, f"could not write {str(path)!r}: {exc.strerror}") from exc
    finally:
        tmp.unlink(missing_ok=True)


def _on_cpu(obj: Any) -> Any:
    """``obj`` with every tensor that is not on the CPU moved there. Containers without such
    tensors come back as they are (an ``OrderedDict`` state dict keeps its ``_metadata``)."""
    if isinstance(obj, torch.Tensor):
        return obj if obj.device.type == "cpu" else obj.cpu()
    if isinstance(obj, dict):
        moved = {k: _on_cpu(v) for k, v in obj.items()}
        if all(moved[k] is v for k, v in obj.items()):
            return obj
        new = type(obj)(moved) if type(obj) is not dict else moved
        if hasattr(obj, "_metadata"):
            new._metadata = obj._metadata
        return new
    if isinstance(obj, (list, tuple)):
        moved = [_on_cpu(v) for v in obj]
        if all(m is v for m, v in zip(moved, obj)):
            return obj
        return obj._make(moved) if hasattr(obj, "_make") else type(obj)(moved)
    return obj


def read_training_checkpoint(
    path: str | os.PathLike, model_name: str | None = None
) -> dict[str, Any]:
    """Read one of our training checkpoints (safely, through
    :func:`~sparseformer.weights.checkpoint.read_checkpoint`) to resume it: its top-level
    entries (weights, optimizer, scaler, step, RNG states, recipe, ...).

    Args:
        model_name: the model resuming it; a run of another model is refused.

    Raises:
        CheckpointError: not a training checkpoint, or a run of another model.
    """
    ckpt = read_checkpoint(path)
    if "model" not in ckpt.extras or "step" not in ckpt.extras:
        raise CheckpointError(
            f"{str(path)!r} is not a sparseformer training checkpoint (no model/step entries); "
            "to start from weights, pass it with --checkpoint instead of --resume"
        )
    if model_name is not None:
        check_model(ckpt, model_name, resume=True)
    return dict(ckpt.extras)


def capture_rng(device: torch.device | str | None = None) -> dict[str, Any]:
    """Python, NumPy and torch generator states, in a ``weights_only`` form, with the CUDA
    generator of ``device`` (``None``: the current CUDA device) when CUDA is in use."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
    }
    gpu = _cuda_device(device)
    if gpu is not None and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state(gpu)  # this process's GPU only: a resume may
    return state  # see fewer GPUs than this run (another node, CUDA_VISIBLE_DEVICES)


def _cuda_device(device: torch.device | str | None) -> torch.device | None:
    """The CUDA device whose generator a process uses: ``device``, or the current one."""
    if not torch.cuda.is_available():
        return None
    device = torch.device(device) if device is not None else None
    if device is not None and device.type != "cuda":
        return None
    if device is None or device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def restore_rng(state: dict[str, Any], device: torch.device | str | None = None) -> None:
    """Inverse of :func:`capture_rng` (``device`` as there)."""
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state(
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
         n["cached_gaussian"])
    )  # fmt: skip
    torch.set_rng_state(state["torch"])
    cuda, gpu = state.get("cuda"), _cuda_device(device)
    if cuda is None or gpu is None:
        return
    if isinstance(cuda, (list, tuple)):  # older checkpoints: every visible GPU's state
        if gpu.index >= len(cuda):
            logger.warning("the checkpoint holds no CUDA generator state for %s; its random "
                           "draws start afresh, so the resumed run differs", gpu)  # fmt: skip
            return
        cuda = cuda[gpu.index]
    torch.cuda.set_rng_state(cuda, gpu)
