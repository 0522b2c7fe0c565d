"""The files of a run folder: which a run writes, which a killed run leaves behind, which one a
resumed run continues from, and what the finished run's summary says.

A run folder holds ``last.pt`` and ``best.pt`` (checkpoints), ``metrics.jsonl``, ``metrics.png``,
``summary.json`` and ``skipped_files.tsv``; each is written to a temporary name and renamed, so
a stop at any moment leaves either the old file or the new one (and a temporary, removed by the
next run).
"""

from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any

from sparseformer.engine.checkpoint import BEST, LAST

__all__ = [
    "SKIPPED_LIST",
    "RUN_FILES",
    "prepare_output",
    "clear_old_run",
    "write_skipped_list",
    "write_summary",
    "summary_epochs",
    "find_resume_checkpoint",
    "check_output_path",
    "refuse_overwriting_a_run",
]

logger = logging.getLogger(__name__)

_TEMPORARIES = (
    ".last.pt.tmp-*",
    ".best.pt.tmp-*",
    ".metrics.jsonl.tmp",
    ".metrics.tmp.png",
    ".summary.json.tmp",
    ".skipped_files.tsv.tmp",
)

SKIPPED_LIST = "skipped_files.tsv"  # every file the scan left out, with the reason
RUN_FILES = (LAST, BEST, "metrics.jsonl", "metrics.png", "summary.json", SKIPPED_LIST)


def prepare_output(out: Path) -> None:
    """Create the run folder and remove the temporaries a run killed while writing left."""
    out.mkdir(parents=True, exist_ok=True)
    for pattern in _TEMPORARIES:  # left by a run killed while writing
        for stale in out.glob(pattern):
            stale.unlink()


def clear_old_run(out: Path) -> None:
    """Remove the checkpoints, metrics and summary of an earlier run in ``out``."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def write_skipped_list(path: Path, skipped: list[tuple[str, str]]) -> None:
    """``path``: one ``file<TAB>reason`` row per file the folder scan left out (atomically;
    tab-separated CSV, quoted where a name holds a tab, a newline or a quote); removed when
    nothing was skipped, so that it never describes another scan."""
    if not skipped:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", encoding="utf-8", errors="surrogateescape", newline="") as f:
        out = csv.writer(f, delimiter="\t", lineterminator="\n")  # quotes a tab in a name
        out.writerow(["file", "reason"])
        out.writerows((file, " ".join(str(reason).split())) for file, reason in skipped)
    tmp.replace(path)


def write_summary(out: Path, summary: dict[str, Any]) -> None:
    """``out/summary.json``, written atomically."""
    tmp = out / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    tmp.replace(out / "summary.json")


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


def check_output_path(path: str | os.PathLike, flag: str, *, folder: bool = False) -> None:
    """Refuse, before any work, an output path that could not be written at the end: a
    file where a folder is wanted (or the other way round), a parent that is a file, or a
    folder this process may not write in.

    Raises:
        ValueError: naming ``flag``, the path and the problem.
    """
    path = Path(path)
    if folder and path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a file; give a folder")
    if not folder and path.is_dir():
        raise ValueError(f"{flag} {str(path)!r} is a folder; give a file path")
    for parent in (path, *path.parents) if folder else path.parents:
        if parent.exists():  # the nearest existing folder: the rest will be created in it
            if not parent.is_dir():
                raise ValueError(f"{flag} {str(path)!r}: {str(parent)!r} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"{flag} {str(path)!r}: no permission to write in {str(parent)!r}")
            return


def refuse_overwriting_a_run(path: Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse an output folder that holds a run this one would overwrite, unless resuming it
    or told to overwrite.

    Raises:
        ValueError: naming the checkpoints found and the three ways on.
    """
    held = [name for name in (LAST, BEST) if (path / name).is_file()]
    if not (resume or overwrite) and held:
        raise ValueError(
            f"--output {str(path)!r} already holds a run ({', '.join(held)}); continue it "
            "with --resume auto, start it over with --overwrite, or choose another folder"
        )
