"""Reading a checkpoint file safely: safetensors, or ``torch.load(weights_only=True)`` with inert
stand-ins for the objects a release pickles beside its tensors. No code named by a file runs.

SparseFormer (Gao et al., ICLR 2024). Only :mod:`sparseformer.weights.checkpoint` calls this
module; everything else reads checkpoints through
:func:`sparseformer.weights.checkpoint.read_checkpoint`.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import re
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

from sparseformer.config import IMG_SIZES, INTERPOLATIONS
from sparseformer.weights.convert import CheckpointError, UnreadableCheckpoint, unwrap_checkpoint

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "RUN_INFO_KEY",
    "NotLoaded",
    "read_file",
    "keep_usable_preprocessing",
]

logger = logging.getLogger(__name__)

# safetensors metadata key under which `sparseformer convert` keeps a training checkpoint's
# what checkpoint files are named (torch's and timm's, safetensors): a folder's are found by it
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".safetensors", ".bin")
# model name, class names, preprocessing and clip settings (JSON)
RUN_INFO_KEY = "sparseformer_run"


def read_file(path: str | os.PathLike) -> Any:
    """Read a checkpoint file without executing code (safetensors or ``weights_only``).

    A safetensors file written by ``sparseformer convert`` from a training checkpoint comes
    back in the training checkpoint's shape: ``{"model": tensors, "class_names": ..., ...}``.

    Raises:
        CheckpointError: a missing, truncated or non-checkpoint file, with what to do.
    """
    path = Path(path)
    if path.is_dir():
        raise UnreadableCheckpoint(_folder_given(path))
    if not path.is_file():
        raise UnreadableCheckpoint(
            f"checkpoint {str(path)!r} does not exist or is not a file{_release_hint(path)}"
        )
    if path.stat().st_size == 0:
        raise UnreadableCheckpoint(f"checkpoint {str(path)!r} is empty")
    with open(path, "rb") as f:
        head = f.read(64)
    # zip, or pickle protocol 2+ (not a safetensors header's length whose low byte is 0x80)
    torch_saved = head.startswith(b"PK\x03\x04") or (head[:1] == b"\x80" and head[8:9] != b"{")
    if _looks_like_safetensors(head, path.stat().st_size) or (
        path.suffix == ".safetensors" and not torch_saved
    ):
        return _read_safetensors(path)
    if head[:1] == b"\x08" and (path.suffix.lower() == ".onnx" or b"pytorch" in head[:16]):
        raise CheckpointError(  # ModelProto's ir_version first: `sparseformer export`'s output
            f"{str(path)!r} is an ONNX model (a graph with its weights), not a checkpoint; run "
            "it with onnxruntime, or give the checkpoint it was exported from"
        )
    if not torch_saved:  # a PyTorch file, whatever its name (a .pth renamed .safetensors)
        kind = "text" if all(32 <= b < 127 or b in (9, 10, 13) for b in head) else "binary data"
        raise UnreadableCheckpoint(
            f"{str(path)!r} is not a readable checkpoint: it holds {kind} "
            f"({head[:24]!r}...), not a PyTorch (.pth) or safetensors file"
        )
    if head.startswith(b"PK\x03\x04") and _is_torchscript(path):
        raise CheckpointError(
            f"{str(path)!r} is a TorchScript archive (torch.jit.save: a program with its "
            "weights), not a checkpoint, and a program is not run to read it; where you trust "
            "it, load it with torch.jit.load and save its weights with "
            "torch.save(model.state_dict(), path)"
        )
    try:
        with warnings.catch_warnings():  # torch's note on a pickle protocol: the error says more
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return _torch_load(path)
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise UnreadableCheckpoint(
            f"{str(path)!r} is not a readable PyTorch checkpoint ({_torch_reason(exc)}); "
            "it may be truncated (download or copy again) or not a checkpoint at all"
        ) from exc
    except Exception as exc:  # the unpickler raises UnpicklingError for text, code, junk
        loaded = _load_with_stand_ins(path)
        if loaded is not None:
            return loaded
        if not head.startswith((b"PK\x03\x04", _LEGACY_TORCH_SAVE)):  # pickle.dump's stream
            raise CheckpointError(
                f"{str(path)!r} is a plain pickle (pickle.dump), not a torch.save or "
                "safetensors file, and a pickle cannot be read without running its code; where "
                "you trust it, load it and save the weights with torch.save(state_dict, path)"
            ) from exc
        raise CheckpointError(
            f"{str(path)!r} could not be loaded safely ({_torch_reason(exc)}): only tensors "
            "and plain data are read (weights_only=True), and no code the file names runs; "
            "where you trust it, save the weights alone: torch.save(model.state_dict(), path)"
        ) from exc


def _read_safetensors(path: Path) -> Any:
    """A safetensors file's tensors; a training checkpoint's shape (``{"model": tensors,
    ...}``) for one ``sparseformer convert`` wrote from a training checkpoint.

    Raises:
        UnreadableCheckpoint: the file cannot be parsed (cut short, or not safetensors).
    """
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), "pt") as f:  # the tensors and the metadata in one read
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError) as exc:
        raise UnreadableCheckpoint(
            f"{str(path)!r} is not a readable safetensors file ({exc}); "
            "was the download or copy cut short?"
        ) from exc
    try:  # a converted training checkpoint: its classes, preprocessing, ... (convert)
        info = json.loads(metadata.get(RUN_INFO_KEY, "{}"))
    except (ValueError, RecursionError):  # not ours, or nested past Python's limit
        info = {}
    if not isinstance(info, dict) or not info:
        return tensors
    held = "model_ema" if info.pop("ema", False) is True else "model"  # convert --ema's
    return {**info, held: tensors}


def _torch_load(path: Path) -> Any:
    """``torch.load(weights_only=True)`` of a PyTorch file, whatever its name: given a name
    ending in ``.safetensors``, torch reads the file as safetensors, so it gets the file."""
    if path.suffix != ".safetensors":
        return torch.load(path, map_location="cpu", weights_only=True)
    with open(path, "rb") as f:
        return torch.load(f, map_location="cpu", weights_only=True)


def _is_torchscript(path: Path) -> bool:
    """Whether a zip file is a TorchScript archive (it holds ``code/`` and ``constants.pkl``
    beside the tensors), which ``torch.load`` hands to ``torch.jit.load``."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return False  # torch.load says what is wrong with it
    return any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names)


def _torch_reason(exc: Exception) -> str:
    """torch's reason for refusing a file, whole, on one line and without terminal colours:
    the lines that name what was refused (``Unsupported global: GLOBAL x.Y ...``) when there
    are any, else the whole message. Its advice to load with ``weights_only=False`` opens the
    message and is left out, as is its advice to allowlist the class a file names: no command
    of this library does either."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc))  # torch bolds a sentence for terminals
    lines = [" ".join(line.split()) for line in text.splitlines() if line.strip()]
    named = [  # without torch's advice to allowlist the class: not how to fix the file here
        line.removeprefix("WeightsUnpickler error: ").split(" Please use `torch.serialization")[0]
        for line in lines
        if "GLOBAL" in line
    ]
    said = [line for line in lines if not line.startswith(_TORCH_ADVICE)]  # the reason alone
    reason = " ".join(named or said or lines).split(" This is an internal miniz error.")[0]
    return f"{exc.__class__.__name__}: {reason}"  # (miniz's guesses: the message has ours)


# torch.save's files before its zip format open with a pickled magic number
_LEGACY_TORCH_SAVE = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"
# the sentences around torch's reason for refusing a file (its advice, its links)
_TORCH_ADVICE = ("Weights only load failed", "Please file an issue", "Check the documentation")


class NotLoaded:
    """What :func:`read_file` leaves in place of an object that a checkpoint pickles
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
            loaded = _torch_load(path)
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


def _release_hint(path: Path) -> str:
    """Where a missing file named as a release comes from."""
    from sparseformer.weights.registry import release_named

    release = release_named(path.name)
    if release is None:
        return ""
    name, weights = release
    return f"; that is the name of {name}'s released weights: download {weights.url}"


def _folder_given(folder: Path) -> str:
    """What to say of a folder given as a checkpoint (a run folder, most often)."""
    files = sorted(
        p.name for p in folder.iterdir() if p.suffix.lower() in CHECKPOINT_SUFFIXES and p.is_file()
    )
    files.sort(key=lambda name: name != "best.pt")  # a run's best first
    if not files:
        return f"checkpoint {str(folder)!r} is a folder with no checkpoint file in it; give a file"
    shown = " or ".join(str(folder / name) for name in files[:2])
    return f"checkpoint {str(folder)!r} is a folder; give a checkpoint file in it: {shown}"


def _looks_like_safetensors(head: bytes, file_size: int) -> bool:
    """Whether a file's first bytes are a safetensors file's: an 8-byte header length followed
    by JSON ``{``."""
    if len(head) < 9:
        return False
    size = int.from_bytes(head[:8], "little")
    return head[8:9] == b"{" and 0 < size < file_size


def keep_usable_preprocessing(pre: dict[str, Any]) -> None:
    """Replace, warning, the values of a checkpoint's preprocessing record that no command can
    use (a file's data, not ours to trust): an unknown interpolation becomes bicubic, and an
    input size outside ``IMG_SIZES`` or a crop_pct outside 0.1-1 are dropped for the model's
    own (a size of 10**9 asked for exabytes). The rest of the record stands."""
    if pre.get("interpolation") not in (None, *INTERPOLATIONS):
        logger.warning("the checkpoint's interpolation %r is not one of %s: resizing bicubic",
                       pre["interpolation"], ", ".join(INTERPOLATIONS))  # fmt: skip
        pre["interpolation"] = "bicubic"
    low, high = IMG_SIZES
    if not low <= pre.get("img_size", low) <= high:
        logger.warning("the checkpoint's input size %r is not within %d-%d pixels: the model's "
                       "own is used", pre.pop("img_size"), low, high)  # fmt: skip
    if not 0.1 <= pre.get("crop_pct", 1.0) <= 1:  # NaN too; 0.1: a resize to 10x the input
        logger.warning("the checkpoint's crop_pct %r is not within 0.1-1: the model's own is "
                       "used", pre.pop("crop_pct"))  # fmt: skip
