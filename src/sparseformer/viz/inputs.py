"""Inputs of the RoI pictures: images from disk, their preprocessing, a model with its labels,
and the model run on them.

SparseFormer (Gao et al., ICLR 2024). Any image PIL can read is accepted: grayscale, palette,
RGBA (composited over white), CMYK and 16-bit images are converted to 8-bit RGB, and EXIF
orientation is applied (the same conversion as training's,
:func:`sparseformer.data.images.to_rgb`). The model sees the whole image squashed to
``size x size`` (no crop), so normalised RoI coordinates map onto the whole picture, whatever
its aspect ratio.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from sparseformer.models.outputs import NON_FINITE_OUTPUTS, NonFiniteOutputError, SparseFormerOutput
from sparseformer.weights.registry import IMAGENET_MEAN, IMAGENET_STD, imagenet_class_names

__all__ = [
    "ModelInfo",
    "load_image",
    "preprocess",
    "display_image",
    "load_model_for_viz",
    "run_details",
]

logger = logging.getLogger(__name__)


@dataclass
class ModelInfo:
    """What a picture needs besides the model: preprocessing and label names.

    Attributes:
        input_size: square side the model is run at.
        mean, std: per-channel normalisation of ``[0, 1]`` RGB.
        class_names: names of the classifier's outputs, or ``None`` (indices are shown).
        interpolation: resampling of the resize to ``input_size`` (as in training's eval).
        clip: a video model's clip sampling from its training checkpoint (``num_frames``,
            ``stride``, ``sampling``), or ``None`` (the model's frames, uniform).
    """

    input_size: int = 224
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD
    class_names: list[str] | None = field(default=None)
    interpolation: str = "bicubic"
    clip: dict[str, Any] | None = None


def load_image(path: str | os.PathLike, *, max_side: int | None = None):
    """Read an image file as an 8-bit RGB PIL image.

    Args:
        path: any format PIL reads.
        max_side: when set, large images are decoded (JPEG draft mode) and downscaled so that
            neither side exceeds it much; saves time and memory on huge photos.

    Returns:
        A ``PIL.Image.Image`` in mode ``"RGB"``.

    Raises:
        FileNotFoundError: the path does not exist or is a directory.
        ValueError: the file is not an image PIL can decode (the message opens with the path,
            ``PATH: why``, as the video readers' do).
    """
    from PIL import Image, UnidentifiedImageError

    from sparseformer.data.images import is_empty_file, open_rgb  # training's reader

    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    if path.is_dir():
        raise FileNotFoundError(f"{str(path)!r} is a directory, not an image file")
    try:
        return open_rgb(path, max_side=max_side)
    except UnidentifiedImageError as exc:
        if is_empty_file(path):  # open_rgb's message says so, with the path
            raise ValueError(str(exc)) from None
        raise ValueError(
            f"{path}: not a readable image (PIL cannot identify its format); "
            "pass a JPEG, PNG, BMP, TIFF, WebP or GIF file"
        ) from exc
    except Image.DecompressionBombError as exc:
        raise ValueError(f"{path}: {exc}") from exc
    except (OSError, SyntaxError) as exc:  # truncated or corrupt data
        raise ValueError(f"{path}: could not be decoded ({exc}); is it complete?") from exc


def preprocess(
    img,
    size: int,
    mean: Sequence[float] = IMAGENET_MEAN,
    std: Sequence[float] = IMAGENET_STD,
    interpolation: str = "bicubic",
) -> Tensor:
    """Resize an RGB PIL image to ``size x size`` (whole image, no crop) and normalise.

    Args:
        interpolation: ``"bicubic"``, ``"bilinear"``, ``"nearest"``, ``"lanczos"``, ...

    Returns:
        ``(1, 3, size, size)`` float32 batch.
    """
    from PIL import Image

    try:
        method = Image.Resampling[interpolation.upper()]
    except KeyError:
        raise ValueError(
            f"unknown interpolation {interpolation!r}; use bicubic or bilinear"
        ) from None
    resized = img.resize((size, size), method, reducing_gap=3.0)
    x = torch.from_numpy(np.asarray(resized, dtype=np.float32) / 255.0)  # (H, W, 3)
    x = x.permute(2, 0, 1)  # (H, W, 3) -> (3, H, W)
    mean_t = torch.tensor(mean, dtype=torch.float32).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(3, 1, 1)
    return ((x - mean_t) / std_t).unsqueeze(0)  # (3, H, W) -> (1, 3, H, W)


def display_image(img, max_side: int = 448, min_side: int = 112) -> np.ndarray:
    """The picture to draw on: aspect kept, long side at most ``max_side`` pixels.

    Tiny images are enlarged (nearest) so the short side is at least ``min_side``. Returns
    ``(H, W, 3)`` uint8.
    """
    from PIL import Image

    w, h = img.size
    scale = min(max_side / max(w, h), 1.0)
    if min(w, h) * scale < min_side:
        scale = min(min_side / min(w, h), max_side / max(w, h)) if max(w, h) > 0 else 1.0
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size != (w, h):
        method = Image.Resampling.LANCZOS if scale < 1 else Image.Resampling.NEAREST
        img = img.resize(size, method)
    return np.asarray(img.convert("RGB"))


def load_model_for_viz(
    name: str | None, checkpoint: str | os.PathLike | None = None, prefer_ema: bool = False
) -> tuple[nn.Module, ModelInfo]:
    """Build a model (with weights from ``checkpoint`` when given) in eval mode, with its info.

    The model is built as the checkpoint was trained (see
    :func:`sparseformer.weights.build.model_from_checkpoint`), so a model fine-tuned on 10
    classes keeps its own classifier. Preprocessing and label names: the checkpoint's where it
    records them, else the released weights'; ImageNet's names for 1000 classes, else none.

    Args:
        name: a registered model name; ``None`` takes the name a ``sparseformer train``
            checkpoint stores (``model_name``).
        checkpoint: a weights file (ours or either official layout).
        prefer_ema: the checkpoint's EMA weights, where it has them.

    Raises:
        ValueError: no name given and none stored, or a checkpoint trained as another model.
    """
    from sparseformer.weights.build import model_from_checkpoint
    from sparseformer.weights.checkpoint import check_model, read_checkpoint
    from sparseformer.weights.factory import create_model, released_weights

    if checkpoint is None:
        if name is None:
            raise ValueError("which model? pass --model NAME (see `sparseformer models`)")
        model, ckpt = create_model(name).eval(), None
    else:
        ckpt = read_checkpoint(checkpoint, prefer_ema=prefer_ema)
        reason = (
            "which has no RoIs to draw; viz draws SparseFormer models (see `sparseformer models`)"
        )
        name = check_model(ckpt, name, sparseformers_only=reason)
        model, ckpt = model_from_checkpoint(name, ckpt)
    w = released_weights(name)
    info = ModelInfo(w.input_size[-1], w.mean, w.std, None, w.interpolation) if w else ModelInfo()
    if ckpt is not None:
        pre = ckpt.preprocessing
        info = ModelInfo(
            pre.get("img_size", info.input_size),
            pre.get("mean", info.mean),
            pre.get("std", info.std),
            list(ckpt.class_names) if ckpt.class_names is not None else None,
            pre.get("interpolation", info.interpolation),
        )
        if ckpt.video is not None:
            keys = ("num_frames", "stride", "sampling")
            info.clip = {k: ckpt.video[k] for k in keys if k in ckpt.video}
    num_classes = getattr(model, "num_classes", 0)
    if info.class_names is not None and len(info.class_names) != num_classes:
        logger.warning(
            "checkpoint stores %d class names for %d outputs; showing indices",
            len(info.class_names),
            num_classes,
        )
        info.class_names = None
    if info.class_names is None and num_classes == 1000 and ckpt is not None:
        info.class_names = imagenet_class_names(short=True)  # random weights: no class names
    return model, info


def run_details(model: nn.Module, x: Tensor) -> SparseFormerOutput:
    """``model.forward_with_details(x)`` in eval mode and inference mode, on the model's device
    and in its floating-point type (a bf16 or fp16 model takes images in its own).

    The model's training flag is restored afterwards.

    Raises:
        NonFiniteOutputError: the logits or RoIs are NaN or infinite (weights of a run that
            diverged): there is nothing true to draw, and the statistics would not be JSON.
    """
    param = next(model.parameters(), None)
    if param is not None:
        floating = param.is_floating_point() and x.is_floating_point()
        x = x.to(param.device, param.dtype if floating else None)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            output = model.forward_with_details(x)
    finally:
        model.train(was_training)
    if not output.is_finite():
        raise NonFiniteOutputError(NON_FINITE_OUTPUTS)
    return output
