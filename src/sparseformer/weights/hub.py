"""Cached, hash-checked download of released weights; runs only when asked, never at import."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

__all__ = ["DownloadError", "cache_dir", "download_weights"]

logger = logging.getLogger(__name__)


class DownloadError(RuntimeError):
    """Released weights could not be fetched or did not match their hash."""


def cache_dir() -> Path:
    """``$TORCH_HOME/hub/checkpoints`` (torch's own cache), read when called, not at import."""
    import torch.hub

    return Path(torch.hub.get_dir()) / "checkpoints"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def download_weights(
    url: str,
    sha256: str | None = None,
    progress: bool = True,
    directory: str | os.PathLike | None = None,
) -> Path:
    """Return the local path of ``url``'s file, downloading it into ``directory`` (default:
    torch's hub cache) if needed.

    Raises:
        DownloadError: offline, or the file's sha256 differs from ``sha256``; the message says
            how to pass a local file instead.
    """
    from torch.hub import download_url_to_file

    target = Path(directory or cache_dir()) / os.path.basename(url)
    if not target.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        logger.info("downloading %s to %s", url, target)
        try:
            download_url_to_file(url, str(target), hash_prefix=None, progress=progress)
        except Exception as exc:  # urllib raises several types; all mean "could not fetch"
            raise DownloadError(
                f"could not download {url} ({exc.__class__.__name__}: {exc}). If this machine "
                f"is offline, download the file elsewhere and pass it with "
                f"checkpoint_path=... (CLI: --checkpoint PATH), or copy it to {target}."
            ) from exc
    if sha256 is not None and _sha256(target) != sha256:
        raise DownloadError(
            f"{target} does not match the expected sha256 {sha256}; delete it and try again"
        )
    if sha256 is None:
        logger.warning("no published sha256 for %s: the file's integrity is not checked", url)
    return target
