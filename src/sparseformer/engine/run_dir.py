"""A training run's output folder: refused when it is a file or would overwrite a run."""

from __future__ import annotations

from pathlib import Path

__all__ = ["output_dir_ok"]


def output_dir_ok(path: Path, *, resume: bool = False, overwrite: bool = False) -> None:
    """Refuse an output path that exists as a file, or that holds a run this one would
    overwrite (unless resuming it or told to overwrite)."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"--output {str(path)!r} is a file; give a directory")
    held = [name for name in ("last.pt", "best.pt") if (path / name).is_file()]
    if not (resume or overwrite) and held:
        raise ValueError(
            f"--output {str(path)!r} already holds a run ({', '.join(held)}); continue it "
            "with --resume auto, start it over with --overwrite, or choose another folder"
        )
