"""Image type sniffing from magic bytes, and dimensions from the image header."""

from __future__ import annotations

from pathlib import Path
from typing import IO, NamedTuple

from PIL import Image

# Beyond this a small file would decode into gigabytes (a decompression bomb); it is
# also below Pillow's own warning threshold, whose filters are not thread-safe to change.
MAX_PIXELS = 64_000_000
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


PNG_SIGNATURE_BYTES = 8
TAIL_BYTES = 64


class EndMarker:
    """Walks a PNG's chunks as the stream passes, to see its own closing IEND chunk.

    Only the chunk structure counts (each chunk's length says where the next one
    starts): IEND bytes inside another chunk (an embedded thumbnail, say) do not.
    Fed anything that is not a PNG it wanders harmlessly; it is only asked of PNGs.
    """

    def __init__(self) -> None:
        self.seen = False
        self._skip = PNG_SIGNATURE_BYTES
        self._header = b""
        self._ending = False  # inside the IEND chunk, waiting for its CRC

    def feed(self, chunk: bytes) -> None:
        """Look at the next piece of the stream."""
        at, size = 0, len(chunk)
        while at < size and not self.seen:
            if self._skip:
                step = min(self._skip, size - at)
                self._skip -= step
                at += step
                self.seen = self._ending and not self._skip
                continue
            wanted = 8 - len(self._header)
            self._header += chunk[at : at + wanted]
            at += min(wanted, size - at)
            if len(self._header) == 8:
                length, kind = int.from_bytes(self._header[:4], "big"), self._header[4:]
                self._header = b""
                self._skip = length + 4  # the data, then its CRC
                self._ending = kind == b"IEND"


def looks_complete(kind: ImageKind, head: bytes, tail: bytes, size: int, png_end: bool) -> bool:
    """Whether a file of this kind ends the way a whole one does (a body cut short does not).

    PNG has passed its IEND chunk (`png_end`, from an EndMarker); JPEG ends
    with the EOI marker (trailing padding is tolerated, as decoders do); WebP's
    RIFF header states its size. `head` and `tail` are the file's first and
    last bytes (up to TAIL_BYTES).
    """
    if kind is PNG:
        return png_end
    if kind is JPEG:
        return tail.rstrip(b"\x00\r\n ").endswith(b"\xff\xd9")
    return size >= int.from_bytes(head[4:8], "little") + 8


def kind_for_extension(extension: str) -> ImageKind | None:
    """The image kind stored under a file extension (``png``, ``jpg``, ``jpeg``, ``webp``)."""
    ext = extension.lower().lstrip(".")
    ext = "jpg" if ext == "jpeg" else ext
    return next((k for k in KINDS if k.extension == ext), None)


def read_dimensions(source: Path | IO[bytes], kind: ImageKind | None = None) -> tuple[int, int]:
    """Width and height from the image header; NotAnImageError on anything unreadable.

    `source` is a path or a binary file positioned at its start. Blocking: call it in a
    worker thread. Pillow reads only the header here, never the pixels; a format other
    than ``kind`` (when given) and a canvas over MAX_PIXELS are refused.
    """
    try:
        with Image.open(source, formats=[k.pil_format for k in KINDS]) as img:
            width, height = img.size
            fmt = img.format
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as exc:
        raise NotAnImageError(f"unreadable image: {exc}") from exc
    except Image.DecompressionBombWarning as exc:  # only raised when warnings are errors
        raise NotAnImageError(f"image too large: {exc}") from exc
    if kind is not None and fmt != kind.pil_format:
        raise NotAnImageError(f"header says {kind.pil_format}, content is {fmt}")
    if width <= 0 or height <= 0 or width * height > MAX_PIXELS:
        raise NotAnImageError(f"unacceptable dimensions {width}x{height}")
    return width, height
