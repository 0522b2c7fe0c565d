"""Files to classify: paths as given, folders expanded to the image or video files under them."""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path

from sparseformer.data.folder import DataError
from sparseformer.data.images import IMAGE_EXTENSIONS
from sparseformer.data.scan import walk_files, warn_other_extensions
from sparseformer.data.video_decode import VIDEO_EXTENSIONS

__all__ = ["expand_media_paths", "expand_patterns"]

logger = logging.getLogger(__name__)


def expand_media_paths(paths: list[Path], video: bool) -> list[Path]:
    """Files as given, folders as the video files (``video``) or image files under them
    (sorted), and patterns no shell expanded (``'imgs/*.jpg'``, ``'data/val/*'``) as the files
    and folders they match, as a shell gives them.

    Raises:
        DataError: a path that does not exist, or a folder without files of the kind.
    """
    media = VIDEO_EXTENSIONS if video else IMAGE_EXTENSIONS
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            ignored: list[Path] = []  # the folder's other files, walked once
            found = sorted(walk_files(path, media, ignored))  # broken links: reported, not lost
            kind = "video" if video else "image"
            if not found:
                others = tuple(e.lower() for e in (IMAGE_EXTENSIONS if video else VIDEO_EXTENSIONS))
                hint = ""
                if any(p.name.lower().endswith(others) for p in ignored):
                    found_kind, use = ("images", "an image") if video else ("videos", "a video")
                    hint = f"; it holds {found_kind}: use {use} model"
                raise DataError(
                    f"folder {str(path)!r} holds no {kind} files (extensions "
                    f"{', '.join(media)}){hint}"
                )
            warn_other_extensions(ignored, kind, media)
            files += found
        elif path.exists():
            files.append(path)
        elif glob.has_magic(str(path)):  # its files, and its folders walked
            files += _pattern_media(path, video)
        elif str(path) == "-":  # the Unix convention for standard input
            raise DataError("'-': inputs are read from files, not from standard input; save "
                            "it to a file and give its path")  # fmt: skip
        elif path.is_symlink():
            raise DataError(f"{str(path)!r} is a symbolic link to nothing (broken, or a loop)")
        else:
            raise DataError(f"{str(path)!r} does not exist")
    return files


def _pattern_media(pattern: Path, video: bool) -> list[Path]:
    """The files ``pattern`` matches and those under the folders it matches, each once; a
    matched folder without media files is passed over with a warning, as a shell's expansion
    would have it refused, where the others are taken."""
    found: list[Path] = []
    for match in expand_patterns([pattern], folders=True):
        try:
            found += expand_media_paths([match], video)
        except DataError as exc:
            if not match.is_dir():
                raise
            logger.warning("%s (matched by %s); passed over", exc, pattern)
    if not found:
        raise DataError(
            f"the pattern {str(pattern)!r} matches no {'video' if video else 'image'} file"
        )
    return list(dict.fromkeys(found))  # 'data/**/' walks nested folders more than once


def expand_patterns(paths: list[Path], folders: bool = False) -> list[Path]:
    """``paths`` with each pattern no shell expanded (quoted, or on Windows: ``'imgs/*.jpg'``)
    replaced by the files it matches, sorted (``**`` matches folders at any depth, as in
    bash's globstar; a file a symlink loop repeats, once, under its shortest name), and with
    ``folders`` the folders it matches too (``'data/val/*'``, ``'data/**/val'``; not those of
    a pattern ending in ``**``, whose files it matches already); a path that exists stays as
    it is.

    Raises:
        DataError: a pattern that matches nothing.
    """
    out: list[Path] = []
    for path in paths:
        if path.exists() or not glob.has_magic(str(path)):
            out.append(path)
            continue
        walked = folders and path.name != "**"
        matched = [
            Path(m) for m in glob.glob(str(path), recursive=True)
            if Path(m).is_file() or (walked and Path(m).is_dir())
        ]  # fmt: skip
        if "**" in str(path):  # it follows a symlink loop deeper and deeper: each file once
            named: dict[tuple[str, str], Path] = {}  # by its folder's real path and its name
            for match in sorted(matched, key=lambda p: (len(p.parts), str(p))):  # shortest first
                named.setdefault((os.path.realpath(match.parent), match.name), match)
            matched = list(named.values())
        matched = sorted(matched)
        if not matched:
            what = "file or folder" if walked else "file"
            raise DataError(f"the pattern {str(path)!r} matches no {what}")
        out += matched
    return out
