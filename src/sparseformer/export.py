"""ONNX export of image and video classifiers, checked against onnxruntime.

The graph takes normalised images ``(batch, C, S, S)``, or clips ``(batch, C, T, S, S)`` for a
video SparseFormer (C the model's input channels, 3 for RGB; batch, height and width dynamic,
T fixed at export), and returns logits ``(batch, classes)``. SparseFormer's bilinear sampling
exports as ONNX ``GridSample`` (opset 16) and is written at opset 18 or later (torch's
exporter), 20 for the trilinear sampling of clips (5-D ``GridSample``). The coordinate-gradient
clamp is an identity in inference and leaves no node.
Uses the torch.export-based exporter (``onnxscript``) and ``onnxruntime``, installed by the
``export`` extra.
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import os
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import Tensor, nn

from sparseformer.config import IMG_SIZES

__all__ = [
    "ExportError",
    "export_onnx",
    "onnx_max_difference",
    "check_export_settings",
    "VIDEO_MIN_OPSET",
    "MAX_DIFFERENCE",
]

log = logging.getLogger(__name__)

MIN_OPSET = 18  # torch's exporter writes 18 and later (it converts a lower ask, and fails)
VIDEO_MIN_OPSET = 20  # GridSample on 5-D volumes
MIN_SIZE, MAX_SIZE = IMG_SIZES  # the exporter's smallest and largest height and width
# onnxruntime's fp32 logits differ from PyTorch's by ~1e-7 to 1e-6; more means a wrong graph
MAX_DIFFERENCE = 1e-3


class ExportError(RuntimeError):
    """Export not possible here (a missing package), said in one line."""


def _require(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        raise ExportError(
            f"ONNX export needs the {module!r} package: pip install 'sparseformer[export]'"
        ) from None


@contextmanager
def _quiet_exporter():
    """The exporter's graph passes log every rewrite at INFO; onnxscript's optimiser also
    notes each constant it leaves unfolded (a Split) at WARNING: keep what a user acts on."""
    quieter = {"onnxscript": logging.ERROR, "onnx_ir": logging.WARNING,
               "torch.onnx": logging.WARNING}  # fmt: skip
    loggers = {name: logging.getLogger(name) for name in quieter}
    levels = {name: lg.level for name, lg in loggers.items()}
    for name, lg in loggers.items():
        lg.setLevel(quieter[name])
    try:
        yield
    finally:
        for name, lg in loggers.items():
            lg.setLevel(levels[name])


class _Logits(nn.Module):
    """``images -> logits`` with positional input only, as exporters expect."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, images: Tensor) -> Tensor:
        return self.model(images)


def _cpu_float_copy(model: nn.Module) -> nn.Module:
    """An eval-mode float32 copy of ``model`` on the CPU; ``model`` stays as it was. Its
    tensors are copied to the CPU one by one, never duplicated on a GPU."""
    memo: dict[int, Tensor] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        c = t.detach().to("cpu", copy=True)
        c = c.float() if c.is_floating_point() else c
        memo[id(t)] = nn.Parameter(c, t.requires_grad) if isinstance(t, nn.Parameter) else c
    return copy.deepcopy(model, memo).eval()


def _preprocessing_metadata(model: nn.Module, example: Tensor, dynamic_size: bool) -> dict:
    """What a consumer of the graph needs to prepare its input and read its output, from the
    model's ``pretrained_cfg`` (a run's own after ``create_model(checkpoint_path=...)``) made
    true of the graph (``example``: its example input): the architecture, input size (the
    graph's own channels, frames and, when fixed, size), mean and std (the graph takes
    normalised input; left out where their channels are not the graph's), crop and
    interpolation, and the class names where they name its outputs (ImageNet's for 1000
    outputs that name none, as ``predict`` has them); values are JSON."""
    cfg = dict(getattr(model, "pretrained_cfg", None) or {})
    channels, side = example.shape[1], example.shape[-2:]
    size = cfg.get("input_size") or (channels, *side)
    cfg["input_size"] = (channels, *(size[-2:] if dynamic_size else side))
    for key in ("mean", "std"):
        if len(cfg.get(key) or ()) != channels:
            cfg.pop(key, None)
    keys = ("architecture", "input_size", "mean", "std", "crop_pct", "interpolation")
    meta = {
        k: json.dumps(list(v) if isinstance(v, tuple) else v)
        for k in keys
        if (v := cfg.get(k)) is not None
    }
    names, outputs = cfg.get("label_names"), getattr(model, "num_classes", None)
    if not names and outputs == 1000:  # ImageNet's, as predict names them
        from sparseformer.weights.registry import imagenet_class_names

        names = imagenet_class_names()
    if names and (outputs is None or len(names) == outputs):  # 0 outputs: features, unnamed
        meta["class_names"] = json.dumps(list(names))
    if example.dim() == 5:  # a clip: the frames the graph takes, whatever a run trained with
        meta["clip"] = json.dumps({**(cfg.get("clip") or {}), "num_frames": example.shape[2]})
    return meta


def _add_metadata(path: Path, metadata: dict[str, str]) -> None:
    import onnx

    if not metadata:
        return
    proto = onnx.load(str(path))
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))


def _input_channels(model: nn.Module) -> int:
    """The channels ``model`` takes: its first convolution's input channels (3 without one)."""
    convs = (m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd))
    return next((conv.in_channels for conv in convs), 3)


def export_onnx(
    model: nn.Module,
    path: str | os.PathLike,
    img_size: int = 224,
    in_chans: int | None = None,
    opset: int | None = None,
    num_frames: int | None = None,
    dynamic_size: bool = True,
    check: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``model`` (a copy in eval mode, CPU, float32) as ONNX with a dynamic batch
    dimension and, by default, a dynamic height and width; ``model`` itself is left as it was.
    The file's metadata (``metadata_props``, JSON values) records the preprocessing and class
    names of ``model.pretrained_cfg``.

    Args:
        model: takes ``(B, in_chans, img_size, img_size)`` (or ``(B, in_chans, num_frames,
            img_size, img_size)``) and returns ``(B, classes)``.
        path: output file; written to a temporary name, then renamed.
        img_size: the example input's size (the graph's fixed size without ``dynamic_size``).
        in_chans: the input's channels; ``None``: those of the model's first convolution.
        opset: ONNX opset, at least 18 (torch's exporter writes 18 and later; clips need 20)
            and at most the installed ``onnx``'s; ``None``: 18 for images, 20 for clips.
        num_frames: the fixed clip length of a video model (``None``: the model's).
        dynamic_size: any height and width (at least 4 pixels), as the model takes; else
            only ``img_size``.
        check: run on the written graph's file before it replaces ``path`` (one that raises
            leaves ``path`` as it was): the CLI's comparison with PyTorch.

    Returns:
        The written path.
    """
    if num_frames is None and getattr(model, "roi_dims", 2) == 3:  # a video model's own
        num_frames = int(model.config.num_frames)
    opset = (VIDEO_MIN_OPSET if num_frames is not None else 18) if opset is None else opset
    check_export_settings(opset, img_size, num_frames)
    from sparseformer.engine.atomic import output_target, staged

    path = output_target(path)  # a symlink's file; a device (/dev/null) is written into
    path.parent.mkdir(parents=True, exist_ok=True)
    wrapper = _Logits(_cpu_float_copy(model)).eval()
    # Batch 2 as the example, so that the exporter does not specialise a batch of 1.
    frames = () if num_frames is None else (num_frames,)
    if in_chans is None:
        in_chans = _input_channels(model)
    example = torch.zeros(2, in_chans, *frames, img_size, img_size)
    dims = {0: torch.export.Dim("batch", min=1)}
    if dynamic_size:  # the last two axes: height and width, of images and of clips
        dims[example.dim() - 2] = torch.export.Dim("height", min=MIN_SIZE, max=MAX_SIZE)
        dims[example.dim() - 1] = torch.export.Dim("width", min=MIN_SIZE, max=MAX_SIZE)
    # the file is replaced only by a graph that loads: a failed export loses nothing
    with staged(path, ".onnx") as tmp:
        meta = _preprocessing_metadata(model, example, dynamic_size)
        _write(wrapper, example, dims, opset, tmp, meta)  # a full disk: said by staged
        if check is not None:
            check(tmp)
    shape = ["batch", *example.shape[1:]]
    if dynamic_size:
        shape[-2:] = ["height", "width"]
    log.info("wrote %s (opset %d, input %s)", path, opset, tuple(shape))
    return path


def check_export_settings(opset: int, img_size: int, num_frames: int | None) -> None:
    """Refuse, before any work, an opset the exporter cannot write or the installed ``onnx``
    does not know, and an example size the graph cannot take.

    Raises:
        ExportError: naming the bound, or the ``onnx`` package missing (the ``export`` extra).
    """
    for module in ("onnx", "onnxscript"):  # what the command needs, before it does any work
        _require(module)
    import onnx

    newest = onnx.defs.onnx_opset_version()
    if opset < MIN_OPSET or opset > newest:
        raise ExportError(
            f"opset {opset}: torch's exporter writes opset {MIN_OPSET} and later, and the "
            f"installed onnx {onnx.__version__} knows up to {newest}; give one in between"
        )
    if num_frames is not None and opset < VIDEO_MIN_OPSET:
        raise ExportError(
            f"opset {opset} has no 5-D GridSample for video clips; use {VIDEO_MIN_OPSET} or later"
        )
    if not MIN_SIZE <= img_size <= MAX_SIZE:
        raise ExportError(f"img_size {img_size}: give {MIN_SIZE} to {MAX_SIZE} pixels")


def _write(wrapper: nn.Module, example: Tensor, dims: dict, opset: int, tmp: Path, metadata):
    """Export ``wrapper`` to ``tmp`` with ``metadata``, and check that onnxruntime (when
    installed) loads it: the exporter writes some opsets that a runtime refuses (a newer
    opset's ``Attention`` node), after logging that it could not convert the graph."""
    with torch.no_grad(), _quiet_exporter():
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamic_shapes={"images": dims},
            input_names=["images"],
            output_names=["logits"],
            opset_version=opset,
            dynamo=True,
            verbose=False,
        )
    program.save(str(tmp))
    _add_metadata(tmp, metadata)
    try:
        import onnxruntime as ort
    except ImportError:
        return
    try:
        ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's own error types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        first = first.replace(str(tmp), "the file")[:200]  # not the staging file's name
        raise ExportError(
            f"onnxruntime {ort.__version__} cannot load the graph exported at opset {opset} "
            f"({first}); export at a lower opset (18 is the default)"
        ) from None


def onnx_max_difference(path: str | os.PathLike, model: nn.Module, images: Tensor) -> float:
    """Largest absolute difference between onnxruntime's and PyTorch's logits on ``images``
    (onnxruntime with as many threads as torch)."""
    _require("onnxruntime")
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # as PyTorch's side: `--threads`
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    (name,) = [i.name for i in session.get_inputs()]
    onnx_logits = torch.from_numpy(session.run(None, {name: images.float().numpy()})[0])
    model = _cpu_float_copy(model)
    with torch.inference_mode():
        torch_logits = model(images.float())
    return (onnx_logits - torch_logits).abs().max().item()
