"""Per-epoch metrics: one JSON object per line in ``metrics.jsonl`` and a plot beside it, and
the one rule for when top-5 accuracy is reported.

Top-5 accuracy says something only with more than 5 classes: with 5 or fewer every label is
among the top 5, so it is 100% whatever the model. Such problems report top-1 alone; the keys
stay (``acc5`` of ``sparseformer eval --json``, ``val_acc5`` and ``ema_val_acc5`` of
``metrics.jsonl``) and hold ``null``, so that readers find the same keys for every run.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path
from typing import Any

from sparseformer.engine.atomic import write_atomic, write_text_atomic

__all__ = [
    "MetricsLog",
    "TensorBoardScalars",
    "require_tensorboard",
    "plot_metrics",
    "TOP5_MIN_CLASSES",
    "top5_or_none",
    "format_accuracy",
    "format_loss",
    "NOTHING_SCORED",
]

TOP5_MIN_CLASSES = 6  # fewer classes: every label is among the top 5, top-5 is always 100%

logger = logging.getLogger(__name__)


def top5_or_none(percent: float, num_classes: int) -> float | None:
    """``percent``, the top-5 accuracy, or ``None`` where it is 100% by construction (fewer
    than :data:`TOP5_MIN_CLASSES` classes)."""
    return percent if num_classes >= TOP5_MIN_CLASSES else None


# an epoch whose validation scored no file (every one failed to decode), on its lines
NOTHING_SCORED = "nothing scored (no validation file could be decoded)"


def format_loss(loss: float | None) -> str:
    """A loss for a log or summary line; ``none`` when nothing was scored."""
    return "none" if loss is None else f"{loss:.4f}"


def format_accuracy(acc1: float, acc5: float | None) -> str:
    """``top-1 X%, top-5 Y%`` for a log or summary line; ``top-1 X%`` when top-5 is ``None``."""
    return f"top-1 {acc1:.2f}%" + (f", top-5 {acc5:.2f}%" if acc5 is not None else "")


class MetricsLog:
    """Appends epoch records to ``path``; on resume keeps only the epochs up to the resumed one.

    The checkpoint is written before its epoch's line, so a run killed between the two resumes
    from a checkpoint whose record ``metrics.jsonl`` lacks (or holds torn): ``saved_record``,
    the record the resume checkpoint carries, takes its place. ``history``: the resumed run's
    ``metrics.jsonl`` where it is another folder's (``--resume other/last.pt --output new``),
    whose epochs up to the resumed one the new log starts with.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        resume_from_epoch: int = 0,
        saved_record: dict[str, Any] | None = None,
        history: str | os.PathLike | None = None,
    ) -> None:
        self.path = Path(path)
        self.records: list[dict[str, Any]] = []
        self.restored: dict[str, Any] | None = None  # saved_record, when it filled a gap
        earlier = Path(history) if history is not None else self.path
        if resume_from_epoch > 0 and earlier.is_file():
            for line in earlier.read_text().splitlines():
                try:
                    rec = json.loads(line) if line.strip() else None
                except json.JSONDecodeError:  # a line cut short by a kill
                    logger.warning("%s: ignoring a torn line %r", earlier, line[:60])
                    continue
                if isinstance(rec, dict) and rec.get("epoch", 0) <= resume_from_epoch:
                    self.records.append(rec)
        if (
            resume_from_epoch > 0
            and saved_record
            and saved_record.get("epoch") == resume_from_epoch
            and not any(r.get("epoch") == resume_from_epoch for r in self.records)
        ):
            self.records.append(saved_record)
            self.restored = saved_record
        self._rewrite()

    def _rewrite(self) -> None:
        write_text_atomic(self.path, "".join(json.dumps(r) + "\n" for r in self.records))

    def append(self, record: dict[str, Any]) -> None:
        self.records.append(record)
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")


def require_tensorboard() -> None:
    """Raises ValueError, naming the extra that installs it, where TensorBoard is missing: what
    ``--tensorboard`` checks before a run reads its data or writes a file."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:  # torch's writer needs the tensorboard package
        raise ValueError(
            "--tensorboard needs TensorBoard: pip install 'sparseformer[tensorboard]'"
        ) from None


class TensorBoardScalars:
    """Every number of each epoch's record (losses, accuracies, learning rate, images/s, RoI
    statistics) as a TensorBoard scalar at its epoch, in ``folder`` (``tensorboard --logdir``).

    Raises:
        ValueError: TensorBoard is not installed, naming the extra that installs it.
    """

    def __init__(self, folder: str | os.PathLike) -> None:
        require_tensorboard()
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(folder))

    def add(self, record: dict[str, Any]) -> None:
        for key, value in record.items():
            if key != "epoch" and isinstance(value, (int, float)) and not isinstance(value, bool):
                self.writer.add_scalar(key, value, record["epoch"])
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


def plot_metrics(records: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Loss and accuracy curves per epoch, saved as an image (a matplotlib ``Figure`` of its
    own: pyplot and the caller's backend are left alone)."""
    from matplotlib.figure import Figure

    path = Path(path)
    epochs = [r["epoch"] for r in records]

    def series(key: str) -> list[float]:  # None (not measured) and absent: a gap
        return [math.nan if r.get(key) is None else r[key] for r in records]

    fig = Figure(figsize=(10, 4))
    ax_loss, ax_acc = fig.subplots(1, 2)
    ax_loss.plot(epochs, series("train_loss"), "o-", label="train")
    ax_loss.plot(epochs, series("val_loss"), "o-", label="val")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.plot(epochs, series("val_acc1"), "o-", label="top-1")
    if any(r.get("val_acc5") is not None for r in records):  # not for 5 classes or fewer
        ax_acc.plot(epochs, series("val_acc5"), "o-", label="top-5")
    if any("ema_val_acc1" in r for r in records):
        ax_acc.plot(epochs, series("ema_val_acc1"), "o--", label="EMA top-1")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="validation accuracy")
    from matplotlib.ticker import MaxNLocator

    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs: no 1.5
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    # the format from the name's suffix, not from the temporary's
    write_atomic(path, lambda f: fig.savefig(f, dpi=100, format=path.suffix.lstrip(".")))
    return path
