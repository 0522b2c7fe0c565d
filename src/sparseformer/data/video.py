"""Video folders: ``DIR/train/CLASS/*.mp4`` as data sets of clips, checked when scanned.

For the video SparseFormer (Gao et al., ICLR 2024, Sec. 5). Decoding lives in
:mod:`sparseformer.data.video_decode`, clip sampling and transforms in
:mod:`sparseformer.data.clips`; this module re-exports their public names, so that
``from sparseformer.data.video import ClipSpec, read_video`` keeps working.

A training item is one random clip ``(3, T, S, S)``; an evaluation item holds every test view.
Unreadable or too-short videos are skipped when the folder is scanned and counted in
:attr:`VideoFolder.skipped`; a video that fails to decode later is counted and, in training,
replaced by the next good one, or, in evaluation, left out (so that no video is scored twice and
none in another's place); never a crash.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import Dataset

from sparseformer.data.clips import (
    ClipSpec,
    clip_indices,
    read_test_clips,
    resize_frames,
    say_short_read,
    test_views,
    train_transform,
    video_file_views,
)
from sparseformer.data.folder import warn_limit_cut
from sparseformer.data.loader import DecodeFailures, SharedOnce
from sparseformer.data.samples import RowView, SampleTable
from sparseformer.data.scan import (
    DifferentItemsError,
    ExtraClassesError,
    check_over_ranks,
    class_folders,
    is_first_rank,
    is_hidden,
    match_val_classes,
    spread_indices,
    walk_files,
    warn_other_extensions,
    warn_unscored,
)
from sparseformer.data.video_decode import (
    VIDEO_EXTENSIONS,
    VideoDataError,
    VideoReadError,
    VideoShortReadError,
    VideoTooShortError,
    probe_video,
    read_video,
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
        found = class_folders(self.root, "videos", VideoDataError, VIDEO_EXTENSIONS)
        if classes is not None:  # val: the training classes, or some of them
            try:
                match_val_classes(self.root, found, classes, "videos")
            except ExtraClassesError as exc:
                raise VideoDataError(str(exc)) from None
        self.classes = list(classes) if classes is not None else found
        self.skipped: list[tuple[str, str]] = []
        self._failed = DecodeFailures(self.classes, self.root, train=train)  # named once each
        self._short = SharedOnce()  # videos that decode fewer frames than they promise
        ignored: list[Path] = []  # other extensions: said, not silently lost
        listed = [
            (path, label)
            for label, name in enumerate(self.classes)
            if name in found
            for path in sorted(walk_files(self.root / name, VIDEO_EXTENSIONS, ignored))
        ]
        warn_other_extensions(ignored, "video", VIDEO_EXTENSIONS)
        present = {label for _, label in listed}  # classes with any video file at all
        present_files = listed
        listed = [listed[i] for i in spread_indices(len(listed), limit)]
        chosen = {label for _, label in listed}
        warn_limit_cut(
            self.root, limit, [n for y, n in enumerate(self.classes) if y in present - chosen]
        )
        kept = self._probe(listed, share_check)
        self._table = SampleTable(
            [p for p, _, _ in kept], label=[y for _, y, _ in kept], frames=[n for _, _, n in kept]
        )
        if not kept:
            raise VideoDataError(self._none_usable(cut_by_limit=len(listed) < len(present_files)))
        # a class without files, or whose chosen files are all unusable (a limit may choose none)
        tried, used = {label for _, label in listed}, {label for _, label, _ in kept}
        empty = [
            n
            for label, n in enumerate(self.classes)
            if n in found and (label not in present or label in tried - used)
        ]
        if empty and not train:  # evaluation: a class without usable videos is not scored
            warn_unscored(self.root, empty, "have no usable video")
        elif empty:
            raise VideoDataError(
                f"class folder(s) {[str(self.root / n) for n in empty]} have no usable video "
                f"(extensions {', '.join(VIDEO_EXTENSIONS)}; at least {spec.min_frames} frames; "
                "unreadable ones are logged); add videos or remove the folder"
            )

    def _probe(self, listed: list[tuple[Path, int]], share_check: bool) -> list[tuple]:
        """``(path, label, num_frames)`` of the listed videos long enough for a clip; the
        others go to :attr:`skipped` with their reason (the first few logged by name)."""
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
            elif n < self.spec.min_frames:
                reason = f"too short: {n} frame(s), a clip needs {self.spec.min_frames}"
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
        return kept

    def _none_usable(self, cut_by_limit: bool = False) -> str:
        """Why a folder whose videos were all skipped cannot be used (``cut_by_limit``: a
        ``--limit-*`` chose the skipped ones among more, before they were checked)."""
        spec = self.spec
        short = sum(r.startswith("too short") for _, r in self.skipped)
        hint = (
            f"; {short} are too short for clips of {spec.num_frames} frames"
            + (f" {spec.stride} apart" if spec.sampling == "dense" else "")
            + f": {spec.shorter_clips_hint}"
            if short
            else ""
        )
        first = f", first: {self.skipped[0][0]}: {self.skipped[0][1]}" if self.skipped else ""
        limit = (
            "; the limit chose these before they were checked: give a larger one"
            if cut_by_limit
            else ""
        )
        return (
            f"no usable videos under {str(self.root)!r} ({len(self.skipped)} skipped{first}; "
            f"extensions {', '.join(VIDEO_EXTENSIONS)}; at least {spec.min_frames} frames"
            f"{hint}{limit})"
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
            if self._short.first(str(path)):  # said once, over the loader's workers
                say_short_read(path, exc.decoded, n)
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
                first = self._failed.note(self._table.path(i), label, self._table.column("label"))
                say = logger.warning if first else logger.debug
                if not self.train:  # evaluation: leave it out, never score another in its place
                    say("could not decode a video (%s); left out", exc)
                    return None, label
                say("could not decode a video (%s); using the next video instead", exc)
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
        for class_dir in sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden(p.name)):
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
