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
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

__all__ = [
    "TEMPORARY_PATTERN",
    "WriteError",
    "temporary_for",
    "write_atomic",
    "write_text_atomic",
    "write_error",
    "output_target",
    "is_stream",
    "staging_file",
    "install",
    "staged",
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


def _create(tmp: Path) -> int:
    """A descriptor for writing ``tmp``, created anew as this process's own regular file:
    whatever stood at the name (a killed process's leftover, a symbolic link planted there)
    is removed, not followed (followed, the write overwrote the file the link named)."""
    try:
        tmp.unlink()
    except FileNotFoundError:
        pass
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    return os.open(tmp, flags | getattr(os, "O_BINARY", 0), 0o666)


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
        with os.fdopen(_create(tmp), "wb") as f:
            recording = _Recording(f)
            write(recording)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as exc:
        cause = recording.error if recording is not None and recording.error else exc
        raise write_error(path, cause) from exc
    finally:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a folder we may no longer write in: nothing more to do
            pass


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """:func:`write_atomic` for text (UTF-8)."""
    write_atomic(path, lambda f: f.write(text.encode("utf-8")))


def write_error(path: str | os.PathLike, cause: BaseException) -> WriteError:
    """The :class:`WriteError` of a failed write of ``path``: the file and the cause, in
    words a user acts on (a full disk, a file-size limit, a lost permission)."""
    code = getattr(cause, "errno", None) or errno.EIO
    return WriteError(code, _describe(Path(path), cause))


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
    """Where writing ``path`` lands: a symlink's target (the link stays), else ``path``; a
    stream (:func:`is_stream`, such as ``/dev/stdout``) is written through its own name."""
    path = Path(path)
    if is_stream(path) or not path.is_symlink():
        return path
    return Path(os.path.realpath(path))


def is_stream(path: str | os.PathLike) -> bool:
    """Whether ``path`` is written into rather than replaced: a device (``/dev/null``, a
    terminal), a pipe, or a name for a process's descriptors (``/dev/stdout``,
    ``/proc/self/fd/1``), which stands for whatever they are (a file the shell redirected
    to is appended to, not replaced)."""
    path = Path(path)
    if not path.exists():
        return False
    return bool(_DESCRIPTOR_NAME.match(str(path.absolute()))) or not (
        path.is_file() or path.is_dir()
    )


_DESCRIPTOR_NAME = re.compile(r"^/(dev/(stdout|stderr|fd/\d+)|proc/(self|\d+)/fd/\d+)$")


def staging_file(path: Path, suffix: str = "") -> Path:
    """Where to write the file that :func:`install` puts at ``path``: a hidden name beside it
    (one rename away), or for a stream a temporary file of the system's (``/dev`` is not ours
    to write in)."""
    if not is_stream(path):
        tmp = temporary_for(path)  # the name write_atomic uses, which a new run clears
        tmp = tmp.with_name(tmp.name + suffix)
        os.close(_create(tmp))  # ours, so that the writer opening it by name follows no link
        return tmp
    fd, name = tempfile.mkstemp(prefix=".sparseformer-", suffix=suffix)
    os.close(fd)
    return Path(name)


def install(tmp: Path, path: Path) -> None:
    """Put the finished temporary file ``tmp`` at ``path`` (an :func:`output_target`): renamed
    over it, or, for a stream (:func:`is_stream`), its bytes written into it: through this
    process's own descriptor where ``path`` names one (``/dev/stdout``), so that they share
    its position with what the process prints before and after. A file is synced to disk
    before the rename, as :func:`write_atomic` does: a power loss right after leaves the old
    file or the whole new one, never an empty one."""
    if not is_stream(path):
        _sync(tmp)
        os.replace(tmp, path)
        return
    fd = _own_descriptor(path)
    if fd is not None:
        sys.stdout.flush()
        sys.stderr.flush()
    with open(tmp, "rb") as src:
        with os.fdopen(os.dup(fd), "wb") if fd is not None else open(path, "ab") as dst:
            shutil.copyfileobj(src, dst)
    tmp.unlink()


def _sync(path: Path) -> None:
    """Flush ``path``'s data to the disk (the writer, ONNX or matplotlib, closed it unsynced)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def staged(path: Path, suffix: str = "") -> Iterator[Path]:
    """A :func:`staging_file` for ``path`` (an :func:`output_target`), for a writer that opens
    a file by name (ONNX, safetensors, matplotlib), :func:`install` -ed once the block is
    done; where the block or the install fails, it is removed and ``path`` left as it was.

    Raises:
        WriteError: for an ``OSError`` of the staging, the block or the install, naming
            ``path`` (not the temporary) and the cause.
    """
    try:
        tmp = staging_file(path, suffix)
    except OSError as exc:
        raise write_error(path, exc) from exc
    try:
        yield tmp
        install(tmp, path)
    except BaseException as exc:
        try:
            tmp.unlink(missing_ok=True)
        except OSError:  # a folder we may no longer write in: nothing more to do
            pass
        if isinstance(exc, OSError) and not isinstance(exc, WriteError):
            raise write_error(path, exc) from exc
        raise


def _own_descriptor(path: Path) -> int | None:
    """The descriptor of this process that ``path`` names (``/dev/stdout``: 1,
    ``/proc/self/fd/5``: 5), else ``None``."""
    match = _DESCRIPTOR_NAME.match(str(Path(path).absolute()))
    if match is None:
        return None
    name = match.group(0)
    if name in ("/dev/stdout", "/dev/stderr"):
        return 1 if name == "/dev/stdout" else 2
    pid = re.match(r"^/proc/(\d+)/", name)
    if pid is not None and int(pid.group(1)) != os.getpid():
        return None  # another process's descriptor: opened by name
    return int(name.rsplit("/", 1)[1])
