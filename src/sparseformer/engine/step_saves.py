"""Mid-epoch checkpoints and stops: what a run does after each step and during validation.

After each training step :class:`StepHook` decides, the same way on every rank, whether a
mid-epoch checkpoint is due (``--checkpoint-every``) and whether a signal asks the run to stop
(SIGTERM saving first, with ``--save-on-signal``). Under torchrun the ranks agree every few
steps (one small all-reduce, at the loop's loss check) so that all save and stop at the same
step. Validation stops between batches (:class:`UntilStopped`).
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import torch

from sparseformer.engine.distributed import DistInfo, all_reduce_sum
from sparseformer.engine.loop import EpochProgress
from sparseformer.engine.stopping import CheckpointEvery, StopSignals

__all__ = ["StepHook", "UntilStopped", "progress_record", "progress_from_record"]

REPORT_SECONDS = 300.0  # a progress line this often where no progress bar shows


class StepHook:
    """``after_step`` for :func:`~sparseformer.engine.loop.train_one_epoch`.

    Args:
        save: writes a mid-epoch checkpoint of the given progress (called on every rank),
            and of given random generators' states when passed them.
        every: the mid-epoch checkpoint schedule, or ``None``.
        signals: the signals noted so far.
        device: where the ranks' flags are summed (the collective's device).
        save_on_signal: save before stopping on SIGTERM.
        report: called with the progress every :data:`REPORT_SECONDS` (a log line where no
            progress bar shows: a job's log file), or ``None``.
    """

    def __init__(
        self,
        save: Callable[[EpochProgress], None],
        every: CheckpointEvery | None,
        signals: StopSignals,
        save_on_signal: bool,
        dist: DistInfo,
        device: torch.device,
        report: Callable[[EpochProgress], None] | None = None,
    ) -> None:
        self.save, self.every, self.signals = save, every, signals
        self.save_on_signal, self.dist, self.device = save_on_signal, dist, device
        self.report, self.reported = report, time.monotonic()
        self.since = time.monotonic()
        self.last: EpochProgress | None = None  # the latest step's progress
        self.signum: int | None = None  # the signal the ranks agreed to stop on
        self.saved = False  # whether the stop point was saved

    def __call__(self, progress: EpochProgress, agree: bool) -> bool:
        self.last = progress
        if self.report is not None and time.monotonic() - self.reported >= REPORT_SECONDS:
            self.report(progress)
            self.reported = time.monotonic()
        due = self.every is not None and self.every.steps is not None
        due = due and self.every.due(progress.batches, self.since)
        if agree:  # signals and durations: the same verdict on every rank
            timed = self.every is not None and self.every.seconds is not None
            flags = self.agreed(timed and self.every.due(progress.batches, self.since))
            due = due or flags[1]
            if flags[0]:
                return self.stop(progress, also_due=due)
        if due:
            self.save(progress)
            self.since = time.monotonic()
        return False

    def agreed(self, timed_due: bool = False) -> tuple[bool, bool]:
        """Whether any rank noted a signal (SIGTERM winning), and a timed save is due."""
        signum = self.signals.signum or 0
        local = [float(signum == signal.SIGTERM), float(signum != 0), float(timed_due)]
        flags = all_reduce_sum(torch.tensor(local, device=self.device), self.dist).tolist()
        if flags[1] > 0:
            self.signum = signal.SIGTERM if flags[0] > 0 else signal.SIGINT
        return flags[1] > 0, flags[2] > 0

    def stop(
        self, progress: EpochProgress | None, also_due: bool = False, rng: dict | None = None
    ) -> bool:
        """Save the stop point when asked (SIGTERM with save-on-signal, or a due checkpoint),
        with the random generators' states ``rng`` (default: as they are now)."""
        wanted = also_due or (self.signum == signal.SIGTERM and self.save_on_signal)
        if wanted and progress is not None:
            if rng is None:
                self.save(progress)
            else:
                self.save(progress, rng)
            self.saved = True
        return True


class UntilStopped:
    """A loader that ends early once a stop is noted (validation cut short: the run is
    stopping and its scores are not used)."""

    def __init__(self, loader, signals: StopSignals) -> None:
        self.loader, self.signals = loader, signals

    def __iter__(self) -> Iterator:
        for batch in self.loader:
            if self.signals.requested:
                return
            yield batch

    def __len__(self) -> int:
        return len(self.loader)


def progress_record(progress: EpochProgress) -> dict[str, Any]:
    """This rank's part-way epoch, as a checkpoint stores it (``weights_only`` types)."""
    return {
        "batches": int(progress.batches),
        "loss_sum": float(progress.loss_sum),  # float64: the epoch's loss continues exactly
        "seen": int(progress.seen),
        "seconds": float(progress.seconds),
    }


def progress_from_record(record: dict[str, Any]) -> EpochProgress:
    """Inverse of :func:`progress_record`."""
    return EpochProgress(
        int(record["batches"]), float(record["loss_sum"]), int(record["seen"]),
        float(record["seconds"]),
    )  # fmt: skip
