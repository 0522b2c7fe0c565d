"""Drawing primitives of the RoI pictures: one image panel with its RoIs and sampling points.

SparseFormer (Gao et al., ICLR 2024). Shared by :mod:`sparseformer.viz.figures` (image panels,
stage animations) and :mod:`sparseformer.viz.video` (video frames). Geometry is drawn in data
coordinates equal to the displayed image's pixels: a normalised point ``(x, y)`` lands at
``(x * W, y * H)`` on an image shown with ``extent=(0, W, H, 0)``, so 0 and 1 are the outer edges
of the first and last pixels, as for ``grid_sample(align_corners=False)``. Artists carry ids
for programmatic checks: ``"roi:{token}"`` (Rectangle patches), ``"points"`` (one scatter per
panel, tokens in order, points in order within a token) and ``"image-border"``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from sparseformer.data.scan import display_name
from sparseformer.models.outputs import SparseFormerOutput
from sparseformer.models.roi_stats import sampling_roi_indices

if TYPE_CHECKING:
    from matplotlib.axes import Axes

__all__ = [
    "select_sample",
    "stage_geometry",
    "top_tokens",
    "prediction_text",
    "format_statistics",
    "token_colors",
    "as_image",
    "draw_panel",
    "panel_aspect",
    "render_panel",
    "resolve_stages",
    "resolve_highlight",
    "stage_title",
]


# ----------------------------------------------------------------------------- selecting data
def select_sample(output: SparseFormerOutput, index: int) -> SparseFormerOutput:
    """The output of one sample of the batch (batch size 1); ``index`` counts from the end
    when negative, as in Python.

    Raises:
        IndexError: no such sample.
    """
    batch = output.logits.shape[0]
    if not -batch <= index < batch:
        raise IndexError(f"sample index {index} is out of range for a batch of {batch}")
    index %= batch
    pick = slice(index, index + 1)
    return SparseFormerOutput(
        logits=output.logits[pick],
        tokens=output.tokens[pick],
        rois=[r[pick] for r in output.rois],
        sampling_points=[p[pick] for p in output.sampling_points],
        initial_rois=None if output.initial_rois is None else output.initial_rois[pick],
        num_prefix_tokens=output.num_prefix_tokens,
    )


def stage_geometry(
    output: SparseFormerOutput, stage: int, index: int = 0
) -> tuple[np.ndarray, np.ndarray | None]:
    """RoIs and points of one sampling stage of one sample, as float64 arrays.

    Args:
        stage: ``1..S`` for the RoIs each sampling step used with its points, ``0`` for the
            initial RoIs (no points), ``-1`` for the final RoIs (no points).

    Returns:
        ``(rois (N, 2D), points (N, P, D) or None)`` in normalised coordinates.
    """
    num_steps = len(output.sampling_points)
    if stage == 0:
        if output.initial_rois is None:
            raise ValueError("this output has no initial RoIs")
        return _np(output.initial_rois[index]), None
    if stage == -1:
        return _np(output.rois[-1][index]), None
    if not 1 <= stage <= num_steps:
        raise ValueError(
            f"stage {stage} does not exist: this model has sampling stages 1..{num_steps} "
            "(0: initial RoIs, -1: final RoIs)"
        )
    j = sampling_roi_indices(output)[stage - 1]
    return _np(output.rois[j][index]), _np(output.sampling_points[stage - 1][index])


def _np(t: Tensor) -> np.ndarray:
    return t.detach().float().cpu().numpy().astype(np.float64)


def top_tokens(output: SparseFormerOutput, k: int, index: int = 0) -> list[int]:
    """The ``k`` latent tokens with the largest final embedding norm, largest first."""
    norms = output.latent_tokens[index].detach().float().norm(dim=-1)  # (N, D) -> (N,)
    return norms.argsort(descending=True)[:k].tolist()


def prediction_text(logits: Tensor, class_names: Sequence[str] | None = None) -> str:
    """``"name (p%)"`` of the top class of one sample's ``(C,)`` logits."""
    if logits.numel() == 0:
        return "no classifier"
    probs = logits.detach().float().softmax(-1)
    k = int(probs.argmax())
    name = class_names[k] if class_names is not None and k < len(class_names) else f"class {k}"
    return f"{display_name(name)} ({100 * probs[k].item():.1f}%)"


def format_statistics(stats: dict[str, float]) -> str:
    """A two-line human summary of :func:`roi_statistics` output."""
    stages = sorted(
        (int(k[len("roi/area_stage") :]), v) for k, v in stats.items() if "area_stage" in k
    )
    areas = " -> ".join(f"{v:.3f}" for _, v in stages)
    line1 = f"mean RoI area per stage: {areas}" + (
        f" (initial {stats['roi/area_init']:.3f})" if "roi/area_init" in stats else ""
    )
    line2 = (
        f"RoIs partly outside: {100 * stats['roi/outside_final']:.0f}%, "
        f"points outside: {100 * stats.get('roi/points_outside', 0.0):.0f}%, "
        f"centre spread {stats['roi/center_std_final']:.3f}"
        + (
            f" (initial {stats['roi/center_std_init']:.3f})"
            if "roi/center_std_init" in stats
            else ""
        )
        + f", mean pairwise IoU {stats['roi/iou_mean_final']:.2f}"
    )
    return f"{line1}\n{line2}"


# ----------------------------------------------------------------------------- drawing
def token_colors(num_tokens: int) -> np.ndarray:
    """One distinct RGBA colour per token; golden-ratio hues so grid neighbours differ."""
    from matplotlib import colormaps

    hues = (np.arange(num_tokens) * 0.6180339887) % 1.0
    return colormaps["hsv"](hues)


def as_image(image) -> np.ndarray:
    """PIL image, ``(H, W, 3)`` array or ``(3, H, W)`` tensor -> ``(H, W, 3)`` array.

    Float tensors are taken as [0, 1] (clipped); uint8 tensors as 0..255.
    """
    if torch.is_tensor(image):
        image = image.detach().cpu()
        if image.dim() == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
            image = image.permute(1, 2, 0)  # (3, H, W) -> (H, W, 3)
        if image.dtype != torch.uint8:
            image = image.float().clamp(0, 1)
        image = image.numpy()
        if image.ndim == 3 and image.shape[-1] == 1:
            image = image[..., 0]  # (H, W, 1) -> (H, W)
    elif not isinstance(image, np.ndarray):
        image = np.asarray(image.convert("RGB"))
    if image.ndim == 2:
        image = np.repeat(image[:, :, None], 3, axis=2)  # (H, W) -> (H, W, 3)
    return image


MAX_ASPECT = 8.0  # a strip's panel is drawn stretched to this ratio, not at its own


def panel_aspect(height: int, width: int) -> float:
    """A panel's height over width: the image's, within ``1 : MAX_ASPECT`` and
    ``MAX_ASPECT : 1``. A 2 x 4000 strip at its own ratio made a picture 158,000 pixels tall
    (and gigabytes of memory); beyond the limit the image is stretched to the panel (RoIs and
    points are normalised, so they stay on what they cover)."""
    return min(max(height / max(width, 1), 1 / MAX_ASPECT), MAX_ASPECT)


def draw_panel(
    ax: Axes,
    image: np.ndarray,
    rois: np.ndarray,
    points: np.ndarray | None,
    colors: np.ndarray,
    highlight: set[int] | None,
    title: str,
) -> None:
    """Draw one image with its RoIs ``(N, 4)`` and points ``(N, P, 2)`` (normalised)."""
    from matplotlib.patches import Rectangle

    h, w = image.shape[:2]
    ax.imshow(image, extent=(0, w, h, 0), interpolation="antialiased")
    if panel_aspect(h, w) != h / w:  # a strip: stretched to the panel
        ax.set_aspect("auto")
    margin = 0.08
    ax.set_xlim(-margin * w, (1 + margin) * w)
    ax.set_ylim((1 + margin) * h, -margin * h)
    ax.set_facecolor("0.85")
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_title(title, fontsize=9, parse_math=False)  # a class name's $ is a dollar
    border = Rectangle((0, 0), w, h, fill=False, edgecolor="0.3", lw=0.6, ls=":")
    border.set_gid("image-border")
    ax.add_patch(border)
    scale = np.array([w, h], dtype=np.float64)
    for n, roi in enumerate(rois):
        if not np.isfinite(roi).all():  # a video RoI whose time span misses this frame
            continue
        lo, hi = np.minimum(roi[:2], roi[2:4]) * scale, np.maximum(roi[:2], roi[2:4]) * scale
        strong = highlight is None or n in highlight
        rect = Rectangle(
            tuple(lo),
            *(hi - lo),
            fill=False,
            edgecolor=colors[n],
            lw=1.8 if highlight and strong else 1.0,
            alpha=0.95 if strong else 0.25,
            zorder=3 if highlight and strong else 2,
        )
        rect.set_gid(f"roi:{n}")
        ax.add_patch(rect)
    if points is not None:
        N, P, _ = points.shape
        xy = points[..., :2].reshape(N * P, 2) * scale  # (N, P, 2) -> (N*P, 2) pixels
        point_colors = np.repeat(colors, P, axis=0)  # (N, 4) -> (N*P, 4)
        if highlight:
            faded = np.array([n not in highlight for n in range(N)]).repeat(P)
            point_colors[faded, 3] = 0.2
        size = max(1.0, min(9.0, 1500.0 / (N * P) ** 0.75))
        sc = ax.scatter(xy[:, 0], xy[:, 1], s=size, c=point_colors, linewidths=0, zorder=4)
        sc.set_gid("points")


def render_panel(
    image: np.ndarray,
    rois: np.ndarray,
    points: np.ndarray | None,
    colors: np.ndarray,
    highlight: set[int] | None,
    title: str,
    suptitle: str,
    *,
    inches: float,
    dpi: int,
    fontsize: float = 10,
):
    """One :func:`draw_panel` rendered off-screen to a PIL image (a frame of an animated GIF)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    h, w = image.shape[:2]
    fig = Figure(figsize=(inches, inches * panel_aspect(h, w) + 0.5), dpi=dpi)
    canvas = FigureCanvasAgg(fig)
    draw_panel(fig.subplots(), image, rois, points, colors, highlight, title)
    fig.suptitle(suptitle, fontsize=fontsize, parse_math=False)
    fig.tight_layout()
    canvas.draw()
    return Image.fromarray(np.asarray(canvas.buffer_rgba())[..., :3].copy())


def resolve_stages(output: SparseFormerOutput, stages: Sequence[int] | None) -> list[int]:
    if stages is None:
        return list(range(1, len(output.sampling_points) + 1)) or [-1]
    return list(stages)


def stage_title(output: SparseFormerOutput, stage: int, rois: np.ndarray) -> str:
    lo, hi = np.minimum(rois[:, :2], rois[:, 2:4]), np.maximum(rois[:, :2], rois[:, 2:4])
    area = float(np.prod(hi - lo, axis=1).mean())
    name = {0: "initial RoIs", -1: "final RoIs"}.get(stage, f"stage {stage}")
    return f"{name} (mean area {area:.3f})"


def resolve_highlight(
    output: SparseFormerOutput, highlight: int | Sequence[int] | None, index: int
) -> set[int] | None:
    if highlight is None:
        return None
    if isinstance(highlight, int):
        return set(top_tokens(output, highlight, index))
    return {int(t) for t in highlight}
