"""Draw where SparseFormer's latent tokens look: RoIs and sampling points over the image.

SparseFormer (Gao et al., ICLR 2024), Fig. 1 and the RoI figures of the paper: every latent
token has a box and a few sampling points; stage by stage the boxes move onto the object. These
functions draw that from :meth:`SparseFormer.forward_with_details`, one panel per sampling stage
(and, for video, one panel per frame). They return matplotlib figures, so they work in
notebooks; matplotlib is imported inside them, so importing this module stays cheap.

The drawing primitives live in :mod:`sparseformer.viz_draw`, video frames in
:mod:`sparseformer.viz_video`, image loading in :mod:`sparseformer.viz_inputs` and the RoI
statistics in :mod:`sparseformer.roi_stats`; this module re-exports their public names.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

from sparseformer.models.outputs import SparseFormerOutput
from sparseformer.roi_stats import roi_iou_matrix, roi_statistics, sampling_roi_indices
from sparseformer.viz_draw import (
    as_image,
    draw_panel,
    format_statistics,
    prediction_text,
    resolve_highlight,
    resolve_stages,
    select_sample,
    stage_geometry,
    stage_title,
    token_colors,
    top_tokens,
)
from sparseformer.viz_inputs import display_image, load_image, preprocess
from sparseformer.viz_video import plot_video_rois, video_frame_images

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "roi_statistics",
    "roi_iou_matrix",
    "sampling_roi_indices",
    "select_sample",
    "stage_geometry",
    "top_tokens",
    "prediction_text",
    "format_statistics",
    "plot_rois",
    "stage_frames",
    "plot_video_rois",
    "video_frame_images",
    "save_figure",
    "save_gif",
    "visualize",
]

logger = logging.getLogger(__name__)


def plot_rois(
    image,
    output: SparseFormerOutput,
    *,
    index: int = 0,
    stages: Sequence[int] | None = None,
    highlight: int | Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    title: str | None = None,
    show_stats: bool = True,
    panel_inches: float = 3.2,
) -> Figure:
    """RoIs and sampling points after each sampling stage, side by side.

    Args:
        image: the picture to draw on (PIL image, ``(H, W, 3)`` array, or ``(3, H, W)``
            tensor in [0, 1]); any size and aspect: coordinates are normalised.
        output: ``model.forward_with_details(x)`` for a batch containing the image.
        index: which sample of the batch.
        stages: stage numbers ``1..S`` (``0`` initial RoIs, ``-1`` final RoIs); default all
            sampling stages.
        highlight: ``k`` to emphasise the ``k`` tokens with the largest final norm, or token
            indices; others are drawn faint.
        class_names: names for the predicted label (indices otherwise).
        title: first line of the figure title (default: the prediction).
        show_stats: print this sample's RoI statistics under the panels.

    Returns:
        A matplotlib ``Figure`` (not attached to pyplot; display or ``savefig`` it).
    """
    from matplotlib.figure import Figure

    if output.rois and output.rois[0].shape[-1] != 4:
        raise ValueError("plot_rois draws image RoIs (B, N, 4); use plot_video_rois for video")
    img = as_image(image)
    stage_list = resolve_stages(output, stages)
    highlight_set = resolve_highlight(output, highlight, index)
    colors = token_colors(output.tokens.shape[1])
    h, w = img.shape[:2]
    n = len(stage_list)
    fig = Figure(figsize=(panel_inches * n, panel_inches * h / w + (1.2 if show_stats else 0.6)))
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, stage in zip(axes, stage_list):
        rois, points = stage_geometry(output, stage, index)
        draw_panel(ax, img, rois, points, colors, highlight_set, stage_title(output, stage, rois))
    head = title or f"prediction: {prediction_text(output.logits[index], class_names)}"
    fig.suptitle(head, fontsize=11)
    if show_stats:
        fig.text(
            0.5,
            0.01,
            format_statistics(roi_statistics(select_sample(output, index))),
            ha="center",
            va="bottom",
            fontsize=8,
            family="monospace",
        )
    fig.tight_layout(rect=(0, 0.1 if show_stats else 0, 1, 0.95))
    return fig


def stage_frames(
    image,
    output: SparseFormerOutput,
    *,
    index: int = 0,
    stages: Sequence[int] | None = None,
    highlight: int | Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    inches: float = 4.0,
    dpi: int = 100,
) -> list:
    """One rendered PIL image per stage (for an animated GIF), same layout as :func:`plot_rois`."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    img = as_image(image)
    highlight_set = resolve_highlight(output, highlight, index)
    colors = token_colors(output.tokens.shape[1])
    label = prediction_text(output.logits[index], class_names)
    h, w = img.shape[:2]
    frames = []
    for stage in resolve_stages(output, stages):
        fig = Figure(figsize=(inches, inches * h / w + 0.5), dpi=dpi)
        canvas = FigureCanvasAgg(fig)
        ax = fig.subplots()
        rois, points = stage_geometry(output, stage, index)
        draw_panel(ax, img, rois, points, colors, highlight_set, stage_title(output, stage, rois))
        fig.suptitle(f"prediction: {label}", fontsize=10)
        fig.tight_layout()
        canvas.draw()
        frames.append(Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy()))
    return frames


# ----------------------------------------------------------------------------- files
def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write a figure atomically (temporary file, then rename). Returns the path."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    fig.savefig(tmp, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    os.replace(tmp, path)
    return path


def save_gif(frames: Sequence, path: str | os.PathLike, duration_ms: int = 800) -> Path:
    """Write PIL frames as a looping animated GIF, atomically. Returns the path."""
    if not frames:
        raise ValueError("no frames to write")
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    first, *rest = [f.convert("RGB") for f in frames]
    first.save(tmp, format="GIF", save_all=True, append_images=rest, duration=duration_ms, loop=0)
    os.replace(tmp, path)
    return path


def visualize(
    model: nn.Module,
    image: str | os.PathLike,
    *,
    img_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    **plot_kwargs,
) -> Figure:
    """Run ``model`` on an image file and draw its RoIs and points (for notebooks).

    Args:
        model: an image SparseFormer (anything with ``forward_with_details``).
        image: path of any image PIL reads.
        img_size: side the image is resized to (default: the model's ``pretrained_cfg``
            input size, else 224).
        mean, std: normalisation (default ImageNet's).
        **plot_kwargs: passed to :func:`plot_rois` (``stages``, ``highlight``, ...).
    """
    from sparseformer.registry import IMAGENET_MEAN, IMAGENET_STD

    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = img_size or int(cfg.get("input_size", (3, 224, 224))[-1])
    img = load_image(image, max_side=4 * size)
    x = preprocess(img, size, mean or IMAGENET_MEAN, std or IMAGENET_STD)
    param = next(model.parameters(), None)
    if param is not None:
        x = x.to(param.device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            output = model.forward_with_details(x)
    finally:
        model.train(was_training)
    return plot_rois(display_image(img), output, class_names=class_names, **plot_kwargs)
