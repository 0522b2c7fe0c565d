"""Video data: decoding with PyAV, clip sampling, frame-consistent transforms, video folders.

For the video SparseFormer (Gao et al., ICLR 2024, Sec. 5). A clip is a ``(3, T, H, W)`` float
tensor, normalised like the image models' inputs. Sampling follows the common recipes:

- ``dense``: T consecutive frames ``stride`` apart (SlowFast / Kinetics style); train takes a
  random start, test ``num_clips`` evenly spaced starts;
- ``uniform``: one frame from each of T equal segments (TSN style); train picks randomly in
  each segment, test at segment centres (shifted per clip for several clips).

Training crops and flips are drawn once per clip and applied to every frame. Testing takes
``num_clips x num_crops`` views per video, whose scores the caller averages
(:func:`sparseformer.engine.video.evaluate_views`). Unreadable or too-short videos are skipped
when the folder is scanned and counted in :attr:`VideoFolder.skipped`; a video that fails to
decode later is counted and, in training, replaced by the next good one, or, in evaluation, left
out (so that no video is scored twice and none in another's place); never a crash.
"""

from __future__ import annotations

import logging
import math
import os
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import Dataset

from sparseformer.data.loader import SharedCount
from sparseformer.data.scan import (
    DifferentItemsError,
    ExtraClassesError,
    RowView,
    SampleTable,
    check_over_ranks,
    is_first_rank,
    match_val_classes,
    spread_indices,
    walk_files,
    warn_other_extensions,
    warn_unscored,
)

__all__ = [
    "VIDEO_EXTENSIONS",
    "VideoReadError",
    "VideoDataError",
    "VideoTooShortError",
    "VideoShortReadError",
    "ClipSpec",
    "probe_video",
    "read_video",
    "clip_indices",
    "resize_frames",
    "VideoFolder",
    "sample_media",
    "is_video_folder",
    "video_datasets",
    "read_test_clips",
    "video_file_views",
]

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (
    *(".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg"),
    *(".ts", ".mts", ".m2ts", ".3gp", ".flv", ".wmv", ".ogv"),
)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class VideoReadError(OSError):
    """A video file that cannot be opened or decoded."""


class VideoDataError(ValueError):
    """A video data set that cannot be used as given; the message says what to do."""


class VideoTooShortError(VideoDataError):
    """A video with fewer frames than one clip takes."""


class VideoShortReadError(VideoReadError):
    """Fewer frames decode than were asked for (a cut-off file, or a stream whose header or
    packet count promises more frames than decode: an open GOP's leading B-frames)."""

    def __init__(self, message: str, decoded: int) -> None:
        super().__init__(message)
        self.decoded = decoded


def _av():
    try:
        import av
    except ImportError as exc:  # pragma: no cover - av is a dependency of the video extra
        raise VideoDataError(
            "video decoding needs PyAV: pip install 'sparseformer[video]' (or pip install av)"
        ) from exc
    return av


def _ffmpeg_reason(exc: Exception) -> str:
    """FFmpeg's reason without the errno and the path PyAV adds: ``InvalidDataError: [Errno
    1094995529] Invalid data found when processing input: 'x.mp4'`` reads ``not readable as
    video (Invalid data found when processing input)``."""
    reason = getattr(exc, "strerror", None)
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if reason and type(exc).__module__.startswith("av."):
        return f"not readable as video ({reason})"
    return f"{exc.__class__.__name__}: {str(exc)[:120]}"


def probe_video(path: str | Path) -> int:
    """Number of frames of a video, from its header when it has one, else by counting its
    packets, one per frame, from the first key frame on (WebM, Matroska and fragmented MP4
    headers carry no count; reading packets without decoding them takes a few milliseconds
    where decoding takes tens).

    Raises:
        VideoReadError: not a readable video (missing, empty, corrupt, no video stream).
    """
    av = _av()
    try:
        if os.path.getsize(path) == 0:
            raise VideoReadError(f"{path}: an empty file (0 bytes)")
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError(f"{path}: no video stream")
            stream = container.streams.video[0]
            if stream.frames > 0:
                return int(stream.frames)
            return _count_frame_packets(container.demux(stream))
    except VideoReadError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError) as exc:
        raise VideoReadError(f"{path}: {_ffmpeg_reason(exc)}") from exc


def _count_frame_packets(packets) -> int:
    """Packets from the first key frame on (a stream cut mid-GOP starts with packets that do
    not decode); all of them when none is marked as a key frame."""
    total = from_key = 0
    for packet in packets:
        if not packet.size:  # the demuxer's end-of-stream flush packet
            continue
        total += 1
        if from_key or packet.is_keyframe:
            from_key += 1
    return from_key or total


def _frames_from_first_key(container, stream):
    """Decoded frames, fed from the first key frame's packet on: a stream cut mid-GOP starts
    with packets that cannot decode (libvpx refuses them) and that the probe does not count.
    A stream that marks no packet as a key frame is decoded whole."""
    held: list | None = []  # packets before the first key frame; None once one is seen
    for packet in container.demux(stream):
        if held is not None:
            if packet.size and not packet.is_keyframe:
                held.append(packet)
                continue
            if not packet.size:  # the end, and no key frame flagged: decode what was held
                for early in held:
                    yield from early.decode()
            held = None
        yield from packet.decode()
    if held:  # the demuxer gave no end-of-stream packet: decode what was held, then flush
        for early in held:
            yield from early.decode()
        yield from stream.decode(None)


def read_video(path: str | Path, indices: Sequence[int] | None = None) -> Tensor:
    """Decode a video's frames as RGB.

    Args:
        path: a video file PyAV (FFmpeg) can read.
        indices: frame numbers to return, in this order (repeats allowed); ``None`` for all.
            Decoding stops after the largest index.

    Returns:
        ``(T, H, W, 3)`` uint8 frames.

    A decoding error after the first frames ends the video there, as the end of a cut-off
    file does: the frames before it are the video's frames (``indices=None`` returns them,
    with a warning), and asking for a later one raises :class:`VideoShortReadError`, which
    says how many decode.

    Raises:
        VideoReadError: unreadable file, or fewer frames than ``indices`` asks for
            (:class:`VideoShortReadError`).
    """
    av = _av()
    wanted = None if indices is None else sorted(set(int(i) for i in indices))
    last = None if wanted is None else wanted[-1]
    frames: dict[int, np.ndarray] = {}
    decoded = 0
    broken = None  # the decoding error that ended the stream early, if any
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise VideoReadError(f"{path}: no video stream")
            stream = container.streams.video[0]
            stream.thread_type = "AUTO"
            stream.thread_count = _decoder_threads()
            shown = None  # the first frame's (width, height) as shown: every frame's size
            decoding = _frames_from_first_key(container, stream)
            while True:
                try:
                    frame = next(decoding, None)
                except (av.FFmpegError, OSError, ValueError, IndexError) as exc:
                    if not decoded:
                        raise
                    broken = getattr(exc, "strerror", None) or _ffmpeg_reason(exc)
                    break  # a corrupt packet or a cut-off file: the frames so far are the video
                if frame is None:
                    break
                i, decoded = decoded, decoded + 1
                if shown is None:
                    w, h = frame.width, frame.height
                    shown = (h, w) if _quarter_turns(frame) % 2 else (w, h)
                if wanted is None or i in wanted:
                    frames[i] = _upright_rgb(frame, shown)
                if last is not None and i >= last:
                    break
    except VideoReadError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError) as exc:
        raise VideoReadError(f"{path}: {_ffmpeg_reason(exc)}") from exc
    if not decoded:
        raise VideoReadError(f"{path}: no decodable frames")
    order = range(len(frames)) if indices is None else [int(i) for i in indices]
    missing = [i for i in order if i not in frames]
    if missing:
        why = (
            f"decoding failed after frame {decoded - 1}: {broken}"
            if broken
            else "a truncated file, or a header that claims more frames than the stream holds"
        )
        raise VideoShortReadError(
            f"{path}: only {decoded} frame(s) decode, frame {missing[0]} requested ({why})",
            decoded,
        )
    if broken:
        logger.warning(
            "%s: decoding failed after frame %d (%s); using the frames before",
            path,
            decoded - 1,
            broken,
        )
    return torch.from_numpy(np.stack([frames[i] for i in order]))


def _decoder_threads() -> int:
    """FFmpeg decoding threads: its own choice (0, about one per core) in the main process;
    in a DataLoader worker, the worker's share of the cores, so that 8 processes x 8 workers
    do not each start a thread per core."""
    info = torch.utils.data.get_worker_info()
    if info is None:
        return 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) * info.num_workers
    return max(1, cores // processes)


def _quarter_turns(frame) -> int:
    """Counterclockwise quarter turns that show ``frame`` as players do: PyAV's
    ``VideoFrame.rotation``, the display matrix's angle (a phone's portrait video is stored
    landscape with -90)."""
    if not hasattr(frame, "rotation"):  # PyAV releases before the attribute
        global _WARNED_NO_ROTATION
        if not _WARNED_NO_ROTATION:
            _WARNED_NO_ROTATION = True
            logger.warning("this PyAV (%s) does not report a video's display rotation, so "
                           "rotated (phone) videos stay as stored; pip install -U av",
                           getattr(_av(), "__version__", "?"))  # fmt: skip
        return 0
    return round((frame.rotation or 0) / 90) % 4


_WARNED_NO_ROTATION = False


def _upright_rgb(frame, shown: tuple[int, int]) -> np.ndarray:
    """A decoded frame as ``(H, W, 3)`` uint8 RGB, turned as the stream's display matrix says
    and at ``shown`` = (width, height) after turning: a stream that changes resolution or
    rotation midway (a joined recording) comes out at its first frame's size."""
    turns = _quarter_turns(frame)
    width, height = (shown[1], shown[0]) if turns % 2 else shown  # the size before turning
    if (frame.width, frame.height) == (width, height):
        rgb = frame.to_ndarray(format="rgb24")
    else:
        rgb = frame.to_ndarray(format="rgb24", width=width, height=height)
    return np.ascontiguousarray(np.rot90(rgb, k=turns)) if turns else rgb


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
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)


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


def _video_row(table: SampleTable, i: int) -> tuple[Path, int, int]:
    return Path(table.path(i)), table.value("label", i), table.value("frames", i)


_NAMED_SKIPS = 10  # unusable videos named one per line; the rest are counted


def _frames_or_reason(path: str) -> int | str:
    """A video's frame count, or why it cannot be used (the message without the path)."""
    try:
        return probe_video(path)
    except VideoReadError as exc:
        return str(exc).removeprefix(f"{path}: ")


class VideoFolder(Dataset):
    """Videos under ``root/CLASS/``, labelled by the sorted class-folder index.

    Args:
        root: the split folder (for example ``DIR/train``).
        spec: clip sampling and preprocessing.
        train: one random clip per item ``(3, T, S, S)``; else all test views stacked
            ``(V, 3, T, S, S)`` with ``V = num_clips * num_crops`` (``(3, T, S, S)`` when
            ``V = 1``).
        classes: class names to use (so that val follows train's order and labels). The
            folder may hold a subset of them (a class without a folder or usable video is
            logged and not scored); a folder not among them is an error.
        limit: use only this many videos, evenly spread over the folder, chosen before the
            scan (fewer when some are unusable).
        share_check: split the scan over the processes of a running ``torch.distributed``
            group; a collective: every process must build the data set (the training CLI does).

    Training draws (clip position, crop, flip) come from Python's ``random``, which the
    loaders seed per worker and epoch.

    Attributes:
        samples: ``(path, label, num_frames)`` of the usable videos.
        skipped: ``(path, reason)`` of unreadable and too-short videos.
        failed_loads: videos that failed to decode after the scan, in this process and its
            DataLoader workers. Training
            replaces such a video by the next good one; evaluation returns ``(None, label)``,
            which :func:`~sparseformer.data.loader.collate` leaves out.
    """

    def __init__(
        self,
        root: str | Path,
        spec: ClipSpec,
        *,
        train: bool,
        classes: list[str] | None = None,
        limit: int | None = None,
        share_check: bool = False,
    ) -> None:
        self.root = Path(root)
        self.spec = spec
        self.train = train
        if not self.root.is_dir():
            raise VideoDataError(
                f"{str(self.root)!r} does not exist; a video folder has the layout "
                "DIR/train/CLASS/*.mp4 and DIR/val/CLASS/*.mp4"
            )
        found = sorted(p.name for p in self.root.iterdir() if p.is_dir() and p.name[0] != ".")
        if not found:
            raise VideoDataError(
                f"{str(self.root)!r} has no class folders; put each class's videos in its own "
                f"sub-folder, e.g. {self.root / 'jumping'}/001.mp4"
            )
        if classes is not None:  # val: the training classes, or some of them
            try:
                match_val_classes(self.root, found, classes, "videos")
            except ExtraClassesError as exc:
                raise VideoDataError(str(exc)) from None
        self.classes = list(classes) if classes is not None else found
        self.skipped: list[tuple[str, str]] = []
        self._failed = SharedCount()
        ignored: list[Path] = []  # other extensions: said, not silently lost
        listed = [
            (path, label)
            for label, name in enumerate(self.classes)
            if name in found
            for path in sorted(walk_files(self.root / name, VIDEO_EXTENSIONS, ignored))
        ]
        warn_other_extensions(ignored, "video", VIDEO_EXTENSIONS)
        present = {label for _, label in listed}  # classes with any video file at all
        listed = [listed[i] for i in spread_indices(len(listed), limit)]
        try:
            counts = check_over_ranks(
                [str(path) for path, _ in listed],
                _frames_or_reason,
                f"{self.root}: videos probed",
                share=share_check,
            )
        except DifferentItemsError as exc:
            raise VideoDataError(str(exc)) from None
        kept = []
        for (path, label), n in zip(listed, counts):
            if isinstance(n, str):
                self.skipped.append((str(path), n))
            elif n < spec.min_frames:
                reason = f"too short: {n} frame(s), a clip needs {spec.min_frames}"
                self.skipped.append((str(path), reason))
            else:
                kept.append((str(path), label, n))
        if self.skipped and is_first_rank():
            for path, reason in self.skipped[:_NAMED_SKIPS]:
                logger.warning("skipping video %s (%s)", path, reason)
            if len(self.skipped) > _NAMED_SKIPS:
                logger.warning(
                    "%s: skipped %d more unusable video(s)",
                    self.root,
                    len(self.skipped) - _NAMED_SKIPS,
                )
        self._table = SampleTable(
            [p for p, _, _ in kept], label=[y for _, y, _ in kept], frames=[n for _, _, n in kept]
        )
        if not kept:
            short = sum(r.startswith("too short") for _, r in self.skipped)
            hint = (
                f"; {short} are too short for clips of {spec.num_frames} frames"
                + (f" {spec.stride} apart" if spec.sampling == "dense" else "")
                + f": {spec.shorter_clips_hint}"
                if short
                else ""
            )
            raise VideoDataError(
                f"no usable videos under {str(self.root)!r} ({len(self.skipped)} skipped; "
                f"extensions {', '.join(VIDEO_EXTENSIONS)}; at least {spec.min_frames} frames"
                f"{hint})"
            )
        # a class without files, or whose chosen files are all unusable (a limit may choose none)
        tried, used = {label for _, label in listed}, {label for _, label, _ in kept}
        empty = [
            n
            for label, n in enumerate(self.classes)
            if n in found and (label not in present or label in tried - used)
        ]
        if empty and classes is not None:  # val: a class without usable videos is not scored
            warn_unscored(self.root, empty, "have no usable video")
        elif empty:
            raise VideoDataError(
                f"class folder(s) {[str(self.root / n) for n in empty]} have no usable video "
                f"(extensions {', '.join(VIDEO_EXTENSIONS)}; at least {spec.min_frames} frames; "
                "unreadable ones are logged); add videos or remove the folder"
            )

    @property
    def failed_loads(self) -> int:
        return int(self._failed)

    @property
    def samples(self) -> RowView:
        """``(path, label, num_frames)`` of every usable video: a read-only sequence over the
        compact table. Assign a list to take a subset."""
        return RowView(self._table, _video_row)

    @samples.setter
    def samples(self, rows: Sequence[tuple[Path, int, int]]) -> None:
        rows = list(rows)
        self._table = SampleTable(
            [str(p) for p, _, _ in rows],
            label=[int(y) for _, y, _ in rows],
            frames=[int(n) for _, _, n in rows],
        )

    def _row(self, i: int) -> tuple[Path, int, int]:
        return _video_row(self._table, i)

    def __len__(self) -> int:
        return len(self._table)

    def _load(self, index: int) -> Tensor:
        path, _, n = self._row(index)
        try:
            return self._load_clips(path, n)
        except VideoShortReadError as exc:  # fewer frames than probed: draw within those
            if exc.decoded < self.spec.min_frames or exc.decoded >= n:
                raise
            return self._load_clips(path, exc.decoded)

    def _load_clips(self, path: Path, n: int) -> Tensor:
        spec, rng = self.spec, random.Random(random.getrandbits(64))
        if self.train:
            frames = read_video(path, clip_indices(n, spec, train=True, rng=rng))
            return train_transform(frames, spec, rng)
        clips = [clip_indices(n, spec, train=False, clip=c, rng=rng) for c in range(spec.num_clips)]
        frames = read_video(path, [i for c in clips for i in c])  # (num_clips*T, H, W, 3)
        views = []
        for c in range(spec.num_clips):
            views += test_views(frames[c * spec.num_frames : (c + 1) * spec.num_frames], spec)
        if len(views) == 1:  # one view: a plain clip, as the image pipeline's loaders expect
            return views[0]
        return torch.stack(views)  # V x (3, T, S, S) -> (V, 3, T, S, S)

    def __getitem__(self, index: int) -> tuple[Tensor | None, int]:
        for attempt in range(len(self)):
            i = (index + attempt) % len(self)
            label = self._table.value("label", i)
            try:
                return self._load(i), label
            except VideoReadError as exc:
                self._failed.add()
                if not self.train:  # evaluation: leave it out, never score another in its place
                    logger.warning("could not decode a video (%s); left out", exc)
                    return None, label
                logger.warning("could not decode a video (%s); using the next video instead", exc)
        raise VideoDataError(f"no video under {str(self.root)!r} could be decoded")


def sample_media(data_dir: str | Path, sample: int = 8) -> tuple[int, int]:
    """``(videos, images)`` among the first ``sample`` image or video files of each class
    folder of ``data_dir/train`` (of ``data_dir/val`` when train has none; sub-folders
    included). Other files (labels, notes) do not count; a folder is read only as far as the
    sample, so this is cheap on Kinetics- or ImageNet-sized folders."""
    from sparseformer.data.images import IMAGE_EXTENSIONS

    videos = images = 0
    for split in ("train", "val"):
        root = Path(data_dir) / split
        if not root.is_dir():
            continue
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
            seen = 0
            for f in walk_files(class_dir, VIDEO_EXTENSIONS + IMAGE_EXTENSIONS):
                suffix = f.suffix.lower()
                videos += suffix in VIDEO_EXTENSIONS
                images += suffix in IMAGE_EXTENSIONS
                seen += 1
                if seen == sample:
                    break
        if videos or images:
            break  # train decides; val only when there is no train
    return videos, images


def is_video_folder(data_dir: str | Path, sample: int = 8) -> bool:
    """Whether ``data_dir`` (with ``train/`` and/or ``val/`` class folders) holds videos: most
    of the sampled files (:func:`sample_media`) are videos, so one stray clip among images (or
    image among clips) does not decide."""
    videos, images = sample_media(data_dir, sample)
    return videos > images


def video_datasets(
    data_dir: str | Path,
    spec: ClipSpec,
    need_train: bool = True,
    limit_train: int | None = None,
    limit_val: int | None = None,
    share_check: bool = False,
) -> tuple[VideoFolder | None, VideoFolder]:
    """Train (one random clip per video and epoch) and val (test views) video folders, each
    limited to that many videos spread over its classes if a limit is given (``share_check``:
    see :class:`VideoFolder`).

    Raises:
        VideoDataError: missing split folders, no class folders, no usable video.
    """
    data_dir = Path(data_dir)
    train = None
    if need_train:
        train = VideoFolder(
            data_dir / "train", spec, train=True, limit=limit_train, share_check=share_check
        )
    classes = train.classes if train is not None else None
    val = VideoFolder(
        data_dir / "val", spec, train=False, classes=classes, limit=limit_val,
        share_check=share_check,
    )  # fmt: skip
    return train, val


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
        return read_video(path, frames_of_clips(exc.decoded))


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
