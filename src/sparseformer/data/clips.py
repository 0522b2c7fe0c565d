"""Clip sampling and frame-consistent transforms: which frames a clip takes, and how its
frames are cropped, flipped and normalised.

For the video SparseFormer (Gao et al., ICLR 2024, Sec. 5). A clip is a ``(3, T, H, W)`` float
tensor, normalised like the image models' inputs. Sampling follows the common recipes:

- ``dense``: T consecutive frames ``stride`` apart (SlowFast / Kinetics style); train takes a
  random start, test ``num_clips`` evenly spaced starts;
- ``uniform``: one frame from each of T equal segments (TSN style); train picks randomly in
  each segment, test at segment centres (shifted per clip for several clips).

Training crops and flips are drawn once per clip and applied to every frame. Testing takes
``num_clips x num_crops`` views per video, whose scores the caller averages
(:func:`sparseformer.engine.video.evaluate_views`).
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from sparseformer.data.video_decode import (
    VideoDataError,
    VideoShortReadError,
    VideoTooShortError,
    probe_video,
    read_video,
)

__all__ = [
    "CLIP_INTERPOLATION",
    "ClipSpec",
    "clip_indices",
    "resize_frames",
    "train_transform",
    "test_views",
    "read_test_clips",
    "say_short_read",
    "video_file_views",
]

logger = logging.getLogger(__name__)

CLIP_INTERPOLATION = "bilinear"  # how every clip's frames are resized (antialiased)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ClipSpec:
    """How clips are taken from a video and preprocessed.

    Attributes:
        num_frames: frames T per clip.
        sampling: ``"dense"`` (consecutive, ``stride`` apart) or ``"uniform"`` (one per segment).
        stride: frame step of dense sampling.
        size: output height and width S (square crops).
        crop_pct: test resizes the short side to ``size / crop_pct`` before cropping.
        scale: train random-resized-crop area range.
        hflip: train horizontal-flip probability (0 for direction-sensitive tasks).
        num_clips, num_crops: test views per video (crops along the long side: 1 or 3).
        mean, std: normalisation.
    """

    num_frames: int = 8
    sampling: Literal["dense", "uniform"] = "dense"
    stride: int = 4
    size: int = 224
    crop_pct: float = 224 / 256
    scale: tuple[float, float] = (0.25, 1.0)
    hflip: float = 0.5
    num_clips: int = 1
    num_crops: int = 1
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD

    def __post_init__(self) -> None:
        if self.sampling not in ("dense", "uniform"):
            raise VideoDataError(f"sampling must be 'dense' or 'uniform', got {self.sampling!r}")
        for name in ("num_frames", "stride", "size", "num_clips"):
            if getattr(self, name) <= 0:
                raise VideoDataError(f"{name} must be positive, got {getattr(self, name)}")
        if self.num_crops not in (1, 3):
            raise VideoDataError(f"num_crops must be 1 or 3, got {self.num_crops}")

    @property
    def shorter_clips_hint(self) -> str:
        """The flags that shorten a clip's span, for messages about too-short videos."""
        return "lower --frames or --frame-stride" if self.sampling == "dense" else "lower --frames"

    @property
    def min_frames(self) -> int:
        """Shortest usable video: one dense clip's span, or T frames for uniform sampling."""
        if self.sampling == "dense":
            return (self.num_frames - 1) * self.stride + 1
        return self.num_frames

    @property
    def num_views(self) -> int:
        return self.num_clips * self.num_crops


def clip_indices(
    num_video_frames: int, spec: ClipSpec, *, train: bool, clip: int = 0, rng: random.Random
) -> list[int]:
    """Frame numbers of one clip.

    Args:
        num_video_frames: frames in the video (at least ``spec.min_frames``).
        spec: the sampling settings.
        train: random position (train) or the deterministic test position of view ``clip``.
        clip: which of ``spec.num_clips`` test clips (ignored in training).
        rng: source of randomness for training.

    Returns:
        ``T`` frame numbers, in temporal order.
    """
    n, T = num_video_frames, spec.num_frames
    if n < spec.min_frames:
        raise VideoDataError(f"a {n}-frame video is shorter than a clip ({spec.min_frames})")
    if spec.sampling == "dense":
        span = spec.min_frames
        free = n - span
        if train:
            start = rng.randint(0, free)
        else:  # evenly spaced, centred when there is one clip
            start = round(free * (clip + 0.5) / spec.num_clips)
        return [start + k * spec.stride for k in range(T)]
    segment = n / T
    if train:
        return [min(int(segment * k + rng.random() * segment), n - 1) for k in range(T)]
    offset = (clip + 0.5) / spec.num_clips
    return [min(int(segment * (k + offset)), n - 1) for k in range(T)]


def resize_frames(frames: Tensor, size: int | tuple[int, int]) -> Tensor:
    """Resize ``(T, H, W, 3)`` uint8 frames: short side to ``size`` (int) or to ``(h, w)``.

    Returns:
        ``(T, 3, h, w)`` float frames in [0, 1] (bilinear, antialiased).
    """
    x = frames.permute(0, 3, 1, 2).float() / 255  # (T, H, W, 3) -> (T, 3, H, W)
    H, W = x.shape[-2:]
    if isinstance(size, int):
        scale = size / min(H, W)
        size = (max(size, round(H * scale)), max(size, round(W * scale)))
    return F.interpolate(x, size=size, mode=CLIP_INTERPOLATION, antialias=True, align_corners=False)


def _normalize(x: Tensor, spec: ClipSpec) -> Tensor:
    """``(T, 3, S, S)`` in [0, 1] -> normalised ``(3, T, S, S)``."""
    mean = torch.tensor(spec.mean).view(1, 3, 1, 1)
    std = torch.tensor(spec.std).view(1, 3, 1, 1)
    return ((x - mean) / std).permute(1, 0, 2, 3).contiguous()  # (T, 3, S, S) -> (3, T, S, S)


def train_transform(frames: Tensor, spec: ClipSpec, rng: random.Random) -> Tensor:
    """One random resized crop and flip, the same for every frame. ``(T, H, W, 3)`` uint8 ->
    ``(3, T, S, S)``."""
    T, H, W, _ = frames.shape
    area = H * W * rng.uniform(*spec.scale)
    ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    h = min(H, max(1, round(math.sqrt(area / ratio))))
    w = min(W, max(1, round(math.sqrt(area * ratio))))
    top, left = rng.randint(0, H - h), rng.randint(0, W - w)
    x = resize_frames(frames[:, top : top + h, left : left + w], (spec.size, spec.size))
    if rng.random() < spec.hflip:
        x = x.flip(-1)
    return _normalize(x, spec)


def test_views(frames: Tensor, spec: ClipSpec) -> list[Tensor]:
    """Resize the short side to ``size / crop_pct`` and take ``num_crops`` square crops
    (centre, or start/centre/end of the long side). ``(T, H, W, 3)`` -> list of ``(3, T, S, S)``.
    """
    x = resize_frames(frames, round(spec.size / spec.crop_pct))
    H, W = x.shape[-2:]
    S = spec.size
    if spec.num_crops == 1:
        positions = [0.5]
    else:
        positions = [0.0, 0.5, 1.0]
    views = []
    for p in positions:
        top = round((H - S) * (p if H > W else 0.5))
        left = round((W - S) * (p if W >= H else 0.5))
        views.append(_normalize(x[:, :, top : top + S, left : left + S], spec))
    return views


def read_test_clips(path: str | Path, spec: ClipSpec) -> Tensor:
    """The frames of the ``spec.num_clips`` test clips of one video file, clip after clip:
    ``(num_clips * T, H, W, 3)`` uint8.

    Raises:
        VideoReadError: unreadable file; VideoTooShortError: too short for one clip.
    """
    n = probe_video(path)
    if n < spec.min_frames:
        raise VideoTooShortError(f"{path}: {n} frame(s), a clip needs at least {spec.min_frames}")

    def frames_of_clips(n: int) -> list[int]:
        rng = random.Random(0)
        clips = [clip_indices(n, spec, train=False, clip=c, rng=rng) for c in range(spec.num_clips)]
        return [i for c in clips for i in c]

    try:
        return read_video(path, frames_of_clips(n))
    except VideoShortReadError as exc:  # fewer frames than probed: the clips within those
        if exc.decoded < spec.min_frames or exc.decoded >= n:
            raise
        say_short_read(path, exc.decoded, n)
        return read_video(path, frames_of_clips(exc.decoded))


def say_short_read(path: str | Path, decoded: int, promised: int) -> None:
    """Log that a video's clips come from the ``decoded`` frames of the ``promised`` ones."""
    logger.warning(
        "%s: %d of the %d frames its header promises decode (a cut-off or damaged file); its "
        "clips are taken from those", path, decoded, promised,
    )  # fmt: skip


def video_file_views(path: str | Path, spec: ClipSpec) -> Tensor:
    """All test views of one video file: ``(V, 3, T, S, S)``, for prediction.

    Raises:
        VideoReadError: unreadable file; VideoTooShortError: too short for one clip.
    """
    frames = read_test_clips(path, spec)  # (num_clips*T, H, W, 3)
    views = []
    for c in range(spec.num_clips):
        views += test_views(frames[c * spec.num_frames : (c + 1) * spec.num_frames], spec)
    return torch.stack(views)  # V x (3, T, S, S) -> (V, 3, T, S, S)
