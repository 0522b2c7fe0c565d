"""The DeiT/Swin ImageFolder layout (``DIR/train/CLASS/*``, ``DIR/val/CLASS/*``), checked.

Built on torchvision's ``DatasetFolder`` machinery; what we add is the checking a user needs:
clear errors for a missing or empty folder and for a class folder without images, unreadable
files skipped and counted (never a crash in the middle of an epoch), and every image converted
to 8-bit RGB whatever its mode.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torchvision.datasets.folder import make_dataset

from sparseformer.data.images import IMAGE_EXTENSIONS, READ_ERRORS, check_image_header, open_rgb
from sparseformer.data.loader import SharedCount

__all__ = ["DataError", "CheckedImageFolder", "find_classes"]

logger = logging.getLogger(__name__)


def _is_image_file(path: str) -> bool:
    """An image extension, and not a hidden file (macOS's ``._photo.jpg`` resource forks)."""
    return path.lower().endswith(IMAGE_EXTENSIONS) and not Path(path).name.startswith(".")


class DataError(ValueError):
    """A data set that cannot be used as given; the message says what to do."""


def find_classes(split_dir: Path) -> list[str]:
    """Sorted class-folder names of ``split_dir`` (hidden folders ignored)."""
    if not split_dir.is_dir():
        raise DataError(
            f"{str(split_dir)!r} does not exist; --data-dir expects the ImageFolder layout "
            "DIR/train/CLASS/*.jpg and DIR/val/CLASS/*.jpg"
        )
    classes = sorted(p.name for p in split_dir.iterdir() if p.is_dir() and not p.name[0] == ".")
    if not classes:
        raise DataError(
            f"{str(split_dir)!r} has no class folders; put each class's images in its own "
            f"sub-folder, e.g. {split_dir / 'cat'}/001.jpg"
        )
    return classes


class CheckedImageFolder(Dataset):
    """Images under ``root/CLASS/``, labelled by the sorted class-folder index.

    Args:
        root: the split folder (for example ``DIR/train``).
        transform: applied to the RGB PIL image.
        classes: class names to use (so that val follows train's order); default: the folders.
        check_files: read every file's header once and skip the unreadable ones (counted in
            :attr:`skipped`).
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
    ) -> None:
        self.root = Path(root)
        self.transform = transform
        found = find_classes(self.root)
        if classes is not None and found != list(classes):
            missing = sorted(set(classes) - set(found))
            extra = sorted(set(found) - set(classes))
            raise DataError(
                f"class folders of {str(self.root)!r} differ from the training classes "
                f"(missing: {missing or 'none'}, extra: {extra or 'none'}); train and val "
                "need the same class folders"
            )
        self.classes = found
        self.class_to_idx = {c: i for i, c in enumerate(found)}
        samples = make_dataset(
            str(self.root), self.class_to_idx, is_valid_file=_is_image_file, allow_empty=True
        )
        counts = Counter(label for _, label in samples)
        empty = [c for c in found if counts[self.class_to_idx[c]] == 0]
        if empty:
            raise DataError(
                f"class folder(s) {', '.join(repr(str(self.root / c)) for c in empty[:5])} "
                f"have no images (looked for {', '.join(IMAGE_EXTENSIONS)}); add images or "
                "remove the folder"
            )
        self.skipped: list[tuple[str, str]] = []
        if check_files:
            kept = []
            for path, label in samples:
                reason = check_image_header(path)
                if reason is None:
                    kept.append((path, label))
                else:
                    self.skipped.append((path, reason))
            samples = kept
        if not samples:
            raise DataError(f"no readable images under {str(self.root)!r}")
        readable = Counter(label for _, label in samples)
        unreadable = [c for c in found if readable[self.class_to_idx[c]] == 0]
        if unreadable:  # a class the model would be asked to learn, or be scored on, blind
            folder = self.root / unreadable[0]
            path, why = next(
                (p, w) for p, w in self.skipped if Path(p).is_relative_to(folder)
            )  # an example from the class named first
            raise DataError(
                f"class folder(s) {', '.join(repr(str(self.root / c)) for c in unreadable[:5])} "
                f"have no readable images (every file failed its check, e.g. {path}: {why}); "
                "replace them or remove the folder"
            )
        if self.skipped:
            first, why = self.skipped[0]
            logger.warning(
                "%s: skipped %d unreadable file(s) (first: %s: %s)",
                self.root,
                len(self.skipped),
                first,
                why,
            )
        self.samples = samples
        self.targets = [label for _, label in samples]
        self._failed = SharedCount()
        self.substitute = substitute

    @property
    def failed_loads(self) -> int:
        return int(self._failed)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        for attempt in range(len(self.samples)):
            path, label = self.samples[(index + attempt) % len(self.samples)]
            try:
                img = open_rgb(path)
            except READ_ERRORS as exc:
                self._failed.add()
                if not self.substitute:  # evaluation: leave it out (see loader.collate)
                    logger.warning("could not decode %s (%s); left out", path, exc)
                    return None, label
                logger.warning("could not decode %s (%s); using the next image instead", path, exc)
                continue
            return (self.transform(img) if self.transform else img), label
        raise DataError(f"none of the images under {str(self.root)!r} could be decoded")
