"""Folder scans that hold up at ImageNet and Kinetics scale.

Two things go wrong with a plain scan of a million files. Every training process checks every
file (8 GPUs: 8 x 1.3M header reads before the first step, in silence), and the list of samples,
kept as Python tuples, is copied page by page into every DataLoader worker as the workers touch
its reference counts (PyTorch issue #13246: about 200 bytes per sample and worker). Here:

- :func:`check_over_ranks` splits the per-file work over the processes of a running
  ``torch.distributed`` group when asked (each checks every W-th file) and gathers the
  results, with a progress bar on the first process;
- :func:`walk_files` lists a class folder as torchvision's image folders do (sub-folders,
  symlinked ones too), without hidden files (macOS's ``._clip.mp4``);
- :class:`~sparseformer.data.samples.SampleTable` keeps the samples found without a Python
  object per sample.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TypeVar

from tqdm.auto import tqdm

__all__ = [
    "DifferentItemsError",
    "ExtraClassesError",
    "check_over_ranks",
    "display_name",
    "is_hidden",
    "is_first_rank",
    "match_val_classes",
    "spelling_hint",
    "spread_indices",
    "walk_files",
    "warn_other_extensions",
    "warn_unscored",
]

logger = logging.getLogger(__name__)

T = TypeVar("T")
R = TypeVar("R")

# Folders smaller than this are checked without a progress bar or timing line.
_QUIET_BELOW = 2000


def _rank_and_world() -> tuple[int, int]:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_first_rank() -> bool:
    """Whether this process should log what every process found alike (rank 0, or no group)."""
    return _rank_and_world()[0] == 0


def check_over_ranks(
    items: Sequence[T], check: Callable[[T], R], what: str, share: bool = False
) -> list[R]:
    """``[check(item) for item in items]``, with ``share`` split over the processes of a
    running ``torch.distributed`` group and the results gathered, so that every process gets
    the full list for about ``1 / world_size`` of the time.

    Sharing is a collective: every process of the group must call this with ``share=True``
    (the training CLI does, as all its processes build the same data set). Processes that
    list different items (node-local copies that differ) all raise :class:`DifferentItemsError`.

    Args:
        items: the files (or anything with a ``str``) to check.
        check: a function of one item whose result pickles (a reason, a frame count).
        what: what the progress bar counts, e.g. ``"images checked"``.
        share: split the work over the process group, if there is one.
    """
    rank, world = _rank_and_world() if share else (0, 1)
    if world > 1:
        _require_same_items(items, world, what)
    mine = range(rank, len(items), world)
    show = rank == 0 and len(items) >= _QUIET_BELOW and is_first_rank()
    start = time.perf_counter()
    found: dict[int, R] = {}
    with tqdm(total=len(mine), desc=what, unit="file", disable=None if show else True) as bar:
        for i in mine:
            found[i] = check(items[i])
            bar.update()
    if world > 1:
        import torch.distributed as dist

        gathered: list[dict[int, R] | None] = [None] * world
        dist.all_gather_object(gathered, found)
        found = {i: r for part in gathered for i, r in part.items()}
    if show:
        logger.info(
            "%s: %d in %.1f s (%d process(es))",
            what,
            len(items),
            time.perf_counter() - start,
            world,
        )
    return [found[i] for i in range(len(items))]


class DifferentItemsError(ValueError):
    """The processes of a distributed run list different files."""


def _require_same_items(items: Sequence, world: int, what: str) -> None:
    """Raise :class:`DifferentItemsError` on every process unless all hold the same items in
    the same order (a count and digest compared): processes that train on different lists
    would pair their samples wrongly, and hang when their epochs differ in length."""
    import torch.distributed as dist

    digest = hashlib.sha256()
    for item in items:
        digest.update(str(item).encode("utf-8", "surrogatepass") + b"\0")
    mine = (len(items), digest.hexdigest())
    everyone: list[tuple[int, str] | None] = [None] * world
    dist.all_gather_object(everyone, mine)
    if any(other != mine for other in everyone):
        counts = ", ".join(f"{n} on rank {r}" for r, (n, _) in enumerate(everyone))
        raise DifferentItemsError(
            f"{what}: the processes see different files ({counts}); every machine needs the "
            "same data at the same path"
        )


def is_hidden(name: str) -> bool:
    """Whether a file or folder name is not data: a dot-name (``.DS_Store``, macOS's
    ``._photo.jpg``, ``.ipynb_checkpoints``), the ``__MACOSX`` folder of a zip made on macOS,
    which holds a resource fork for every file, or Windows's ``Thumbs.db`` and ``desktop.ini``."""
    return name.startswith(".") or name.lower() in ("__macosx", "thumbs.db", "desktop.ini")


_EXAMPLES = {"images": ("ImageFolder", "cat", "jpg"), "videos": ("video folder", "jumping", "mp4")}


def class_folders(
    root: Path, media: str, error: type[Exception] = ValueError, extensions: Sequence[str] = ()
) -> list[str]:
    """Sorted class-folder names of a split folder ``root`` (hidden ones left out:
    :func:`is_hidden`); ``media`` ("images" or "videos") words the messages. Files of
    ``extensions`` directly in ``root``, in no class folder, are counted in a warning.

    Raises:
        error: ``root`` is missing or holds no class folders; the message shows the layout.
    """
    layout, example, ext = _EXAMPLES[media]
    if not root.is_dir():
        raise error(
            f"{str(root)!r} does not exist; a data folder has the {layout} layout "
            f"DIR/train/CLASS/*.{ext} and DIR/val/CLASS/*.{ext}"
        )
    entries = [p for p in root.iterdir() if not is_hidden(p.name)]
    broken = sorted(p.name for p in entries if p.is_symlink() and not p.exists())
    if broken and is_first_rank():  # a class on a drive not mounted: not left out unsaid
        logger.warning(
            "%s in %s %s a symbolic link to nothing, left out; if it is a class folder, mount "
            "or fix what it points to", first_names(broken, 3), root,
            "is" if len(broken) == 1 else "are",
        )  # fmt: skip
    found = sorted(p.name for p in entries if p.is_dir())
    if not found:
        raise error(
            f"{str(root)!r} has no class folders; put each class's {media} in its own "
            f"sub-folder, e.g. {root / example}/001.{ext}"
        )
    spellings = Counter(_loosely(n) for n in found)
    alike = [n for n in found if spellings[_loosely(n)] > 1]
    if alike and is_first_rank():  # two classes a reader takes for one (NFD from macOS, case)
        logger.warning(
            "class folders of %s %s differ only in Unicode normalisation, letter case or "
            "spaces, and are different classes here; merge or rename them",
            root, ", ".join(ascii(n) for n in alike[:6]),  # ascii: 'cafe\u0301' is NFD
        )  # fmt: skip
    loose = [
        p for p in root.iterdir()
        if p.suffix.lower() in extensions and p.is_file() and not is_hidden(p.name)
    ]  # fmt: skip
    if loose and is_first_rank():  # a class's files one level too high: said, not dropped unseen
        logger.warning(
            "%s directly in %s %s in no class folder and left out (e.g. %s); each class's %s "
            "go in its own sub-folder, e.g. %s/001.%s",
            counted(len(loose), "file"), root, "is" if len(loose) == 1 else "are",
            loose[0].name, media, root / example, ext,
        )  # fmt: skip
    return found


def counted(n: int, noun: str) -> str:
    """``"1 epoch"``, ``"3 epochs"``, ``"2 classes"``: a count and its noun for a message."""
    if n == 1:
        return f"{n} {noun}"
    return f"{n} {noun}{'es' if noun.endswith(('s', 'x', 'sh')) else 's'}"


def first_names(names: Sequence[str], shown: int = 5, *, quote: bool = True) -> str:
    """``names`` for a message: the first ``shown`` (quoted by default), and ", ..." only
    where there are more."""
    listed = [repr(str(n)) if quote else str(n) for n in list(names)[:shown]]
    return ", ".join(listed) + (", ..." if len(names) > shown else "")


def walk_files(
    folder: str | Path, extensions: Sequence[str], ignored: list[Path] | None = None
) -> Iterator[Path]:
    """Files under ``folder`` whose suffix (any case) is one of ``extensions``, folder by
    folder in name order, sub-folders included and followed through symlinks (each real
    folder once; a link back up to a folder that holds ``folder`` is not followed, as it
    would list other folders' files as this one's); hidden files and folders (``.name``, such
    as macOS's ``._clip.mp4`` resource forks) are left out. Lazy: stop early for a sample.
    Files with other suffixes are appended to ``ignored`` when it is given (see
    :func:`warn_other_extensions`)."""
    suffixes = tuple(e.lower() for e in extensions)
    start = os.path.join(os.path.realpath(folder), "")
    seen: set[str] = set()
    for top, dirs, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(top)
        if real in seen or start.startswith(os.path.join(real, "")) and real != start[:-1]:
            dirs[:] = []  # seen already, or a link back up to a folder holding ``folder``
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not is_hidden(d))
        for name in sorted(files):
            if not is_hidden(name) and name.lower().endswith(suffixes):
                yield Path(top, name)
            elif ignored is not None and not is_hidden(name):
                ignored.append(Path(top, name))


def warn_other_extensions(ignored: Sequence[Path], kind: str, extensions: Sequence[str]) -> None:
    """Log one line (first rank only) on the files :func:`walk_files` left out for their
    extension, when there are any: how many, of which suffixes, which are read (``kind``:
    "image" or "video")."""
    if not ignored or not is_first_rank():
        return
    by_suffix = Counter(p.suffix.lower() or "(none)" for p in ignored)
    shown = ", ".join(f"{suffix} {n}" for suffix, n in by_suffix.most_common(6))
    logger.warning(
        "%d file(s) left out as not %s files by their extension (%s; e.g. %s); %s files are "
        "read by extension: %s",
        len(ignored), kind, shown, ignored[0], kind, ", ".join(extensions),
    )  # fmt: skip


class ExtraClassesError(ValueError):
    """Validation class folders that training lacks."""


def match_val_classes(root: Path, found: list[str], classes: Sequence[str], kind: str) -> None:
    """Check a validation folder's class folders ``found`` against the training ``classes``:
    a subset is fine (the missing classes are logged, and not scored); a folder training
    lacks raises :class:`ExtraClassesError` (``kind``: "images" or "videos", for its message).
    """
    extra = sorted(set(found) - set(classes))
    if extra:
        raise ExtraClassesError(
            f"class folders of {str(root)!r} include {first_names(extra)}, which are not among "
            f"the training classes ({first_names(classes, 10)}); every validation class needs "
            "training "
            f"{kind}{spelling_hint(extra, classes)}"
        )
    missing = sorted(set(classes) - set(found))
    if missing and is_first_rank():
        logger.warning(
            "%s has no folder for %d training class(es) (%s); they are not scored",
            root, len(missing), first_names(missing, quote=False),
        )  # fmt: skip


def spelling_hint(names: Sequence[str], known: Sequence[str]) -> str:
    """A hint for a message on ``names`` missing from ``known``, when some differ from a known
    name only in Unicode normalisation (an accented name copied from macOS is decomposed,
    NFD; typed elsewhere it is composed, NFC), or only in letter case or surrounding spaces:
    two folder names a reader takes for one."""
    forms = {unicodedata.normalize("NFC", k) for k in known}
    alike = [n for n in names if unicodedata.normalize("NFC", n) in forms]
    if alike:
        return (
            f" ({alike[:3]} differ from those names only in Unicode normalisation, NFD against "
            "NFC, as names copied from macOS do; rename the folders so both splits spell them "
            "alike, e.g. with convmv -f utf8 -t utf8 --nfc -r --notest DIR)"
        )
    loose = {_loosely(k): k for k in known}
    near = [(n, loose[_loosely(n)]) for n in names if _loosely(n) in loose]
    if not near:
        return ""
    shown = ", ".join(f"{n!r} for {k!r}" for n, k in near[:3])
    return (
        f" ({shown}: names are matched exactly, letter case and spaces included; rename the "
        "folders so both splits spell them alike)"
    )


def _loosely(name: str) -> str:
    return " ".join(unicodedata.normalize("NFC", name).split()).casefold()


def display_name(name: str) -> str:
    """``name`` as text any font, terminal or file takes: the bytes of a file name that were
    not UTF-8 (a folder zipped on Windows: Python keeps them as surrogate escapes) become
    U+FFFD, the replacement character."""
    return name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def warn_unscored(root: Path, folders: Sequence[str], why: str) -> None:
    """Log, on the first process, validation class folders whose classes are not scored
    (``why``: "hold no images", ...)."""
    if folders and is_first_rank():
        logger.warning(
            "%s: class folder(s) %s %s; those classes are not scored",
            root, ", ".join(folders[:5]), why,
        )  # fmt: skip


def spread_indices(total: int, limit: int | None) -> range | list[int]:
    """``limit`` indices evenly spaced over ``range(total)`` (all of them without a limit): a
    folder lists its files class by class, and its first ``limit`` could all be cats."""
    if limit is None or limit >= total:
        return range(total)
    return [i * total // limit for i in range(limit)]
