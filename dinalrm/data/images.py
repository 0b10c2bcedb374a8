"""Robust image decoding shared by training data and benchmark adapters.

Every image that enters dinalrm goes through `load_image` (full decode to 8-bit RGB) or
`read_image_size` (header only). Both accept the source forms the public datasets use — a file
path, raw encoded bytes (Pick-a-Pic), the `{"bytes": ..., "path": ...}` dict that a `datasets.Image`
feature yields with `decode=False`, or an already opened PIL image — and both report a bad image the
same way: an [`ImageLoadError`] whose `reason` callers count, so no row fails silently and no
single broken file stops a run.
"""

from __future__ import annotations

import io
import os
import struct
from collections.abc import Mapping
from typing import Any

from PIL import Image, ImageOps

from pipeline_dinalrm import to_rgb  # the pipeline's own conversion (one implementation); re-exported


__all__ = [
    "CORRUPT",
    "MISSING",
    "OUTSIDE_ROOT",
    "OVERSIZED",
    "ImageLoadError",
    "ImageSource",
    "load_image",
    "open_image",
    "is_within",
    "read_image_size",
    "to_rgb",
]

MISSING = "missing_image"
CORRUPT = "corrupt_image"
OVERSIZED = "oversized_image"
OUTSIDE_ROOT = "path_outside_root"

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | Mapping[str, Any] | Image.Image | None

# What PIL raises for undecodable data: UnidentifiedImageError and truncation are OSErrors; broken
# chunks surface as SyntaxError, ValueError, EOFError or struct.error depending on the plugin.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, struct.error)
_EXIF_ORIENTATION = 0x0112
_SWAPS_AXES = {5, 6, 7, 8}


class ImageLoadError(ValueError):
    """An image could not be read; `reason` is one of MISSING, CORRUPT, OVERSIZED or OUTSIDE_ROOT (for counting)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{detail} [{reason}]")
        self.reason = reason


def is_within(path: str | os.PathLike[str], root: str | os.PathLike[str]) -> bool:
    """Whether `path` (relative paths are taken relative to `root`) stays inside `root` once `..` is resolved."""
    root = os.path.abspath(root)
    return os.path.commonpath([root, os.path.abspath(os.path.join(root, path))]) == root


def _resolve_path(path: str | os.PathLike[str], root: str | os.PathLike[str] | None) -> str:
    path = os.fspath(path)
    if root is not None and not os.path.isabs(path):
        path = os.path.join(os.fspath(root), path)
    if not os.path.isfile(path):
        raise ImageLoadError(MISSING, f"image file not found: {path}")
    return path


def open_image(source: ImageSource, root: str | os.PathLike[str] | None = None) -> Image.Image:
    """Open `source` lazily (only the header is parsed); relative paths are joined to `root`.

    Raises ImageLoadError for a missing or unidentifiable image and TypeError for an unsupported
    source type (a programming error, not a data error).
    """
    if isinstance(source, Image.Image):
        return source
    if source is None:
        raise ImageLoadError(MISSING, "no image given (None)")
    if isinstance(source, Mapping):
        data, path = source.get("bytes"), source.get("path")
        if data is not None:
            return open_image(data)
        if path:
            return open_image(path, root)
        raise ImageLoadError(MISSING, "image record has neither bytes nor path")
    if isinstance(source, (bytes, bytearray, memoryview)):
        if len(source) == 0:
            raise ImageLoadError(MISSING, "empty image bytes")
        stream: Any = io.BytesIO(bytes(source))
        label = f"{len(source)} bytes"
    elif isinstance(source, (str, os.PathLike)):
        stream = _resolve_path(source, root)
        label = stream
    else:
        raise TypeError(
            f"Unsupported image source {type(source).__name__}; pass a path, encoded bytes, a "
            "{'bytes', 'path'} dict or a PIL image."
        )
    try:
        return Image.open(stream)
    except Image.DecompressionBombError as err:
        raise ImageLoadError(OVERSIZED, f"image too large to decode safely ({label}): {err}") from err
    except _DECODE_ERRORS as err:
        raise ImageLoadError(CORRUPT, f"cannot identify image ({label}): {err}") from err


def read_image_size(source: ImageSource, root: str | os.PathLike[str] | None = None) -> tuple[int, int]:
    """Return `(width, height)` as displayed (EXIF rotation applied) without decoding the pixels."""
    if isinstance(source, Image.Image):
        return _displayed_size(source)
    with open_image(source, root) as image:
        return _displayed_size(image)


def _displayed_size(image: Image.Image) -> tuple[int, int]:
    width, height = image.size
    try:
        orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
    except _DECODE_ERRORS as err:
        raise ImageLoadError(CORRUPT, f"unreadable EXIF block: {err}") from err
    return (height, width) if orientation in _SWAPS_AXES else (width, height)


def load_image(source: ImageSource, root: str | os.PathLike[str] | None = None) -> Image.Image:
    """Fully decode `source` into an 8-bit RGB image with EXIF rotation applied.

    A truncated or otherwise undecodable file raises ImageLoadError(CORRUPT) here, not later inside a
    training or scoring step.
    """
    image = open_image(source, root)
    try:
        image.load()
        if image.getexif().get(_EXIF_ORIENTATION, 1) != 1:
            image = ImageOps.exif_transpose(image)
    except Image.DecompressionBombError as err:
        raise ImageLoadError(OVERSIZED, f"image too large to decode safely: {err}") from err
    except _DECODE_ERRORS as err:
        raise ImageLoadError(CORRUPT, f"cannot decode image: {err}") from err
    return to_rgb(image)
