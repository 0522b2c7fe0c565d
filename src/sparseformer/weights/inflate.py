"""Image SparseFormer weights -> video SparseFormer weights (pure dict -> dict).

SparseFormer (Gao et al., ICLR 2024), Sec. 5: the video model starts from ImageNet weights. The
official code edits a built image model; here the image state dict is rewritten into the state
dict of a video model built with D=3 from the start (:class:`~sparseformer.models.video.
VideoSparseFormer`). The rules:

- the stem kernel ``(C, 3, 7, 7)`` gains a time axis of 1: ``(C, 3, 1, 7, 7)``;
- sampling offsets gain a zero time coordinate per point: the bias ``x0, y0, x1, y1, ...``
  becomes ``x0, y0, 0, x1, y1, 0, ...`` and the projection gains zero rows at the same places;
- the RoI-adjust projection ``(dx, dy, dlogw, dlogh)`` gains zero rows for the time centre and
  size: ``(dx, dy, 0, dlogw, dlogh, 0)``;
- the N initial RoIs and embeddings are tiled over R replicates, replicate ``i`` covering the
  time slice ``[i/R, (i+1)/R]`` (replicate-major rows, see ``time_tiled_rois``).

With R = 1 and a one-frame clip, the video model then computes exactly what the image model
computes (tested to 1e-5): every time coordinate sits at the centre of the single frame.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import Tensor

from sparseformer.config import VideoSparseFormerConfig
from sparseformer.weights.checkpoint import FOREIGN, read_checkpoint
from sparseformer.weights.convert import CheckpointError, detect_format

__all__ = ["is_image_state_dict", "inflate_image_state_dict"]

logger = logging.getLogger(__name__)


def is_image_state_dict(state: Mapping[str, Tensor]) -> bool:
    """Whether a state dict in this library's layout holds an image model (4-number RoIs)."""
    rois = state.get("initial_rois")
    return rois is not None and rois.dim() == 2 and rois.shape[-1] == 4


def _time_tiled_rois(rois: Tensor, replicates: int) -> Tensor:
    # Same rule as models.video.time_tiled_rois; kept here so that this module stays a pure
    # dict -> dict conversion below the models (import direction). A test checks they agree.
    N = rois.shape[0]
    p1, p2 = rois.chunk(2, dim=-1)  # (N, 4) -> 2 x (N, 2)
    bounds = torch.linspace(0.0, 1.0, replicates + 1, dtype=rois.dtype)
    t1 = bounds[:-1].repeat_interleave(N).unsqueeze(-1)  # (R,) -> (R*N, 1)
    t2 = bounds[1:].repeat_interleave(N).unsqueeze(-1)  # (R,) -> (R*N, 1)
    return torch.cat([p1.repeat(replicates, 1), t1, p2.repeat(replicates, 1), t2], dim=-1)


def _insert_time(x: Tensor, groups: int, per_group: int) -> Tensor:
    """Insert a zero after every ``per_group`` rows: ``(G*k, ...) -> (G*(k+1), ...)``."""
    rest = x.shape[1:]
    x = x.reshape(groups, per_group, *rest)  # (G*k, ...) -> (G, k, ...)
    zeros = x.new_zeros(groups, 1, *rest)
    return torch.cat([x, zeros], dim=1).reshape(
        groups * (per_group + 1), *rest
    )  # -> (G*(k+1), ...)


def inflate_image_state_dict(
    image_state: Mapping[str, Tensor], config: VideoSparseFormerConfig
) -> dict[str, Tensor]:
    """Rewrite an image SparseFormer state dict into a video SparseFormer state dict.

    Args:
        image_state: an image checkpoint's state dict in any supported layout (this library's,
            the official ImageNet release or the authors' library v2; bare or wrapped in
            ``model`` / ``state_dict`` / ``model_ema``).
        config: the video architecture (or a video model, whose ``config`` is read); its
            image fields must match the checkpoint's (``num_tokens``, ``num_points``, widths).

    Returns:
        The video state dict (this library's keys), ready for strict loading.

    Raises:
        CheckpointError: not an image SparseFormer checkpoint, or one whose token or point
            count differs from ``config``.
    """
    config = getattr(config, "config", config)  # a model given for its config
    checkpoint = read_checkpoint(image_state)  # any layout: converted to ours
    if checkpoint.source_format == FOREIGN:
        detect_format(list(checkpoint.state_dict))  # raises, naming what the keys look like
    state, source_format = checkpoint.state_dict, checkpoint.source_format
    if not is_image_state_dict(state):
        shape = tuple(state["initial_rois"].shape) if "initial_rois" in state else None
        raise CheckpointError(
            f"not an image SparseFormer checkpoint (initial_rois shape {shape}, expected (N, 4)); "
            "video checkpoints load directly, without inflation"
        )
    N, R, P = config.num_tokens, config.replicates, config.num_points
    if "cls_token" in state:  # a bootstrapped model's: no video model inflates it
        raise CheckpointError(
            "a bootstrapped SparseFormer's checkpoint (it has a cls_token): video models "
            "inflate the v1 image SparseFormers' weights only (sparseformer_v1_*)"
        )
    if state["initial_rois"].shape[0] != N:
        raise CheckpointError(
            f"the image checkpoint has {state['initial_rois'].shape[0]} tokens but the video "
            f"config has num_tokens={N}; pick the video model of the same size"
        )
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key == "stem.conv.weight":
            value = value.unsqueeze(2)  # (C, 3, 7, 7) -> (C, 3, 1, 7, 7)
        elif key == "initial_rois":
            value = _time_tiled_rois(value.float(), R).to(value.dtype)  # (N, 4) -> (R*N, 6)
        elif key == "initial_tokens":
            value = value.repeat(R, 1)  # (N, D) -> (R*N, D)
        elif key.endswith(("sample_mix.offset_bias", "sample_mix.offset_proj.weight")):
            if value.shape[0] != 2 * P:
                raise CheckpointError(
                    f"{key} has {value.shape[0]} offsets, expected 2 * num_points = {2 * P}; "
                    "pick the video model of the same size"
                )
            value = _insert_time(value, P, 2)  # (P*2, ...) as x,y -> (P*3, ...) as x,y,t
        elif key.endswith("roi_adjust.proj.weight"):
            value = _insert_time(value, 2, 2)  # (4, D) dx,dy,dw,dh -> (6, D) dx,dy,0,dw,dh,0
        out[key] = value
    logger.info(
        "inflated an image checkpoint%s to video: %d tokens x %d replicates, zero time "
        "offsets and RoI-time updates",
        "" if source_format == "sparseformer" else f" ({source_format} layout)",
        N,
        R,
    )
    return out
