"""Video RoIs on the frames of a clip: SparseFormer's 3-D RoIs ``(x1, y1, t1, x2, y2, t2)``.

SparseFormer (Gao et al., ICLR 2024), video variant (Sec. 5): RoIs and sampling points gain a
time coordinate in ``[0, 1]`` over the clip. Each frame gets a panel with the RoIs whose time span
covers it and the points that fall in it. matplotlib is imported inside the functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from sparseformer.models.outputs import SparseFormerOutput
from sparseformer.viz.draw import (
    draw_panel,
    panel_aspect,
    prediction_text,
    render_panel,
    resolve_highlight,
    stage_geometry,
    token_colors,
)

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["plot_video_rois", "video_frame_images", "frame_geometry"]


def plot_video_rois(
    frames: np.ndarray | torch.Tensor,
    output: SparseFormerOutput,
    *,
    index: int = 0,
    stage: int | None = None,
    highlight: int | Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    max_frames: int = 8,
    panel_inches: float = 2.6,
) -> Figure:
    """A video's RoIs ``(x1, y1, t1, x2, y2, t2)`` and points ``(x, y, t)`` on its frames.

    Frame ``f`` of ``T`` covers normalised time ``[f/T, (f+1)/T]``; a RoI is drawn on it when
    ``t1 <= (f + 0.5)/T <= t2`` (its time span covers the frame's centre), and a point when its
    ``t`` falls in the frame's span.

    Args:
        frames: ``(T, H, W, 3)`` uint8/float array or tensor, or a ``(3, T, H, W)`` or
            ``(T, 3, H, W)`` tensor (floats in [0, 1]).
        output: a video model's ``forward_with_details`` (RoIs ``(B, N, 6)``).
        stage: sampling stage ``1..S`` (default the last), ``0`` initial, ``-1`` final RoIs.
        max_frames: at most this many frames, evenly spread, are drawn.
    """
    from matplotlib.figure import Figure

    video = _as_video(frames)
    T, h, w = video.shape[:3]
    if stage is None:
        stage = len(output.sampling_points) or -1
    rois6, points3 = _video_geometry(output, stage, index)
    shown = sorted({round(i) for i in np.linspace(0, T - 1, min(T, max_frames))})
    colors = token_colors(rois6.shape[0])
    highlight_set = resolve_highlight(output, highlight, index)
    cols = min(len(shown), 4)
    rows = math.ceil(len(shown) / cols)
    fig = Figure(
        figsize=(panel_inches * cols, rows * (panel_inches * panel_aspect(h, w) + 0.35) + 0.5)
    )
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, f in zip(axes, shown):
        rois, pts = frame_geometry(rois6, points3, f, T)
        draw_panel(ax, video[f], rois, pts, colors, highlight_set, f"frame {f + 1}/{T}")
    for ax in axes[len(shown) :]:
        ax.set_axis_off()
    label = prediction_text(output.logits[index], class_names)
    fig.suptitle(f"prediction: {label}; {_stage_name(stage)}", fontsize=10, parse_math=False)
    fig.tight_layout(rect=(0, 0, 1, 0.95))
    return fig


def frame_geometry(
    rois6: np.ndarray, points3: np.ndarray | None, frame: int, num_frames: int
) -> tuple[np.ndarray, np.ndarray | None]:
    """The 2-D geometry to draw on one frame.

    Args:
        rois6: ``(N, 6)`` RoIs ``x1, y1, t1, x2, y2, t2``.
        points3: ``(N, P, 3)`` points ``x, y, t``, or ``None``.
        frame: frame index ``f`` in ``0..T-1``, covering time ``[f/T, (f+1)/T)``.

    Returns:
        ``(rois (N, 4), points (N, P, 2) or None)``; RoIs whose time span misses the frame's
        centre and points outside its span are NaN (not drawn), so token indices are kept.
    """
    lo, hi = np.minimum(rois6[:, :3], rois6[:, 3:]), np.maximum(rois6[:, :3], rois6[:, 3:])
    centre = (frame + 0.5) / num_frames
    live = (lo[:, 2] <= centre) & (centre <= hi[:, 2])  # (N,) tokens whose span covers it
    rois = np.concatenate([lo[:, :2], hi[:, :2]], axis=1)  # (N, 6) -> (N, 4) x1 y1 x2 y2
    rois[~live] = np.nan
    if points3 is None:
        return rois, None
    in_frame = np.floor(points3[..., 2] * num_frames) == frame  # (N, P)
    return rois, np.where(in_frame[..., None], points3[..., :2], np.nan)  # (N, P, 2)


def video_frame_images(
    frames,
    output: SparseFormerOutput,
    *,
    index: int = 0,
    stage: int | None = None,
    highlight: int | Sequence[int] | None = None,
    class_names: Sequence[str] | None = None,
    inches: float = 4.0,
    dpi: int = 100,
) -> list:
    """One rendered PIL image per frame (for an animated GIF), as in :func:`plot_video_rois`."""
    video = _as_video(frames)
    T = video.shape[0]
    if stage is None:
        stage = len(output.sampling_points) or -1
    rois6, points3 = _video_geometry(output, stage, index)
    colors = token_colors(rois6.shape[0])
    highlight_set = resolve_highlight(output, highlight, index)
    label = prediction_text(output.logits[index], class_names)
    suptitle = f"prediction: {label}; {_stage_name(stage)}"
    images = []
    for f in range(T):
        rois, pts = frame_geometry(rois6, points3, f, T)
        title = f"frame {f + 1}/{T}"
        images.append(
            render_panel(
                video[f],
                rois,
                pts,
                colors,
                highlight_set,
                title,
                suptitle,
                inches=inches,
                dpi=dpi,
                fontsize=9,
            )  # fmt: skip
        )
    return images


def _stage_name(stage: int) -> str:
    return {0: "initial RoIs", -1: "final RoIs"}.get(stage, f"stage {stage}")


def _as_video(frames) -> np.ndarray:
    """``(T, H, W, 3)`` numpy from a tensor ``(3, T, H, W)`` / ``(T, 3, H, W)`` /
    ``(T, H, W, 3)`` or an array."""
    if torch.is_tensor(frames):
        frames = frames.detach().cpu()
        if frames.dim() == 4 and frames.shape[:2] == (3, 3) and frames.shape[-1] != 3:
            raise ValueError(
                f"video frames of shape {tuple(frames.shape)} may be (3, T, H, W) or (T, 3, H, W) "
                "with T = 3; give them as (T, H, W, 3) (frames.permute(0, 2, 3, 1) for "
                "torchvision's (T, 3, H, W))"
            )
        if frames.dim() == 4 and frames.shape[0] == 3 and frames.shape[-1] != 3:
            frames = frames.permute(1, 2, 3, 0)  # (3, T, H, W) -> (T, H, W, 3)
        elif frames.dim() == 4 and frames.shape[1] == 3 and frames.shape[-1] != 3:
            frames = frames.permute(0, 2, 3, 1)  # (T, 3, H, W), torchvision's -> (T, H, W, 3)
        frames = (
            frames.numpy() if frames.dtype == torch.uint8 else frames.float().clamp(0, 1).numpy()
        )
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3:
        raise ValueError(
            f"expected video frames (T, H, W, 3) (or a tensor (3, T, H, W) or (T, 3, H, W)), "
            f"got shape {frames.shape}"
        )
    return frames


def _video_geometry(
    output: SparseFormerOutput, stage: int, index: int
) -> tuple[np.ndarray, np.ndarray | None]:
    rois, points = stage_geometry(output, stage, index)
    if rois.shape[-1] != 6:
        raise ValueError(f"video RoIs have 6 coordinates, got {rois.shape[-1]}; use plot_rois")
    return rois, points
