"""Draw where SparseFormer's latent tokens look: RoIs and sampling points over the image.

SparseFormer (Gao et al., ICLR 2024), Fig. 1 and the RoI figures of the paper: every latent
token has a box and a few sampling points; stage by stage the boxes move onto the object. These
functions draw that from :meth:`SparseFormer.forward_with_details`, one panel per sampling stage
(and, for video, one panel per frame). They return matplotlib figures, so they work in
notebooks; matplotlib is imported inside them, so importing this module stays cheap.

The drawing primitives live in :mod:`sparseformer.viz.draw`, video frames in
:mod:`sparseformer.viz.video`, image loading in :mod:`sparseformer.viz.inputs` and the RoI
statistics in :mod:`sparseformer.models.roi_stats`; this module re-exports their public names.
"""

from __future__ import annotations

import io
import json
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from sparseformer.engine.atomic import write_atomic, write_text_atomic
from sparseformer.models.outputs import SparseFormerOutput
from sparseformer.models.roi_stats import roi_iou_matrix, roi_statistics, sampling_roi_indices
from sparseformer.viz.draw import (
    as_image,
    draw_panel,
    format_statistics,
    panel_aspect,
    prediction_text,
    render_panel,
    resolve_highlight,
    resolve_stages,
    select_sample,
    stage_geometry,
    stage_title,
    token_colors,
    top_tokens,
)
from sparseformer.viz.glyphs import missing_glyphs_said
from sparseformer.viz.inputs import ModelInfo, display_image, load_image, preprocess, run_details
from sparseformer.viz.video import plot_video_rois, video_frame_images
from sparseformer.weights.registry import IMAGENET_MEAN, IMAGENET_STD

if TYPE_CHECKING:
    import numpy as np
    from matplotlib.figure import Figure
    from PIL import Image

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
    "run_details",
    "Pictures",
    "write_pictures",
    "write_video_pictures",
    "name_ends",
]

logger = logging.getLogger(__name__)


def plot_rois(
    image: Image.Image | np.ndarray | Tensor,
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
    colors = token_colors(output.latent_tokens.shape[1])
    h, w = img.shape[:2]
    n = len(stage_list)
    stats = format_statistics(roi_statistics(select_sample(output, index))) if show_stats else ""
    # wide enough for the statistics' longest line (8 pt monospace: about 0.6 em a character)
    text_inches = max(map(len, stats.splitlines()), default=0) * 8 * 0.62 / 72 + 0.6
    width = max(panel_inches * n, text_inches)
    fig = Figure(figsize=(width, panel_inches * panel_aspect(h, w) + (1.2 if show_stats else 0.6)))
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, stage in zip(axes, stage_list):
        rois, points = stage_geometry(output, stage, index)
        draw_panel(ax, img, rois, points, colors, highlight_set, stage_title(output, stage, rois))
    head = title or f"prediction: {prediction_text(output.logits[index], class_names)}"
    fig.suptitle(head, fontsize=11, parse_math=False)  # a class name's $ is a dollar
    if show_stats:
        fig.text(
            0.5,
            0.01,
            stats,
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
    img = as_image(image)
    highlight_set = resolve_highlight(output, highlight, index)
    colors = token_colors(output.latent_tokens.shape[1])
    label = f"prediction: {prediction_text(output.logits[index], class_names)}"
    frames = []
    for stage in resolve_stages(output, stages):
        rois, points = stage_geometry(output, stage, index)
        title = stage_title(output, stage, rois)
        frames.append(
            render_panel(
                img, rois, points, colors, highlight_set, title, label, inches=inches, dpi=dpi
            )
        )
    return frames


# ----------------------------------------------------------------------------- files
def save_figure(fig: Figure, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Write a figure atomically (:func:`~sparseformer.engine.atomic.write_atomic`), in the
    format its suffix names (PNG without one). Returns the path."""
    path = Path(path)
    drawn = io.BytesIO()  # a file to seek in: matplotlib's PDF, SVG, EPS and TIFF writers want one
    fig.savefig(drawn, dpi=dpi, format=path.suffix.lstrip(".") or "png")
    write_atomic(path, lambda f: f.write(drawn.getvalue()))
    return path


def save_gif(frames: Sequence, path: str | os.PathLike, duration_ms: int = 800) -> Path:
    """Write PIL frames as a looping animated GIF, atomically. Returns the path."""
    if not frames:
        raise ValueError("no frames to write")
    path = Path(path)
    first, *rest = [f.convert("RGB") for f in frames]
    write_atomic(
        path,
        lambda f: first.save(
            f, format="GIF", save_all=True, append_images=rest, duration=duration_ms, loop=0
        ),
    )
    return path


def visualize(
    model: nn.Module,
    image: str | os.PathLike | Image.Image,
    *,
    img_size: int | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    class_names: Sequence[str] | None = None,
    **plot_kwargs: Any,
) -> Figure:
    """Run ``model`` on an image and draw its RoIs and points (for notebooks).

    The defaults are the model's ``pretrained_cfg``, which ``create_model(checkpoint_path=)``
    sets to a run's own preprocessing and class names.

    Args:
        model: an image SparseFormer (anything with ``forward_with_details``).
        image: path of any image PIL reads, or a PIL image.
        img_size: side the image is resized to (default: the ``pretrained_cfg`` input size,
            else 224).
        mean: normalisation mean (default: the ``pretrained_cfg``'s, else ImageNet's).
        std: normalisation standard deviation (likewise).
        class_names: names for the predicted label (default: the ``pretrained_cfg``'s
            ``label_names``, else indices).
        **plot_kwargs: passed to :func:`plot_rois` (``stages``, ``highlight``, ...).

    Raises:
        NonFiniteOutputError: the model's outputs are NaN or infinite (its weights are).
    """
    if getattr(model, "roi_dims", 2) == 3:
        raise ValueError(
            f"{type(model).__name__} is a video model, which visualize() cannot run on one "
            "image: draw its clips with sparseformer.viz.figures.plot_video_rois, or with "
            "`sparseformer viz`"
        )
    from PIL import Image as PILImage

    from sparseformer.data.images import to_rgb, upright

    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = img_size or int(cfg.get("input_size", (3, 224, 224))[-1])
    if isinstance(image, PILImage.Image):  # read as a file is: upright, 8-bit RGB
        img = to_rgb(upright(image))
    else:
        img = load_image(image, max_side=4 * size)
    mean, std = mean or cfg.get("mean") or IMAGENET_MEAN, std or cfg.get("std") or IMAGENET_STD
    x = preprocess(img, size, mean, std, cfg.get("interpolation") or "bicubic")
    output = run_details(model, x)
    names = class_names or cfg.get("label_names")
    return plot_rois(display_image(img), output, class_names=names, **plot_kwargs)


@dataclass
class Pictures:
    """What :func:`write_pictures` produced for one input.

    Attributes:
        label: the predicted label with its probability.
        stats: :func:`roi_statistics` of the input.
        files: the files written (PNG, GIF, JSON statistics).
    """

    label: str
    stats: dict[str, float]
    files: list[Path] = field(default_factory=list)


def write_pictures(
    model: nn.Module,
    image: Image.Image,
    out_dir: str | os.PathLike,
    stem: str,
    *,
    info: ModelInfo | None = None,
    stages: Sequence[int] | None = None,
    highlight: int | Sequence[int] | None = None,
    gif: bool = True,
) -> Pictures:
    """Run an image model on one RGB image and write its pictures and statistics.

    Writes ``{stem}_rois.png`` (stages side by side), ``{stem}_stages.gif`` (unless
    ``gif=False``) and ``{stem}_roi_stats.json`` into ``out_dir``.

    Args:
        model: an image SparseFormer.
        image: an RGB PIL image (see :func:`~sparseformer.viz.inputs.load_image`).
        info: input size, mean/std and class names (default: 224, ImageNet, indices).
        stages: as for :func:`plot_rois`.
        highlight: as for :func:`plot_rois`.

    Raises:
        ValueError: a stage the model does not have.
        NonFiniteOutputError: the model's outputs are NaN or infinite (nothing is written).
    """
    info = info or ModelInfo()
    x = preprocess(image, info.input_size, info.mean, info.std, info.interpolation)
    output = run_details(model, x)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    shown = display_image(image)
    kwargs = {"stages": stages, "highlight": highlight, "class_names": info.class_names}
    result = Pictures(prediction_text(output.logits[0], info.class_names), roi_statistics(output))
    with missing_glyphs_said(out_dir / f"{stem}_rois.png"):  # class names in the titles
        fig = plot_rois(shown, output, **kwargs)
        result.files.append(save_figure(fig, out_dir / f"{stem}_rois.png"))
        if gif:
            frames = stage_frames(shown, output, **kwargs)
            result.files.append(save_gif(frames, out_dir / f"{stem}_stages.gif"))
    result.files.append(_save_json(result.stats, out_dir / f"{stem}_roi_stats.json"))
    return result


def write_video_pictures(
    model: nn.Module,
    frames: Tensor,
    out_dir: str | os.PathLike,
    stem: str,
    *,
    info: ModelInfo | None = None,
    stages: Sequence[int] | None = None,
    highlight: int | Sequence[int] | None = None,
    gif: bool = True,
) -> Pictures:
    """Run a video model on one clip and write its RoIs on every frame.

    Writes ``{stem}_frames.png`` for the last sampling stage (``{stem}_stage{k}_frames.png``
    for each of ``stages`` when given, ``{stem}_final_frames.png`` for ``-1``, the final
    RoIs), ``{stem}_frames.gif`` (one GIF frame per clip frame)
    and ``{stem}_roi_stats.json``.

    Args:
        frames: ``(T, H, W, 3)`` uint8 frames, the clip the model sees.
    """
    import torch.nn.functional as F

    info = info or ModelInfo()
    clip = frames.permute(0, 3, 1, 2).float() / 255  # (T, H, W, 3) -> (T, 3, H, W)
    size = (info.input_size, info.input_size)
    x = F.interpolate(clip, size=size, mode="bilinear", antialias=True, align_corners=False)
    mean = torch.tensor(info.mean).view(1, 3, 1, 1)
    std = torch.tensor(info.std).view(1, 3, 1, 1)
    x = ((x - mean) / std).permute(1, 0, 2, 3).unsqueeze(0)  # (T, 3, S, S) -> (1, 3, T, S, S)
    output = run_details(model, x)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    H, W = clip.shape[-2:]
    scale = min(1.0, 320 / max(H, W))
    shown = F.interpolate(
        clip, size=(max(1, round(H * scale)), max(1, round(W * scale))), mode="area"
    ).permute(0, 2, 3, 1)  # (T, 3, h, w) -> (T, h, w, 3)
    result = Pictures(prediction_text(output.logits[0], info.class_names), roi_statistics(output))
    kwargs = {"highlight": highlight, "class_names": info.class_names}
    first = out_dir / f"{stem}_{_stage_label((stages or [None])[0])}frames.png"
    with missing_glyphs_said(first):  # class names in the titles
        for stage in stages or [None]:
            name = f"{stem}_{_stage_label(stage)}frames.png"
            fig = plot_video_rois(shown, output, stage=stage, **kwargs)
            result.files.append(save_figure(fig, out_dir / name))
        if gif:
            last = stages[-1] if stages else None
            images = video_frame_images(shown, output, stage=last, **kwargs)
            gif_path = out_dir / f"{stem}_frames.gif"
            result.files.append(save_gif(images, gif_path, duration_ms=400))
    result.files.append(_save_json(result.stats, out_dir / f"{stem}_roi_stats.json"))
    return result


def name_ends(video: bool, stages: Sequence[int] | None = None) -> list[str]:
    """What :func:`write_pictures` (``video``: :func:`write_video_pictures`) puts after the
    stem in the names of the files it writes with ``stages``."""
    if not video:
        return ["_rois.png", "_stages.gif", "_roi_stats.json"]
    pictures = [f"_{_stage_label(stage)}frames.png" for stage in stages or [None]]
    return [*pictures, "_frames.gif", "_roi_stats.json"]


def _stage_label(stage: int | None) -> str:
    """A video figure's file-name part: ``stage2_``, ``stage0_`` (initial RoIs), ``final_``
    (``-1``), or nothing for the default (the last stage)."""
    return "" if stage is None else "final_" if stage == -1 else f"stage{stage}_"


def _save_json(obj: dict, path: Path) -> Path:
    write_text_atomic(path, json.dumps(obj, indent=1) + "\n")
    return path
