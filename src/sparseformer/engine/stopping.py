"""Stopping a run on SIGINT or SIGTERM at a step boundary, and mid-epoch checkpoints on a
schedule (``--checkpoint-every``: steps, or a duration such as ``30m``).

A signal handler that raises (Python's default for SIGINT) can fire anywhere: inside a
DataLoader's shutdown, in a finaliser whose exceptions are only printed (a Ctrl-C
swallowed), mid-save. Here the handler only notes the signal; the training loop asks
:meth:`StopSignals.requested` between steps and during validation and stops cleanly, saving a
checkpoint first on SIGTERM (what schedulers send before preemption). A second Ctrl-C stops at
once, as an impatient user expects.
"""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sparseformer.engine.distributed import launched_rank

__all__ = [
    "RunStopped",
    "StopSignals",
    "setup_signals",
    "CheckpointEvery",
    "parse_checkpoint_every",
]

logger = logging.getLogger(__name__)


class RunStopped(Exception):
    """A run stopped by a signal; ``saved``: whether a checkpoint of the stop point was
    written. Exit status ``128 + signum``, as a shell reports it."""

    def __init__(self, signum: int, saved: bool) -> None:
        self.signum, self.saved = signum, saved
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}" + (" (a checkpoint was saved)" if saved else ""))


class StopSignals:
    """A context manager noting SIGINT and SIGTERM (main thread only; elsewhere it notes
    nothing and the signals keep their handlers)."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def __enter__(self) -> StopSignals:
        if _setup_signals:  # met while the command set up, and swallowed on the way
            signum = _setup_signals.pop()
            _setup_signals.clear()
            raise KeyboardInterrupt if signum == signal.SIGINT else RunStopped(signum, False)
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._note)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _note(self, signum: int, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: at once, wherever it lands
        if self.signum is None and launched_rank()[0] == 0:  # every process stops: one says so
            logger.warning(
                "%s received: stopping at the next step boundary (Ctrl-C again to stop now)",
                signal.Signals(signum).name,
            )
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None


_setup_signals: list[int] = []  # signals met by :func:`setup_signals`' handler


@contextmanager
def setup_signals() -> Iterator[None]:
    """While a command sets up (before :class:`StopSignals` takes over): Ctrl-C raises
    ``KeyboardInterrupt`` and SIGTERM :class:`RunStopped` at once (a line and status 143
    instead of a silent end), and each is noted: where the exception is swallowed on the way
    (an import that catches it, as torch's lazy imports do), the run still stops, when
    :class:`StopSignals` takes over, instead of training on to the end."""

    def stop(signum: int, frame) -> None:
        _setup_signals.append(signum)
        if signum == signal.SIGTERM:
            raise RunStopped(signum, saved=False)
        raise KeyboardInterrupt

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _setup_signals.clear()
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _setup_signals.clear()


@dataclass(frozen=True)
class CheckpointEvery:
    """Mid-epoch checkpoints at every ``steps``-th step of an epoch, or every ``seconds``."""

    steps: int | None = None
    seconds: float | None = None

    def due(self, epoch_step: int, since: float) -> bool:
        """Whether a checkpoint is due after batch ``epoch_step`` of an epoch, the last one
        having been written at ``since`` (``time.monotonic()``)."""
        if self.steps is not None:
            return epoch_step % self.steps == 0
        return self.seconds is not None and time.monotonic() - since >= self.seconds


_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smh])$")


def parse_checkpoint_every(text: str | None) -> CheckpointEvery | None:
    """``"500"`` (steps), ``"30m"``, ``"90s"`` or ``"2h"``; ``None``: per epoch only.

    Raises:
        ValueError: naming the value and the accepted forms.
    """
    if text is None:
        return None
    text = text.strip().lower()
    if text.isdigit() and int(text) > 0:
        return CheckpointEvery(steps=int(text))
    match = _DURATION.match(text)
    if match and float(match[1]) > 0:
        return CheckpointEvery(seconds=float(match[1]) * {"s": 1, "m": 60, "h": 3600}[match[2]])
    raise ValueError(
        f"--checkpoint-every {text!r}: give a number of steps (500) or a duration (90s, 30m, 2h)"
    )
