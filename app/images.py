"""Image type sniffing from magic bytes, and dimensions from the image header."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import NamedTuple

from PIL import Image

# Beyond this a "small" file decodes into gigabytes: a decompression bomb.
MAX_PIXELS = 100_000_000
SNIFF_BYTES = 12


class ImageKind(NamedTuple):
    """What an image is, as told by its first bytes."""

    content_type: str
    extension: str
    pil_format: str


PNG = ImageKind("image/png", "png", "PNG")
JPEG = ImageKind("image/jpeg", "jpg", "JPEG")
WEBP = ImageKind("image/webp", "webp", "WEBP")
KINDS = (PNG, JPEG, WEBP)


class NotAnImageError(ValueError):
    """The bytes are not a PNG, JPEG or WEBP image we can read."""


def sniff(head: bytes) -> ImageKind | None:
    """Tell the image kind from the first bytes of a file (at least 12), or None."""
    if head.startswith(b"\x89PNG\r\n\x1a\n"):
        return PNG
    if head.startswith(b"\xff\xd8\xff"):
        return JPEG
    if len(head) >= SNIFF_BYTES and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return WEBP
    return None


def kind_for_extension(extension: str) -> ImageKind | None:
    """The image kind stored under a file extension (``png``, ``jpg``, ``jpeg``, ``webp``)."""
    ext = extension.lower().lstrip(".")
    ext = "jpg" if ext == "jpeg" else ext
    return next((k for k in KINDS if k.extension == ext), None)


def read_dimensions(path: Path, kind: ImageKind | None = None) -> tuple[int, int]:
    """Width and height from the image header; NotAnImageError on anything unreadable.

    Blocking: call it in a worker thread. Pillow reads only the header here, never
    the pixels, and a format other than ``kind`` (when given) is refused.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path, formats=[k.pil_format for k in KINDS]) as img:
                width, height = img.size
                fmt = img.format
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError, EOFError) as exc:
        raise NotAnImageError(f"unreadable image: {exc}") from exc
    except Image.DecompressionBombWarning as exc:
        raise NotAnImageError(f"image too large: {exc}") from exc
    if kind is not None and fmt != kind.pil_format:
        raise NotAnImageError(f"header says {kind.pil_format}, content is {fmt}")
    if width <= 0 or height <= 0 or width * height > MAX_PIXELS:
        raise NotAnImageError(f"unacceptable dimensions {width}x{height}")
    return width, height
