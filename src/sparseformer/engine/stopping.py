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
from typing import Any

__all__ = [
    "RunStopped",
    "StopSignals",
    "setup_signals",
    "CheckpointEvery",
    "parse_checkpoint_every",
]

logger = logging.getLogger(__name__)


class RunStopped(BaseException):
    """A run stopped by a signal; ``saved``: whether a checkpoint of the stop point was
    written. Exit status ``128 + signum``, as a shell reports it. A ``BaseException``, as
    ``KeyboardInterrupt`` is: code that handles errors (``except Exception``) lets it by."""

    def __init__(self, signum: int, saved: bool) -> None:
        self.signum, self.saved = signum, saved
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name}" + (" (a checkpoint was saved)" if saved else ""))


def _stop_for(signum: int) -> BaseException:
    """What a signal raises: Ctrl-C ``KeyboardInterrupt``, SIGTERM :class:`RunStopped`."""
    return KeyboardInterrupt() if signum == signal.SIGINT else RunStopped(signum, saved=False)


def _set_handlers(handler) -> dict[int, Any]:
    """SIGINT's and SIGTERM's handler set to ``handler``; returns the previous ones."""
    return {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}


def _restore(previous: dict[int, Any]) -> None:
    """Handlers back as they were (one not set from Python, ``None``: the default)."""
    for signum, handler in previous.items():
        signal.signal(signum, handler if handler is not None else signal.SIG_DFL)


_setup_signals: list[int] = []  # signals met by :func:`setup_signals`' handler


def _raise_a_swallowed_signal() -> None:
    """Raise a signal :func:`setup_signals` met whose exception was swallowed on the way."""
    if _setup_signals:
        signum = _setup_signals[0]
        _setup_signals.clear()
        raise _stop_for(signum)


class StopSignals:
    """A context manager noting SIGINT and SIGTERM (main thread only; elsewhere it notes
    nothing and the signals keep their handlers); ``announce``: log the first one (one
    process of a run does)."""

    def __init__(self, announce: bool = True) -> None:
        self.signum: int | None = None
        self.announce = announce
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        _raise_a_swallowed_signal()  # met while the command set up: stop before training
        if threading.current_thread() is threading.main_thread():
            self._previous = _set_handlers(self._note)
        return self

    def __exit__(self, *exc) -> None:
        _restore(self._previous)
        self._previous = {}

    def _note(self, signum: int, frame) -> None:
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: at once, wherever it lands
        if self.signum is None:
            if self.announce:
                logger.warning(
                    "%s received: stopping at the next step boundary (Ctrl-C%s to stop now)",
                    signal.Signals(signum).name, " again" if signum == signal.SIGINT else "",
                )  # fmt: skip
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None


@contextmanager
def setup_signals() -> Iterator[None]:
    """While a command runs outside :class:`StopSignals` (its set-up, and commands that have
    none): Ctrl-C raises ``KeyboardInterrupt`` and SIGTERM :class:`RunStopped` at once (a
    line and status 143 instead of a silent end), and each is noted: where the exception is
    swallowed on the way (an import that catches it, as torch's lazy imports do), it is raised
    again when :class:`StopSignals` takes over or the block ends, so the command stops."""

    def stop(signum: int, frame) -> None:
        _setup_signals.append(signum)
        raise _stop_for(signum)

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _setup_signals.clear()
    previous = _set_handlers(stop)
    try:
        yield
        _raise_a_swallowed_signal()
    finally:
        _restore(previous)
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
