"""Reading user images robustly: any PIL mode becomes 8-bit RGB, unreadable files are reported.

Real folders hold grayscale scans, RGBA screenshots, CMYK JPEGs, 16-bit PNGs, and now and then
a truncated download. Models want 8-bit RGB; these helpers get there without surprises.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
from PIL import ExifTags, Image, UnidentifiedImageError

__all__ = [
    "IMAGE_EXTENSIONS",
    "READ_ERRORS",
    "to_rgb",
    "open_rgb",
    "upright",
    "check_image_header",
    "is_empty_file",
    "EMPTY_FILE",
]

IMAGE_EXTENSIONS = (
    ".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp", ".gif",
    ".jfif", ".avif",
)  # fmt: skip
# What PIL raises for files that are not images, are cut short or are malformed (its AVIF
# decoder raises RuntimeError: "Failed to decode image")
READ_ERRORS = (
    OSError,
    UnidentifiedImageError,
    SyntaxError,
    ValueError,
    RuntimeError,
    Image.DecompressionBombError,
)

# PIL warns of corrupt EXIF data ("Corrupt EXIF data", "Truncated File Read": once per
# process, naming no file) and ignores it, as upright() does: so do we, by a filter (a
# per-image warnings context would cost 8% of a folder's header check, and would reset the
# process's record of warnings already shown, repeating every other one).
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.TiffImagePlugin")
# PIL's raw warning for an image over its decompression-bomb size names the size, not the
# file, once per call site: open_rgb says it in a logged line that names the file instead.
# Appended: a rule of the process's own for it (an error, say) still comes first.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning, append=True)

# 16-bit and 32-bit integer modes: PIL's convert("RGB") would clip them to 255, not rescale.
_WIDE_INT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL image as 8-bit RGB.

    Grayscale is replicated to three channels, CMYK and palette images are converted, alpha
    and a palette's transparent colour are composited onto white (what a viewer shows), and
    16/32-bit images are rescaled by their bit depth (not clipped). (A grayscale or RGB PNG's
    transparent colour is not: PIL has reduced a 16-bit or 1-4-bit image's pixels to 8 bits
    by then, and its transparent value, kept at the file's depth, would whiten other pixels.)
    """
    if img.mode == "RGB":
        return img
    if img.mode in _WIDE_INT_MODES or img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            top = max(float(arr.max()), 1.0)
        else:
            top = 65535.0 if img.mode.startswith("I;16") or arr.max() <= 65535 else arr.max()
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr).convert("RGB")  # uint8 (H, W) -> mode L -> RGB
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def open_rgb(path: str | Path, max_side: int | None = None) -> Image.Image:
    """Open and fully decode an image file as 8-bit RGB, turned upright as its EXIF
    orientation says (raises one of ``READ_ERRORS``; a decoder's ``RuntimeError`` as an
    ``OSError``, which callers take for corrupt data). With ``max_side``, a JPEG is decoded at
    1/2, 1/4 or 1/8 scale where neither side falls much under it (to draw a huge photo
    without decoding it whole); other formats decode whole."""
    try:
        return _open_rgb(path, max_side)
    except RuntimeError as exc:  # PIL's AVIF decoder: "Failed to decode frame 0: ..."
        raise OSError(f"{path}: {exc}") from None


def _open_rgb(path: str | Path, max_side: int | None) -> Image.Image:
    try:
        img = Image.open(path)
    except Image.DecompressionBombError:
        raise Image.DecompressionBombError(_too_large()) from None
    except UnidentifiedImageError:
        if is_empty_file(path):  # PIL's "cannot identify image file" says less
            raise UnidentifiedImageError(f"{path}: {EMPTY_FILE}") from None
        raise
    with img:
        if max_side is not None and img.format == "JPEG":
            img.draft("RGB", (max_side, max_side))
        img.load()
        if img.width * img.height > (Image.MAX_IMAGE_PIXELS or float("inf")):
            _say_large_once(path, img.size)
        return to_rgb(upright(img))


def _too_large() -> str:
    """What PIL's refusal means: over twice ``MAX_IMAGE_PIXELS`` (between one and two times it
    an image is read, with a warning)."""
    refused = 2 * (Image.MAX_IMAGE_PIXELS or 0)
    return (
        f"larger than PIL's limit against decompression bombs ({refused:,} pixels, twice "
        "PIL.Image.MAX_IMAGE_PIXELS): downsize it, or raise PIL.Image.MAX_IMAGE_PIXELS when "
        "calling from Python"
    )


_large_said: list[bool] = []


def _say_large_once(path: str | Path, size: tuple[int, int]) -> None:
    """One line per process for images over PIL's decompression-bomb size: read, but slow."""
    if not _large_said:
        _large_said.append(True)
        logging.getLogger(__name__).warning(
            "%s is %d x %d pixels, over PIL's %d-pixel guard against decompression bombs: read "
            "as any image (said once; images this large take time and memory, downscale them "
            "for speed)", path, *size, Image.MAX_IMAGE_PIXELS,
        )  # fmt: skip


def upright(img: Image.Image) -> Image.Image:
    """``img`` turned as its EXIF orientation tag says (a phone photo shot sideways is stored
    sideways with a tag), as every image viewer shows it; untagged images pass unchanged. A
    tag that cannot be parsed is ignored, not an unreadable image."""
    try:
        orientation = img.getexif().get(ExifTags.Base.Orientation, 1)
    except Exception:  # noqa: BLE001 - malformed EXIF: keep the pixels as stored
        return img
    method = _EXIF_TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    return img if method is None else img.transpose(method)  # pixels only: no EXIF rewrite


# EXIF orientation -> the turn that shows the image upright (as PIL's ImageOps.exif_transpose)
_EXIF_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


def check_image_header(path: str | Path) -> str | None:
    """Cheap validity check of one file: ``None`` when PIL recognises it, else the reason.

    Reads the header only (and PIL's structural ``verify``), so it is fast enough to run over
    every file of a large folder; truncated pixel data is caught later, when the image loads.
    """
    try:
        with Image.open(path) as img:
            img.verify()
    except Image.DecompressionBombError:
        return _too_large()
    except READ_ERRORS as exc:
        if is_empty_file(path):
            return EMPTY_FILE
        return f"{exc.__class__.__name__}: {str(exc)[:120]}" if str(exc) else exc.__class__.__name__
    return None


EMPTY_FILE = "an empty file (0 bytes)"  # what every reader says of a file is_empty_file finds


def is_empty_file(path: str | Path) -> bool:
    """Whether ``path`` is a file of 0 bytes (a download or a copy that never finished)."""
    try:
        return Path(path).stat().st_size == 0
    except (OSError, TypeError):  # gone, or not a path (a file object)
        return False
