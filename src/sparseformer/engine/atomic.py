"""Writing a run's files so that a failure or a stop at any moment leaves the old file or the
new one, and a failed write says which file and why in one line.

Every file is written to a temporary name of its own process (``.NAME.tmp-PID``: two processes
never share one) and renamed over the file. A write that fails (no space left, a file-size
limit, a lost permission, a read-only file system) raises :class:`WriteError`, an ``OSError``
whose message names the file and the cause; the temporary is removed and the old file kept.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

__all__ = [
    "TEMPORARY_PATTERN",
    "WriteError",
    "temporary_for",
    "write_atomic",
    "write_text_atomic",
    "output_target",
    "is_stream",
    "install",
]

TEMPORARY_PATTERN = ".*.tmp-*"  # what temporary_for makes (a glob, for clearing stale ones)


class WriteError(OSError):
    """A run file that could not be written; ``str()`` names the file and the cause."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def temporary_for(path: str | os.PathLike) -> Path:
    """The temporary name this process writes ``path`` to before renaming it."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


class _Recording:
    """A binary file whose ``write`` remembers the ``OSError`` it raised: ``torch.save`` turns
    it into a ``RuntimeError`` that no longer says why (``enforce fail at inline_container``)."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f, self.error = f, None

    def write(self, data) -> int:
        try:
            return self._f.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self._f.flush()


def write_atomic(path: str | os.PathLike, write: Callable[[Any], None]) -> None:
    """Call ``write(f)`` on a binary file at :func:`temporary_for` ``(path)``, sync it and rename
    it over ``path``.

    Raises:
        WriteError: the write, the sync or the rename failed (the old ``path`` is untouched).
    """
    path = Path(path)
    tmp = temporary_for(path)
    recording = None
    try:
        with open(tmp, "wb") as f:
            recording = _Recording(f)
            write(recording)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        cause = recording.error if recording is not None and recording.error else exc
        code = getattr(cause, "errno", None) or errno.EIO
        raise WriteError(code, _describe(path, cause)) from exc
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a folder we may no longer write in: nothing more to do
            pass


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """:func:`write_atomic` for text (UTF-8)."""
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def _describe(path: Path, cause: BaseException) -> str:
    """``could not write PATH: CAUSE`` in words a user acts on."""
    code = getattr(cause, "errno", None)
    if code == errno.ENOSPC:
        why = "no space left on the device; free some space"
    elif code == errno.EFBIG:
        why = "file too large for this system's file-size limit (ulimit -f)"
    elif code in (errno.EACCES, errno.EPERM):
        why = "permission denied; restore write permission on the folder"
    elif code == errno.EROFS:
        why = "the file system is read-only"
    elif code == errno.EDQUOT:
        why = "disk quota exceeded"
    else:
        lines = str(cause).strip().splitlines()  # torch's: "[enforce fail at f.cc:1] . why"
        first = re.sub(r"^\[enforce fail at [^\]]*\][\s.]*", "", lines[0]) if lines else ""
        why = getattr(cause, "strerror", None) or first or type(cause).__name__
    return f"could not write {str(path)!r}: {why}"


def output_target(path: str | os.PathLike) -> Path:
    """Where writing ``path`` lands: a symlink's target (the link stays), else ``path``."""
    path = Path(path)
    return Path(os.path.realpath(path)) if path.is_symlink() else path


def is_stream(path: str | os.PathLike) -> bool:
    """Whether ``path`` exists as neither a regular file nor a folder: a device
    (``/dev/null``, a terminal) or a pipe, which is written into, never renamed over."""
    path = Path(path)
    return path.exists() and not path.is_file() and not path.is_dir()


def install(tmp: Path, path: Path) -> None:
    """Put the finished temporary file ``tmp`` at ``path`` (an :func:`output_target`): renamed
    over it, or, for a device or a pipe (:func:`is_stream`), its bytes written into it."""
    if not is_stream(path):
        os.replace(tmp, path)
        return
    with open(tmp, "rb") as src, open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    tmp.unlink()
