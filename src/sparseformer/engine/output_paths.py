"""Output paths checked before any work: a command that would fail to write its result at the
end (a folder given for a file, a parent that is a file, a folder it may not write in, a link
to a file of another kind) says so before it starts."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from sparseformer.engine.atomic import is_stream, output_target

__all__ = ["check_output_path"]


# suffixes of files a folder is never named with: a folder flag given one was meant as a file
_FILE_SUFFIXES = (".png", ".jpg", ".jpeg", ".gif", ".pdf", ".svg", ".json", ".csv", ".pt")


def check_output_path(
    path: str | os.PathLike,
    flag: str,
    *,
    folder: bool = False,
    kinds: tuple[str, ...] | None = None,
) -> None:
    """Refuse, before any work, an output path that could not be written at the end: a
    file where a folder is wanted (or the other way round), a parent that is a file, or a
    folder this process may not write in; and with ``kinds`` (the suffixes of what is
    written), a symbolic link to a file of another kind (``out.onnx -> best.pth``), which
    writing through the link would replace (a cache's blob, without a suffix, is written).

    Raises:
        ValueError: naming ``flag``, the path and the problem.
    """
    path = Path(path)
    target = output_target(path)
    if kinds is not None and target != path and target.suffix.lower() not in ("", *kinds):
        raise ValueError(
            f"{flag} {str(path)!r} is a link to {str(target)!r}, a file of another kind, which "
            "writing through the link would replace; give a name that is not such a link"
        )
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a file; give a folder")
    if folder and not path.exists() and path.suffix.lower() in _FILE_SUFFIXES:
        bare = str(path.with_suffix(""))
        raise ValueError(f"{flag} {str(path)!r} names a file, but {flag} is the folder the "
                         f"files go in: give a folder, e.g. {bare!r}")  # fmt: skip
    if not folder and path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a folder; give a file path")
    if not folder and is_stream(path):  # /dev/stdout, /dev/null, a pipe: written into
        if not os.access(path, os.W_OK):
            raise ValueError(f"{flag} {str(path)!r}: no permission to write to it")
        return
    for parent in (path, *path.parents) if folder else path.parents:
        if parent.exists():  # the nearest existing folder: the rest will be created in it
            if not parent.is_dir():
                raise ValueError(f"{flag} {str(path)!r}: {str(parent)!r} is a file, not a folder")
            why = _cannot_write_in(parent)
            if why is not None:
                raise ValueError(f"{flag} {str(path)!r}: cannot write in {str(parent)!r} ({why})")
            return


def _cannot_write_in(folder: Path) -> str | None:
    """Why no file can be made in ``folder`` (None: one can), found by making and removing
    one: permissions alone do not tell for root, a read-only mount or /proc and /sys."""
    try:
        fd, probe = tempfile.mkstemp(prefix=".sparseformer-probe-", dir=folder)
    except OSError as exc:
        return exc.strerror or type(exc).__name__
    os.close(fd)
    os.unlink(probe)
    return None
