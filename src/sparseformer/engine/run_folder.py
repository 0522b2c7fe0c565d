"""The files of a run folder: which a run writes, which a killed run leaves behind, which one a
resumed run continues from, and what the finished run's summary says.

A run folder holds ``last.pt`` and ``best.pt`` (checkpoints), ``metrics.jsonl``, ``metrics.png``,
``summary.json`` and ``skipped_files.tsv``; each is written to a temporary name of its own
process and renamed (:mod:`sparseformer.engine.atomic`), so a stop at any moment leaves either the
old file or the new one (and a temporary, removed by the next run).

A folder belongs to one run at a time: :class:`RunFolderLock` holds an exclusive ``flock`` on
``.lock``, which names the holder (PID, host, since when) and is removed when the run ends. The
kernel drops the lock when its process ends, however it ends, so a run killed with -9 blocks
nobody; the next run finds the file still there, takes the folder over and logs it.
"""

from __future__ import annotations

import csv
import functools
import io
import json
import logging
import os
import re
import socket
import stat
import time
from pathlib import Path
from typing import Any

from sparseformer.engine.atomic import (
    TEMPORARY_PATTERN,
    write_atomic,
    write_text_atomic,
)
from sparseformer.engine.checkpoint import BEST, LAST, link_atomic

__all__ = [
    "SKIPPED_LIST",
    "RUN_FILES",
    "LOCK_FILE",
    "TENSORBOARD",
    "RunFolderBusy",
    "RunFolderLock",
    "check_run_folder_free",
    "prepare_output",
    "clear_old_run",
    "write_skipped_list",
    "write_summary",
    "summary_epochs",
    "find_resume_checkpoint",
    "earlier_folder",
    "carry_best",
    "refuse_overwriting_a_run",
]

logger = logging.getLogger(__name__)

SKIPPED_LIST = "skipped_files.tsv"  # every file the scan could not read, with the reason
RUN_FILES = (LAST, BEST, "metrics.jsonl", "metrics.png", "summary.json", SKIPPED_LIST)
LOCK_FILE = ".lock"  # held by the run writing in the folder; names it
TENSORBOARD = "tensorboard"  # the folder of --tensorboard's events
# How long a run waits for the forked data-loading workers of a killed run (-9) to end and
# let go of the lock: torch's workers check every 5 s that their parent lives.
WORKERS_GRACE = 30.0


class RunFolderBusy(ValueError):
    """Another live run holds the folder; the message names it and the ways on."""


class RunFolderLock:
    """An exclusive hold on a run folder for as long as it is open (a context manager).

    Raises (on entering):
        RunFolderBusy: another live process holds it (named: PID, host, since when).
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self._fd: int | None = None

    def __enter__(self) -> RunFolderLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            import fcntl  # POSIX only
        except ImportError:  # Windows: the run goes on, its folder not held against another
            _say_unlocked(self.folder)
            return
        path = self.folder / LOCK_FILE
        deadline = None  # set once the holder is found ended
        while True:
            fd = _open_lock(path)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_holder(fd)
                os.close(fd)
                if _holder_ended(holder):  # its forked data-loading workers hold the lock
                    deadline = deadline or self._wait_for_workers(holder)
                    if time.monotonic() < deadline:
                        time.sleep(0.25)
                        continue
                    raise RunFolderBusy(
                        f"--output {str(self.folder)!r} was held by a run that has ended "
                        f"({holder}), and its data-loading workers still hold it after "
                        f"{WORKERS_GRACE:.0f} s: end them (they are its PID's children), or "
                        "choose another folder"
                    ) from None
                who = f" ({holder})" if holder else " (starting at this moment)"
                raise RunFolderBusy(
                    f"--output {str(self.folder)!r} is in use by another run{who}; wait for it "
                    "to finish, stop it, or choose another folder"
                ) from None
            try:  # the file its holder removed on release, just before we locked it: again
                if os.stat(path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        left = _read_holder(fd)
        if left:  # a clean end removes the file: this run was killed (-9, power loss)
            logger.warning("%s: taking over from a run that is gone (%s)", self.folder, left)
        since = time.strftime("%Y-%m-%d %H:%M:%S %Z")
        record = f"PID {os.getpid()} on host {socket.gethostname()} since {since}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, record.encode(), 0)
        self._fd = fd

    def _wait_for_workers(self, holder: str) -> float:
        """Say that this run waits for an ended run's workers; the time to give up at."""
        logger.info(
            "%s: the run that held it has ended (%s); waiting for its data-loading workers "
            "to let go (each sees its parent gone within about 5 s)", self.folder, holder,
        )  # fmt: skip
        return time.monotonic() + WORKERS_GRACE

    def release(self) -> None:
        """Remove the lock file (a clean end: nothing to take over) and let go."""
        if self._fd is None:
            return
        try:
            (self.folder / LOCK_FILE).unlink(missing_ok=True)  # while still holding it
        except OSError:  # a folder gone read-only: the next run logs a take-over, no more
            pass
        os.close(self._fd)  # closing the descriptor drops the flock
        self._fd = None


@functools.cache
def _say_unlocked(folder: Path) -> None:
    """Once per folder and process (the check before a run and the run's own lock)."""
    logger.warning("%s is not locked: this system has no flock (POSIX)", folder)


def _holder_ended(holder: str) -> bool:
    """Whether the lock file names a process of this host that no longer runs."""
    found = re.match(r"PID (\d+) on host (\S+)", holder)
    if found is None or found.group(2) != socket.gethostname():
        return False
    try:
        os.kill(int(found.group(1)), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, another user's
        return False
    return False


def _open_lock(path: Path) -> int:
    """The lock file, opened or created as a regular file of its own. A symbolic link in its
    place (a run folder copied with one, or planted) is removed, not followed: followed, the
    lock's record overwrote the file it pointed to.

    Raises:
        RunFolderBusy: the name holds something that is not a regular file (a pipe).
    """
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags, 0o644)
    except OSError:
        if not path.is_symlink():
            raise
        logger.warning("%s: a symbolic link (to %r) stood for the run's lock file; removed, not "
                       "followed", path, os.readlink(path))  # fmt: skip
        path.unlink()
        fd = os.open(path, flags, 0o644)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise RunFolderBusy(f"{str(path)!r} is not a regular file: remove it, or choose another "
                            "--output")  # fmt: skip
    return fd


def _read_holder(fd: int) -> str:
    """What the lock file says of its holder, printable characters only (it is data, and a
    planted one could hold terminal escapes)."""
    try:
        text = os.pread(fd, 512, 0).decode("utf-8", "replace").strip()
    except OSError:
        return ""
    return "".join(c if c.isprintable() else "?" for c in text)


def check_run_folder_free(folder: str | os.PathLike) -> None:
    """Refuse, before any work, a folder another live run holds (taking and dropping the lock).

    Raises:
        RunFolderBusy: naming the holder.
    """
    if Path(folder).is_dir():
        with RunFolderLock(folder):
            pass


def prepare_output(out: Path) -> None:
    """Create the run folder and remove the temporaries a run killed while writing left (call
    while holding its :class:`RunFolderLock`: no other process writes there then)."""
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(TEMPORARY_PATTERN):  # left by a run killed while writing
        stale.unlink()


def clear_old_run(out: Path) -> None:
    """Remove the checkpoints, metrics and summary of an earlier run in ``out``, and its
    TensorBoard events (a new run's curves would be drawn over the old ones)."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    for events in (out / TENSORBOARD).glob("events.out.tfevents.*"):
        events.unlink()


def write_skipped_list(path: Path, skipped: list[tuple[str, str]]) -> None:
    """``path``: one ``file<TAB>reason`` row per file the folder scan left out (atomically;
    tab-separated CSV, quoted where a name holds a tab, a newline or a quote); removed when
    nothing was skipped, so that it never describes another scan."""
    if not skipped:
        path.unlink(missing_ok=True)
        return
    text = io.StringIO(newline="")
    out = csv.writer(text, delimiter="\t", lineterminator="\n")  # quotes a tab in a name
    out.writerow(["file", "reason"])
    out.writerows((file, " ".join(str(reason).split())) for file, reason in skipped)
    data = text.getvalue().encode("utf-8", errors="surrogateescape")
    write_atomic(path, lambda f: f.write(data))


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """``out/summary.json``, written atomically."""
    write_text_atomic(out / "summary.json", json.dumps(summary, indent=2) + "\n")


def summary_epochs(output: Path) -> int | None:
    """The epochs ``OUTPUT/summary.json`` reports, ``None`` when it is missing or unreadable."""
    try:
        return int(json.loads((output / "summary.json").read_text())["epochs"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_resume_checkpoint(output: Path) -> Path | None:
    """The checkpoint ``--resume auto`` continues: ``last.pt``, else ``best.pt`` (a kill
    between the two saves), else ``None`` (logged: the run starts)."""
    found = [output / n for n in (LAST, BEST)]
    resume = next((p for p in found if p.is_file()), None)
    if resume is None:
        logger.info("--resume auto: no checkpoint in %s yet; starting the run", output)
    return resume


def earlier_folder(resume: str | os.PathLike | None, out: Path) -> Path | None:
    """The folder of the run that ``--resume`` continues, where it is not ``out`` (``--resume
    other/last.pt --output new``), else ``None``."""
    if resume is None:
        return None
    folder = Path(resume).parent
    return None if folder.resolve() == Path(out).resolve() else folder


def carry_best(resume: str | os.PathLike, out: Path, best_epoch: int | None) -> Path | None:
    """``out/best.pt`` made the continued run's best checkpoint (a hard link, or a copy), so
    that a run resumed into a new folder holds its best epoch though it beats it no more: the
    resumed ``best.pt`` itself, or the ``best.pt`` beside a resumed ``last.pt``, where it is of
    ``best_epoch`` (a run killed between writing a new best.pt and last.pt left a best.pt
    newer than its last.pt). Returns the file linked, or ``None`` (nothing to carry)."""
    import torch

    resume = Path(resume)
    best = resume if resume.name == BEST else resume.with_name(BEST)
    if best_epoch is None or resume.name not in (LAST, BEST) or not best.is_file():
        return None
    try:  # mapped, not read: only its epoch is wanted
        epoch = torch.load(best, map_location="cpu", weights_only=True, mmap=True).get("epoch")
    except Exception:  # noqa: BLE001 - an unreadable best.pt is not carried, whatever the cause
        return None
    if epoch != best_epoch:
        return None
    link_atomic(best, out / BEST)
    return best


def refuse_overwriting_a_run(
    path: Path, *, resume: Path | None = None, overwrite: bool = False
) -> None:
    """Refuse an output folder that holds a run this one would overwrite, unless told to
    overwrite or resuming that very run (``resume``: a checkpoint in ``path``).

    Raises:
        ValueError: naming the checkpoints found and the ways on.
    """
    held = [name for name in (LAST, BEST) if (path / name).is_file()]
    if overwrite or not held:
        return
    if resume is not None and Path(resume).absolute().parent.resolve() == Path(path).resolve():
        return  # continuing the run that is there (its last.pt may link to a backup)
    if resume is not None and LAST in held and _same_file(path / LAST, Path(resume)):
        return  # the same continuation again: nothing trained there since (its link)
    if resume is not None:
        raise ValueError(
            f"--output {str(path)!r} already holds another run ({', '.join(held)}), which "
            f"resuming {str(resume)!r} there would overwrite; give a new --output for it "
            "or --resume auto to continue the run in the folder"
        )
    raise ValueError(
        f"--output {str(path)!r} already holds a run ({', '.join(held)}); continue it "
        "with --resume auto, start it over with --overwrite, or choose another folder"
    )


def _same_file(a: Path, b: Path) -> bool:
    """Whether ``a`` is ``b`` by a hard link (a continuation's ``last.pt``; a symbolic link is
    a folder's own choice, such as a backup of its run)."""
    try:
        return not a.is_symlink() and a.samefile(b)
    except OSError:
        return False
