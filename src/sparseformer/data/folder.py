"""The DeiT/Swin ImageFolder layout (``DIR/train/CLASS/*``, ``DIR/val/CLASS/*``), checked.

torchvision's ``ImageFolder`` classes and sample order (sub-folders followed through symlinks,
each real folder once; hidden files and folders left out); what we add is the checking a user
needs: clear errors for a missing or empty folder and for a class folder without images, unreadable
files skipped and counted (never a crash in the middle of an epoch), and every image converted
to 8-bit RGB whatever its mode. The header check is shared out over the processes of a
distributed run, and the sample list is stored compactly (:mod:`sparseformer.data.scan`).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset

from sparseformer.data.images import IMAGE_EXTENSIONS, READ_ERRORS, check_image_header, open_rgb
from sparseformer.data.loader import DecodeFailures
from sparseformer.data.samples import RowView, SampleTable
from sparseformer.data.scan import (
    DifferentItemsError,
    ExtraClassesError,
    check_over_ranks,
    class_folders,
    counted,
    first_names,
    is_first_rank,
    match_val_classes,
    spread_indices,
    walk_files,
    warn_other_extensions,
    warn_unscored,
)

__all__ = ["DataError", "CheckedImageFolder", "find_classes"]

logger = logging.getLogger(__name__)


def _image_row(table: SampleTable, i: int) -> tuple[str, int]:
    return table.path(i), table.value("label", i)


class DataError(ValueError):
    """A data set that cannot be used as given; the message says what to do."""


def find_classes(split_dir: Path) -> list[str]:
    """Sorted class-folder names of ``split_dir``, hidden folders left out (see
    :func:`~sparseformer.data.scan.class_folders`).

    Raises:
        DataError: the folder is missing or holds no class folders.
    """
    return class_folders(Path(split_dir), "images", DataError, IMAGE_EXTENSIONS)


class CheckedImageFolder(Dataset):
    """Images under ``root/CLASS/``, labelled by the sorted class-folder index.

    Args:
        root: the split folder (for example ``DIR/train``).
        transform: applied to the RGB PIL image.
        classes: class names to use (so that val follows train's order and labels); default:
            the folders. The folder may hold a subset of them (a class without a folder is
            not scored); a folder not among them is an error. In evaluation
            (``substitute=False``) a class folder without images, or without readable ones, is
            logged and not scored; in training it is an error.
        check_files: read every file's header once and skip the unreadable ones (counted in
            :attr:`skipped`).
        share_check: split that check over the processes of a running ``torch.distributed``
            group, each checking its share; a collective: every process must build the data
            set (the training CLI does).
        limit: use only this many files, evenly spread over the folder (so every class keeps
            its share), chosen before the check: fewer when some of them are unreadable.
        substitute: what happens to a file that passes the header check but fails to decode
            (a truncated download): replaced by the next readable image (training: a long run
            never stops on one bad file), or, with ``False`` (evaluation), returned as
            ``(None, label)``, which :func:`~sparseformer.data.loader.collate` leaves out, so
            no image is scored twice. Logged either way; :attr:`failed_loads` counts them, over
            this process and its DataLoader workers.

    Items are ``(image, label)``.
    """

    def __init__(
        self,
        root: str | Path,
        transform: Callable | None = None,
        classes: list[str] | None = None,
        check_files: bool = True,
        substitute: bool = True,
        limit: int | None = None,
        share_check: bool = False,
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        found = find_classes(self.root)
        if classes is not None:  # val: the training classes, or some of them
            try:
                match_val_classes(self.root, found, classes, "images")
            except ExtraClassesError as exc:
                raise DataError(str(exc)) from None
            found = [c for c in classes if c in found]
        self.classes = list(classes) if classes is not None else found
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}
        # torchvision's make_dataset order (folder by folder, then file name), without its
        # hidden folders and without a symlink loop's endless copies of other classes' images
        ignored: list[Path] = []  # other extensions: said, not silently lost
        samples = [
            (str(path), self.class_to_idx[name])
            for name in found
            for path in sorted(
                walk_files(self.root / name, IMAGE_EXTENSIONS, ignored),
                key=lambda p: (str(p.parent), p.name),
            )
        ]
        warn_other_extensions(ignored, "image", IMAGE_EXTENSIONS)
        counts = Counter(label for _, label in samples)
        empty = [c for c in found if counts[self.class_to_idx[c]] == 0]
        if empty and not substitute:  # evaluation: an empty folder is a class not scored
            warn_unscored(self.root, empty, "hold no images")
        elif empty:
            raise DataError(
                f"class folder(s) {', '.join(repr(str(self.root / c)) for c in empty[:5])} "
                f"have no images (looked for {', '.join(IMAGE_EXTENSIONS)}); add images or "
                "remove the folder"
            )
        chosen = [samples[i] for i in spread_indices(len(samples), limit)]
        kept = {label for _, label in chosen}
        cut = [
            c for c in found if counts[self.class_to_idx[c]] and self.class_to_idx[c] not in kept
        ]
        warn_limit_cut(self.root, limit, cut)
        self.skipped: list[tuple[str, str]] = []
        samples = self._check(chosen, share_check) if check_files else chosen
        if not samples:
            raise DataError(f"no readable images under {str(self.root)!r}")
        self._check_readable_classes(found, chosen, samples, val=not substitute)
        if self.skipped and is_first_rank():
            first, why = self.skipped[0]
            logger.warning(
                "%s: skipped %d unreadable file(s) (first: %s: %s)",
                self.root,
                len(self.skipped),
                first,
                why,
            )
        self._table = SampleTable(
            [path for path, _ in samples], label=[label for _, label in samples]
        )
        # a file that fails to decode is named once, not per epoch, and a class all of whose
        # files fail is said, not trained on other classes' images in silence
        self._failed = DecodeFailures(self.classes, self.root, train=substitute)
        self.substitute = substitute

    def _check(self, chosen: list[tuple[str, int]], share_check: bool) -> list[tuple[str, int]]:
        """The chosen files whose header reads; the others go to :attr:`skipped`."""
        try:
            reasons = check_over_ranks(
                [path for path, _ in chosen],
                check_image_header,
                f"{self.root}: images checked",
                share=share_check,
            )
        except DifferentItemsError as exc:
            raise DataError(str(exc)) from None
        self.skipped = [(path, why) for (path, _), why in zip(chosen, reasons) if why]
        return [sample for sample, why in zip(chosen, reasons) if why is None]

    def _check_readable_classes(
        self, found: list[str], chosen: list, samples: list, *, val: bool
    ) -> None:
        """A class whose chosen files all failed their check: not scored (``val``), else an
        error naming an example."""
        tried, readable = (Counter(label for _, label in x) for x in (chosen, samples))
        unreadable = [
            c for c in found if tried[self.class_to_idx[c]] and not readable[self.class_to_idx[c]]
        ]
        if unreadable and val:  # val: a class not scored, as an empty one
            warn_unscored(self.root, unreadable, "have no readable images")
        elif unreadable:  # a class the model would be asked to learn blind
            folder = self.root / unreadable[0]
            path, why = next(
                (p, w) for p, w in self.skipped if Path(p).is_relative_to(folder)
            )  # an example from the class named first
            raise DataError(
                f"class folder(s) {', '.join(repr(str(self.root / c)) for c in unreadable[:5])} "
                f"have no readable images (every file failed its check, e.g. {path}: {why}); "
                "replace them or remove the folder"
            )

    @property
    def samples(self) -> RowView:
        """``(path, label)`` of every usable image, as torchvision's ``ImageFolder`` has it: a
        read-only sequence over the compact table. Assign a list to take a subset."""
        return RowView(self._table, _image_row)

    @samples.setter
    def samples(self, rows: Sequence[tuple[str, int]]) -> None:
        rows = list(rows)
        self._table = SampleTable([str(p) for p, _ in rows], label=[int(y) for _, y in rows])

    @property
    def targets(self) -> list[int]:
        """The label of every usable image. Assign a list of as many to relabel them."""
        return self._table.column("label").tolist()

    @targets.setter
    def targets(self, labels: Sequence[int]) -> None:
        labels = [int(y) for y in labels]
        if len(labels) != len(self):
            raise ValueError(f"{len(labels)} targets for {len(self)} samples; set samples first")
        self._table = SampleTable([self._table.path(i) for i in range(len(self))], label=labels)

    @property
    def failed_loads(self) -> int:
        return int(self._failed)

    def __len__(self) -> int:
        return len(self._table)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for attempt in range(len(self)):
            row = (index + attempt) % len(self)
            path, label = self._table.path(row), self._table.value("label", row)
            try:
                img = open_rgb(path)
            except READ_ERRORS as exc:
                first = self._failed.note(path, label, self._table.column("label"))
                say = logger.warning if first else logger.debug
                if not self.substitute:  # evaluation: leave it out (see loader.collate)
                    say("could not decode %s (%s); left out", path, exc)
                    return None, label
                say("could not decode %s (%s); using the next image instead", path, exc)
                continue
            return (self.transform(img) if self.transform else img), label
        raise DataError(f"none of the images under {str(self.root)!r} could be decoded")


def warn_limit_cut(root: Path, limit: int | None, cut: Sequence[str]) -> None:
    """Log (first rank only) the classes with files that a ``--limit-*`` of ``limit`` files
    chose none of: a limit below one file per class."""
    if cut and is_first_rank():
        logger.warning(
            "%s: the limit of %s leaves %s without any (%s); give a larger limit to keep "
            "every class", root, counted(limit, "file"), counted(len(cut), "class"),
            first_names(cut, quote=False),
        )  # fmt: skip
