"""Video models at work: which models and data are videos, how their clips are sampled, and
multi-view evaluation (each video's class scores averaged over its clips and crops).

The video SparseFormer (Gao et al., ICLR 2024, Sec. 5) is tested, like other Kinetics models,
on several clips x crops per video; the prediction is the mean of the views' softmax scores.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader

from sparseformer.config import VideoSparseFormerConfig
from sparseformer.data.folder import DataError
from sparseformer.data.transforms import Preprocessing
from sparseformer.data.video import ClipSpec, sample_media, video_file_views
from sparseformer.layers.linear import packed_weights
from sparseformer.weights.registry import MODELS

__all__ = [
    "is_video_model",
    "check_model_fits_data",
    "choose_clip_spec",
    "prediction_clip_spec",
    "ViewAveraging",
    "view_scores",
    "evaluate_views",
    "predict_video_file",
]


def is_video_model(model_name: str) -> bool:
    """Whether a model name is a registered video SparseFormer (timm names are image models)."""
    spec = MODELS.get(model_name)
    return spec is not None and isinstance(spec.config, VideoSparseFormerConfig)


def check_model_fits_data(model_name: str, data_dir: Path | None) -> bool | None:
    """A clear error when an image model meets video clips or a video model meets images,
    decided from the model's name and a small sample of the data folder (``None``: a built-in
    image data set), before the folder is scanned. A folder with neither images nor videos is
    left to the data checks' own errors.

    Returns:
        Whether the data are videos; ``None`` when the folder holds neither (missing, empty):
        the data checks then say what is wrong.

    Raises:
        DataError: the model's kind and the data's differ.
    """
    if data_dir is None:  # a built-in image data set
        video_data = False
    else:
        videos, images = sample_media(data_dir)
        video_data = videos > images
        if not videos and not images:
            return None
    video_model = is_video_model(model_name)
    if video_model and not video_data:
        raise DataError(
            f"{model_name} is a video model but the data are images; use an image model "
            "(e.g. sparseformer_v1_tiny) or a video folder (DIR/train/CLASS/*.mp4)"
        )
    if video_data and not video_model:
        raise DataError(
            f"{model_name} is an image model but the data folder holds videos; use a video "
            "model (e.g. video_sparseformer_v1_tiny; `sparseformer models` lists them)"
        )
    return video_data


def choose_clip_spec(
    model_name: str | None,
    asked: dict[str, Any],
    saved: dict[str, Any] | None = None,
    num_clips: int = 1,
    num_crops: int = 1,
) -> ClipSpec:
    """Clip sampling for training and evaluation: what was ``asked`` (``num_frames``,
    ``stride``, ``sampling``; ``None``: not given), else the clip settings a checkpoint was
    trained with (``saved``, its ``video`` record), else the model's frames, stride 4 and
    dense sampling; with ``num_clips x num_crops`` test views."""
    saved = saved or {}
    frames = (
        asked.get("num_frames")
        or saved.get("num_frames")
        or getattr(getattr(MODELS.get(model_name or ""), "config", None), "num_frames", 8)
    )
    return ClipSpec(
        num_frames=frames,
        sampling=asked.get("sampling") or saved.get("sampling", "dense"),
        stride=asked.get("stride") or saved.get("stride", 4),
        num_clips=num_clips,
        num_crops=num_crops,
    )


def prediction_clip_spec(
    model: nn.Module,
    info: dict[str, Any],
    pre: Preprocessing,
    asked: dict[str, Any],
    num_clips: int = 1,
    num_crops: int = 1,
) -> ClipSpec:
    """Clip sampling for predicting with a video model: what was ``asked`` (``num_frames``,
    ``stride``, ``sampling``; ``None``: not given), else the training run's (``info``: what the
    checkpoint says, its ``video`` record), sized by its preprocessing ``pre``, with
    ``num_clips x num_crops`` test views."""
    saved = dict(info.get("video") or {"num_frames": model.config.num_frames})
    for key in ("scale", "mean", "std"):
        if key in saved:
            saved[key] = tuple(saved[key])
    return dataclasses.replace(
        ClipSpec(**saved),
        **{k: v for k, v in asked.items() if v is not None},
        size=pre.img_size,
        crop_pct=pre.crop_pct,
        mean=tuple(pre.mean),
        std=tuple(pre.std),
        num_clips=num_clips,
        num_crops=num_crops,
    )


@torch.no_grad()
def view_scores(model: nn.Module, clips: Tensor) -> Tensor:
    """Class probabilities averaged over views.

    Args:
        model: a video classifier taking ``(B, 3, T, H, W)``.
        clips: ``(B, 3, T, H, W)`` (one view) or ``(B, V, 3, T, H, W)``.

    Returns:
        ``(B, classes)`` mean softmax scores.
    """
    if clips.dim() == 5:
        clips = clips.unsqueeze(1)  # (B, 3, T, H, W) -> (B, 1, 3, T, H, W)
    # one view at a time: the memory of a (B, 3, T, H, W) batch, not of B x V clips
    probs = sum(model(clips[:, v]).float().softmax(-1) for v in range(clips.shape[1]))
    return probs / clips.shape[1]


@packed_weights()  # the weights do not change during an evaluation
@torch.no_grad()
def evaluate_views(
    model: nn.Module, loader: DataLoader, device: torch.device | str = "cpu"
) -> dict[str, float]:
    """Top-1 accuracy and NLL of view-averaged scores over a loader of ``(clips, labels)``.

    Returns:
        ``{"acc1": percent, "loss": mean NLL of the averaged scores, "num_samples": n,
        "num_correct": top-1 hits}``.
    """
    was_training = model.training
    model.eval()
    correct, nll, n = 0, 0.0, 0
    for clips, labels in loader:
        labels = labels.to(device)
        probs = view_scores(model, clips.to(device))
        correct += int((probs.argmax(-1) == labels).sum())
        nll += float(F.nll_loss(probs.clamp_min(1e-12).log(), labels, reduction="sum"))
        n += labels.numel()
    model.train(was_training)
    return {
        "acc1": 100.0 * correct / max(n, 1),
        "loss": nll / max(n, 1),
        "num_samples": n,
        "num_correct": correct,
    }


class ViewAveraging(nn.Module):
    """Wrap a video classifier so that ``(B, V, 3, T, H, W)`` batches give one prediction per
    video: the log of the views' mean softmax scores (valid logits: their softmax is the mean
    score, and cross-entropy on them is the NLL of the averaged prediction). Plain
    ``(B, 3, T, H, W)`` clips pass straight to the model.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 6:
            return self.model(x)
        return view_scores(self.model, x).clamp_min(1e-12).log()  # (B, K)


@torch.no_grad()
def predict_video_file(
    model: nn.Module, path: str, spec: ClipSpec, device: torch.device | str = "cpu"
) -> Tensor:
    """Class probabilities ``(classes,)`` of one video file, averaged over ``spec``'s views.

    Raises:
        VideoReadError: unreadable file; VideoDataError: too short for one clip.
    """
    views = video_file_views(path, spec).to(device)  # (V, 3, T, S, S)
    model.eval()
    return view_scores(model, views.unsqueeze(0))[0]
