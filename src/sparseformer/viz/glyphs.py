"""Class names the installed fonts cannot draw: matplotlib warns once per character and per
drawing (a CJK class name gives dozens of lines); a figure writer says them in one line."""

from __future__ import annotations

import contextlib
import logging
import re
import warnings
from collections.abc import Iterator
from pathlib import Path

from sparseformer.data.scan import counted

__all__ = ["missing_glyphs_said"]

logger = logging.getLogger(__name__)

_GLYPH = re.compile(r"Glyph (\d+) .*missing from (current )?font")


@contextlib.contextmanager
def missing_glyphs_said(path: Path, in_full: str | None = None) -> Iterator[None]:
    """One logged line naming ``path`` for the characters of class names that the installed
    fonts lack (drawn as boxes), where matplotlib warns once per character and drawing, and
    ``in_full``, what has the names in full; other warnings pass through."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield
    missing = []
    for w in caught:
        found = _GLYPH.search(str(w.message))
        if found is None:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
        elif chr(int(found.group(1))) not in missing:
            missing.append(chr(int(found.group(1))))
    if missing:
        shown = "".join(missing[:10]) + ("..." if len(missing) > 10 else "")
        logger.warning(
            "%s: the installed fonts lack %s of the class names (%s), drawn as boxes; %s"
            "a font such as Noto Sans CJK draws them",
            path, counted(len(missing), "character"), shown,
            f"{in_full} has the names in full; " if in_full else "",
        )  # fmt: skip
