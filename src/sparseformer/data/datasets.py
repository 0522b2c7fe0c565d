"""One entry point from "where is the data" to train/val datasets: :func:`build_datasets`.

Sources: an ImageFolder directory (``DIR/train/CLASS/*``, ``DIR/val/CLASS/*``) or a built-in
data set by name (``fashion-mnist``). New sources (video folders) plug in here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from torch.utils.data import Dataset, Subset

from sparseformer.data.fashion_mnist import CLASS_NAMES as FASHION_CLASSES
from sparseformer.data.fashion_mnist import fashion_mnist
from sparseformer.data.folder import CheckedImageFolder, DataError
from sparseformer.data.scan import counted, first_names, is_hidden
from sparseformer.data.transforms import Augmentation, Preprocessing, build_transform
from sparseformer.data.video import ClipSpec, VideoDataError, is_video_folder, video_datasets

__all__ = ["BUILTIN_DATASETS", "DataSource", "DatasetBundle", "build_datasets", "dataset_defaults"]

logger = logging.getLogger(__name__)

BUILTIN_DATASETS = ("fashion-mnist",)


@dataclass(frozen=True)
class DataSource:
    """Where the images are: exactly one of ``data_dir`` and ``dataset``.

    Attributes:
        data_dir: an ImageFolder root with ``train/`` and ``val/``.
        dataset: a built-in data set name (see ``BUILTIN_DATASETS``).
        data_root: cache folder for built-in data sets (default: the user cache).
        limit_train, limit_val: use only N images of each split (quick runs, tests): N files
            evenly spaced over a folder (so every class keeps its share), chosen before the
            folder's check, so fewer if some of them are unreadable; the first N of a
            built-in data set (which comes shuffled).
        video: clip sampling for a folder of videos (``DIR/train/CLASS/*.mp4``); its size,
            crop_pct, mean and std are replaced by the preprocessing's. ``None``: defaults.
    """

    data_dir: Path | None = None
    dataset: str | None = None
    data_root: Path | None = None
    limit_train: int | None = None
    limit_val: int | None = None
    video: ClipSpec | None = None

    def __post_init__(self) -> None:
        if (self.data_dir is None) == (self.dataset is None):
            raise DataError("give exactly one of --data-dir DIR and --dataset NAME")
        if self.dataset is not None and self.dataset not in BUILTIN_DATASETS:
            raise DataError(
                f"unknown dataset {self.dataset!r}; built-in: {', '.join(BUILTIN_DATASETS)} "
                "(or pass --data-dir DIR with DIR/train/CLASS/* and DIR/val/CLASS/*)"
            )

    def describe(self) -> str:
        return str(self.data_dir) if self.data_dir is not None else str(self.dataset)

    def check_output_outside(self, output: str | os.PathLike, flag: str = "--output") -> None:
        """Refuse a run folder inside the data's ``train/`` or ``val/`` folder: its files would
        be read as images of a class named after it, by the run on resuming and by every later
        run on the data.

        Raises:
            DataError: where the folder lies, and what to give instead.
        """
        split = self.split_holding(output)
        if split is not None:
            raise DataError(
                f"{flag} {str(output)!r} is inside the data's {str(split)!r} folder, where its "
                "files would be read as a class of images; give a folder outside it, e.g. "
                f"runs/{Path(output).resolve().name}"
            )

    def split_holding(self, path: str | os.PathLike) -> Path | None:
        """The split folder (``DIR/train``, ``DIR/val``) that ``path`` is or lies inside, else
        ``None``: a run folder there would have its own files read as a class of images."""
        if self.data_dir is None:
            return None
        where = Path(os.path.realpath(path))
        for split in ("train", "val"):
            folder = Path(os.path.realpath(Path(self.data_dir) / split))
            if where == folder or folder in where.parents:
                return Path(self.data_dir) / split
        return None


@dataclass
class DatasetBundle:
    """Train/val datasets yielding ``(tensor (3, S, S), label)`` (clips ``(3, T, S, S)`` when
    ``video``) and their class names."""

    train: Dataset | None
    val: Dataset
    class_names: list[str]
    skipped_files: list[tuple[str, str]] = field(default_factory=list)
    video: bool = False
    clip_spec: ClipSpec | None = None  # video: the clip settings actually used

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


def _skipped_note(bundle: DatasetBundle) -> str:
    if not bundle.skipped_files:
        return ""
    bad = "unreadable or too-short" if bundle.video else "unreadable"
    return f", {len(bundle.skipped_files)} {bad} file(s) skipped"


def dataset_defaults(source: DataSource) -> Preprocessing | None:
    """Preprocessing suited to a built-in data set (its own mean/std, no crop), else ``None``."""
    if source.dataset == "fashion-mnist":
        return Preprocessing(28, (0.2860,) * 3, (0.3530,) * 3, 1.0, "bilinear")
    return None


def _limit(ds: Dataset, n: int | None) -> Dataset:
    """The first ``n`` items. (Folders take ``n`` files spread over their classes before
    their scan: :func:`~sparseformer.data.scan.spread_indices`.)"""
    if n is None or n >= len(ds):
        return ds
    return Subset(ds, range(n))


def _check_data_dir(data_dir: Path, need_train: bool, files: str = "*.jpg") -> None:
    """Whether ``data_dir`` has the folder layout (``files`` names the kind when known: a
    folder without train/ and val/ has shown none)."""
    if not data_dir.exists():
        raise DataError(f"data directory {str(data_dir)!r} does not exist")
    if not data_dir.is_dir():
        raise DataError(f"--data-dir {str(data_dir)!r} is a file, not a directory")
    if not any(data_dir.iterdir()):
        raise DataError(
            f"data directory {str(data_dir)!r} is empty; it needs train/CLASS/<files> and "
            "val/CLASS/<files> sub-folders, images or videos (the DeiT/Swin ImageFolder layout)"
        )
    splits = ("train", "val") if need_train else ("val",)
    missing = [s for s in splits if not (data_dir / s).is_dir()]
    if missing and data_dir.name in ("train", "val") and (data_dir.parent / "val").is_dir():
        raise DataError(
            f"--data-dir {str(data_dir)!r} is a split folder; give the folder that holds "
            f"train/ and val/: --data-dir {str(data_dir.parent)!r}"
        )
    if missing:
        others = sorted(p.name for p in data_dir.iterdir() if p.is_dir() and not is_hidden(p.name))
        others = [name for name in others if name not in ("train", "val")]
        no_split = not any((data_dir / s).is_dir() for s in ("train", "val"))  # eval: train/
        flat = (  # class folders without splits (train/ and validation/ are splits)
            f"; its folders ({first_names(others, 3)}) go under train/ and val/, each with the "
            "same class folders"
            if others and no_split and not set(others) & set(_VAL_NAMES)
            else ""
        )
        if no_split:  # no split to tell images from videos by
            files = "<images or videos>"
        raise DataError(
            f"data directory {str(data_dir)!r} has no {' or '.join(m + '/' for m in missing)} "
            "folder; expected "
            f"DIR/train/CLASS/{files} and DIR/val/CLASS/{files} (the DeiT/Swin ImageFolder "
            f"layout){flat or _val_hint(data_dir, missing)}"
        )


_VAL_NAMES = ("validation", "valid", "test", "eval", "dev")  # what a val/ folder is called


def _val_hint(data_dir: Path, missing: list[str]) -> str:
    if missing != ["val"]:
        return ""
    named = [n for n in _VAL_NAMES if (data_dir / n).is_dir()]
    if named:  # the held-out split under another name
        return f"; to validate on {named[0]}/, link it as val/: ln -s {named[0]} {data_dir / 'val'}"
    return "; to hold some training files out, move a share of each class's (say 10%) to val/"


def _fashion_mnist_bundle(
    source: DataSource, train_tf: Callable, val_tf: Callable, need_train: bool
) -> DatasetBundle:
    train = fashion_mnist(True, source.data_root) if need_train else None
    val = fashion_mnist(False, source.data_root)
    if train is not None:
        train.transform = train_tf
    val.transform = val_tf
    return DatasetBundle(train, val, list(FASHION_CLASSES))


def _video_bundle(
    source: DataSource,
    preprocessing: Preprocessing,
    augmentation: Augmentation | None,
    need_train: bool,
    share_check: bool,
) -> DatasetBundle:
    """A video folder: train clips (3, T, S, S), val views (V, 3, T, S, S) or (3, T, S, S)."""
    _check_data_dir(Path(source.data_dir), need_train, files="*.mp4")
    spec = dataclasses.replace(
        source.video or ClipSpec(),
        size=preprocessing.img_size,
        crop_pct=preprocessing.crop_pct,
        mean=tuple(preprocessing.mean),
        std=tuple(preprocessing.std),
    )
    if augmentation is not None:  # the recipe's crop scale and flip, shared by all frames
        spec = dataclasses.replace(
            spec, scale=tuple(augmentation.scale), hflip=float(augmentation.hflip)
        )
    try:
        train, val = video_datasets(
            source.data_dir, spec, need_train, source.limit_train, source.limit_val,
            share_check,
        )  # fmt: skip
    except VideoDataError as exc:
        raise DataError(str(exc)) from exc
    skipped = (train.skipped if train is not None else []) + val.skipped
    return DatasetBundle(train, val, list(val.classes), skipped, video=True, clip_spec=spec)


def _image_bundle(
    source: DataSource, train_tf: Callable, val_tf: Callable, need_train: bool, share_check: bool
) -> DatasetBundle:
    """An ImageFolder: train (augmented) and val (eval transform) checked folders."""
    data_dir = Path(source.data_dir)
    _check_data_dir(data_dir, need_train)
    train = None
    if need_train:
        train = CheckedImageFolder(
            data_dir / "train", train_tf, limit=source.limit_train, share_check=share_check
        )
    classes = train.classes if train is not None else None
    val = CheckedImageFolder(
        data_dir / "val", val_tf, classes=classes, substitute=False, limit=source.limit_val,
        share_check=share_check,
    )  # fmt: skip
    skipped = (train.skipped if train is not None else []) + val.skipped
    return DatasetBundle(train, val, list(val.classes), skipped)


def build_datasets(
    source: DataSource,
    preprocessing: Preprocessing,
    augmentation: Augmentation | None,
    need_train: bool = True,
    share_check: bool = False,
) -> DatasetBundle:
    """Build the train (augmented) and val (eval transform) datasets of ``source``.

    Args:
        source: where the images are.
        preprocessing: input size and normalisation shared by train and val.
        augmentation: training augmentation; ``None`` trains on eval-transformed images.
        need_train: ``False`` builds only the val split (eval).
        share_check: split a folder's file check over the processes of a running
            ``torch.distributed`` group; every process must then call this (a collective).

    Raises:
        DataError: missing/empty folders, class folders without images, unknown data set.
    """
    train_tf = build_transform(preprocessing, augmentation)
    val_tf = build_transform(preprocessing, None)
    if source.dataset == "fashion-mnist":
        bundle = _fashion_mnist_bundle(source, train_tf, val_tf, need_train)
    elif source.data_dir is not None and is_video_folder(source.data_dir):
        bundle = _video_bundle(source, preprocessing, augmentation, need_train, share_check)
    else:
        bundle = _image_bundle(source, train_tf, val_tf, need_train, share_check)
    if bundle.train is not None and bundle.num_classes < 2:
        logger.warning(
            "the data has one class (%s): a model trained on it always answers that class and "
            "scores 100%%; add a class folder for anything else it should tell apart",
            bundle.class_names[0],
        )
    if source.data_dir is None:  # a built-in data set (shuffled already): its first N
        if bundle.train is not None:
            bundle.train = _limit(bundle.train, source.limit_train)
        bundle.val = _limit(bundle.val, source.limit_val)
    logger.info(
        "data %s: %s%d val %s, %s%s",
        source.describe(),
        f"{len(bundle.train)} train / " if bundle.train is not None else "",  # eval: val only
        len(bundle.val),
        "videos" if bundle.video else "images",
        counted(bundle.num_classes, "class"),
        _skipped_note(bundle),
    )
    return bundle
