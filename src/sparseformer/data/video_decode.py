"""Video decoding with PyAV: frame counts, RGB frames turned upright, and the errors a video
file can raise.

For the video SparseFormer (Gao et al., ICLR 2024, Sec. 5). Decoding starts at the first key
frame (a stream cut mid-GOP starts with packets that cannot decode), a decoding error after the
first frames ends the video there (as the end of a cut-off file does), and frames are turned as
the stream's display matrix says (a phone's portrait video is stored landscape).
"""

from __future__ import annotations

import gc
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from sparseformer.data.images import EMPTY_FILE

__all__ = [
    "VIDEO_EXTENSIONS",
    "VideoReadError",
    "VideoDataError",
    "VideoTooShortError",
    "VideoShortReadError",
    "probe_video",
    "read_video",
]

logger = logging.getLogger(__name__)

VIDEO_EXTENSIONS = (
    *(".mp4", ".avi", ".mkv", ".mov", ".webm", ".m4v", ".mpg", ".mpeg"),
    *(".ts", ".mts", ".m2ts", ".3gp", ".flv", ".wmv", ".ogv"),
)


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
    _COLLECTOR_ACROSS_FORK.register()
    return av


class _CollectorAcrossFork:
    """A forked process (a data-loading worker) must never free the PyAV objects its parent
    left unreachable (a decoder or converter in a reference cycle: an exception's traceback
    holds one): freeing one waits for threads that only the parent has, and the worker hangs
    before its first line. So the collector is held across a fork (counted: threads may fork
    at once), and the child freezes what it inherited before it collects again: cyclic garbage
    inherited from the parent is never collected there. The parent collects as before."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._forking = 0  # forks in progress in this process
        self._was_on = False  # whether the collector was on before the first of them
        self._registered = False

    def register(self) -> None:
        """Install the fork hooks, once per process (they pass on to forked children)."""
        with self._lock:
            if not self._registered and hasattr(os, "register_at_fork"):  # none on Windows
                self._registered = True
                os.register_at_fork(
                    before=self._before, after_in_parent=self._parent, after_in_child=self._child
                )

    def _before(self) -> None:
        with self._lock:
            if self._forking == 0:
                self._was_on = gc.isenabled()
                gc.disable()
            self._forking += 1

    def _parent(self) -> None:
        with self._lock:
            self._forking -= 1
            if self._forking == 0 and self._was_on:
                gc.enable()

    def _child(self) -> None:  # one thread now; another's hold on the lock did not come along
        self._lock, self._forking = threading.Lock(), 0
        gc.freeze()
        if self._was_on:
            gc.enable()


_COLLECTOR_ACROSS_FORK = _CollectorAcrossFork()


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
            raise VideoReadError(f"{path}: {EMPTY_FILE}")
        with av.open(str(path)) as container:
            stream = _main_video_stream(container, path)
            if stream.frames > 0:
                return int(stream.frames)
            return _count_frame_packets(container.demux(stream))
    except VideoReadError:
        raise
    except (av.FFmpegError, OSError, ValueError, IndexError) as exc:
        raise VideoReadError(f"{path}: {_ffmpeg_reason(exc)}") from exc


def _main_video_stream(container, path):
    """The video stream FFmpeg's players would show (``av_find_best_stream``): it passes over
    a cover picture or a one-frame thumbnail stored before the footage.

    Raises:
        VideoReadError: the file has no video stream, or is a still image under a video's
            name (FFmpeg reads a PNG or JPEG named ``.mp4`` as a one-frame video).
    """
    if not container.streams.video:
        raise VideoReadError(f"{path}: no video stream")
    demuxer = container.format.name
    if demuxer == "image2" or demuxer.endswith("_pipe"):  # FFmpeg's still-image readers
        kind = demuxer.removesuffix("_pipe").upper()
        raise VideoReadError(f"{path}: a still {kind} image under a video's name, not a video")
    return container.streams.best("video") or container.streams.video[0]


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
            stream = _main_video_stream(container, path)
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
    rgb = _reformatter().reformat(frame, width, height, "rgb24").to_ndarray()
    return np.ascontiguousarray(np.rot90(rgb, k=turns)) if turns else rgb


_LOCAL = threading.local()
_INHERITED: list = []  # never freed: freeing one waits for threads that a fork left behind


def _reformatter():
    """This process's and thread's own converter to RGB. ``frame.to_ndarray(format=...)`` reuses
    one per thread (PyAV 19), made with a pool of scaling threads: one made in the main process
    went on, in a data-loading worker forked from it, to wait forever for threads that only the
    main process has (to scale with, or to join when freed)."""
    if getattr(_LOCAL, "pid", None) != os.getpid():
        from av.video.reformatter import VideoReformatter

        if hasattr(_LOCAL, "reformatter"):
            _INHERITED.append(_LOCAL.reformatter)
        _LOCAL.pid, _LOCAL.reformatter = os.getpid(), VideoReformatter()
    return _LOCAL.reformatter
