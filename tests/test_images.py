"""Image sniffing and header dimensions."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from PIL import Image

from app.images import (
    JPEG,
    PNG,
    SNIFF_BYTES,
    TAIL_BYTES,
    WEBP,
    EndMarker,
    ImageKind,
    NotAnImageError,
    looks_complete,
    read_dimensions,
    sniff,
)


def image_bytes(fmt: str, size: tuple[int, int] = (37, 23)) -> bytes:
    """A real image of `size` in the Pillow format `fmt`."""
    out = io.BytesIO()
    Image.new("RGB", size, (200, 30, 90)).save(out, format=fmt)
    return out.getvalue()


@pytest.mark.parametrize(("fmt", "kind"), [("PNG", PNG), ("JPEG", JPEG), ("WEBP", WEBP)])
def test_sniff_and_dimensions(tmp_path: Path, fmt: str, kind: ImageKind) -> None:
    """Each supported format is recognised from its first bytes and measured from its header."""
    data = image_bytes(fmt)
    assert sniff(data[:12]) == kind
    path = tmp_path / f"img.{kind.extension}"
    path.write_bytes(data)
    assert read_dimensions(path, kind) == (37, 23)


@pytest.mark.parametrize(
    "head",
    [b"", b"<html><body>", b"GIF89a\x01\x00\x01\x00", b"RIFF\x00\x00\x00\x00WAVE", b"\x89PNG"],
)
def test_sniff_refuses_other_bytes(head: bytes) -> None:
    """HTML, GIF, other RIFF files and truncated signatures are not images we accept."""
    assert sniff(head) is None


def test_garbage_after_a_signature_is_refused(tmp_path: Path) -> None:
    """A PNG signature followed by junk fails when the header is read."""
    path = tmp_path / "fake.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 100)
    with pytest.raises(NotAnImageError):
        read_dimensions(path, PNG)


def test_format_mismatch_is_refused(tmp_path: Path) -> None:
    """A JPEG is not accepted where the sniffed kind said PNG."""
    path = tmp_path / "img.png"
    path.write_bytes(image_bytes("JPEG"))
    with pytest.raises(NotAnImageError):
        read_dimensions(path, PNG)


def test_decompression_bomb_is_refused(tmp_path: Path) -> None:
    """A small file that declares an enormous canvas is refused without decoding it."""
    path = tmp_path / "bomb.png"
    Image.new("1", (8_500, 8_500)).save(path, format="PNG")
    assert path.stat().st_size < 1_000_000
    with pytest.raises(NotAnImageError):
        read_dimensions(path)


def complete(data: bytes, kind: ImageKind, piece: int = 7) -> bool:
    """`looks_complete` over `data`, fed to the end marker in pieces as a download would."""
    marker = EndMarker()
    for start in range(0, len(data), piece):
        marker.feed(data[start : start + piece])
    return looks_complete(kind, data[:SNIFF_BYTES], data[-TAIL_BYTES:], len(data), marker.seen)


@pytest.mark.parametrize(("fmt", "kind"), [("PNG", PNG), ("JPEG", JPEG), ("WEBP", WEBP)])
def test_a_whole_image_looks_complete_and_one_byte_short_does_not(
    fmt: str, kind: ImageKind
) -> None:
    """The end check accepts each whole format and refuses it cut by even one byte."""
    data = image_bytes(fmt)
    assert complete(data, kind)
    assert not complete(data[:-1], kind)
    assert not complete(data[: len(data) // 2], kind)


def test_a_jpeg_with_trailing_padding_after_its_end_marker_is_complete() -> None:
    """Padding after EOI (NULs, line ends) still ends whole; other trailing bytes do not."""
    data = image_bytes("JPEG")
    assert complete(data + b"\x00\x00\r\n ", JPEG)
    assert not complete(data + b"\x00junk", JPEG)
    assert not complete(data + b"XX", JPEG)


def test_a_webp_shorter_than_its_riff_size_is_not_complete() -> None:
    """WebP states its own length: a body shorter by any amount is cut, a longer one is whole."""
    data = image_bytes("WEBP")
    for missing in (1, 8, 15, 16):
        assert not complete(data[:-missing], WEBP), missing
    assert complete(data + b"\x00", WEBP)
