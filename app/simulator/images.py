"""Deterministic PNGs, padded and streamed without holding the padding in memory."""

from __future__ import annotations

import asyncio
import hashlib
import struct
import zlib
from collections.abc import AsyncIterator

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Ancillary (lowercase 1st), private (lowercase 2nd), safe-to-copy: every decoder skips it.
PAD_TYPE = b"pdAt"
PIECE = 64 * 1024
MAX_PAD_CHUNK = 16 * 1024 * 1024
CHUNK_OVERHEAD = 12  # length, type, CRC
ZLIB_LEVEL = 1  # the fastest: the rows repeat, so even level 1 compresses them well
_ZEROS = bytes(PIECE)

NOT_AN_IMAGE = (
    b"<!doctype html><html><head><title>502 Bad Gateway</title></head>"
    b"<body><h1>502 Bad Gateway</h1><p>The CDN could not reach the origin.</p></body></html>\n"
)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def image_seed(task_id: str, index: int) -> str:
    """The seed of image ``index`` of a task: the task id alone for the first image."""
    return task_id if index == 0 else f"{task_id}#{index}"


def render_png(seed: str, width: int, height: int) -> bytes:
    """An RGB gradient whose colours depend only on ``seed``; cheap even at 3840x2160.

    Red and blue vary along a row, green down the rows. Every row after the first
    is stored with the PNG "Up" filter, so it is the same few bytes repeated
    (only the green step differs): rows are reused, never built pixel by pixel,
    and the fastest zlib level still shrinks them to almost nothing.
    """
    digest = hashlib.sha256(seed.encode()).digest()
    red, green, blue, stripe = digest[0], digest[1], digest[2], digest[3] | 1
    first = bytearray(3 * width)
    first[0::3] = bytes((red + 255 * x // width) % 256 for x in range(width))
    first[1::3] = bytes((green,)) * width
    first[2::3] = bytes((blue ^ (x * stripe)) % 256 for x in range(width))
    compressor = zlib.compressobj(ZLIB_LEVEL)
    parts = [compressor.compress(b"\x00" + first)]  # filter type None
    up_rows: dict[int, bytes] = {}
    previous = green
    for y in range(1, height):
        shade = (green + 255 * y // height) % 256
        step = (shade - previous) % 256
        previous = shade
        row = up_rows.get(step)
        if row is None:
            row = up_rows[step] = b"\x02" + bytes((0, step, 0)) * width  # filter type Up
        parts.append(compressor.compress(row))
    parts.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        PNG_SIGNATURE
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", b"".join(parts))
        + _chunk(b"IEND", b"")
    )


def padding_plan(base_size: int, target: int | None) -> list[int]:
    """Payload sizes of the padding chunks that bring a PNG of ``base_size`` to ``target``."""
    if target is None:
        return []
    need = target - base_size
    if need < CHUNK_OVERHEAD:
        return []
    count = -(-need // (MAX_PAD_CHUNK + CHUNK_OVERHEAD))
    remaining = need - CHUNK_OVERHEAD * count
    sizes = []
    for _ in range(count):
        size = min(MAX_PAD_CHUNK, remaining)
        sizes.append(size)
        remaining -= size
    return sizes


def padded_size(base: bytes, target: int | None) -> int:
    """Byte length of ``padded_png(base, target)``."""
    plan = padding_plan(len(base), target)
    return len(base) + sum(plan) + CHUNK_OVERHEAD * len(plan)


async def padded_png(base: bytes, target: int | None) -> AsyncIterator[bytes]:
    """``base`` with zero-filled padding chunks before IEND, streamed in small pieces."""
    head, iend = base[:-CHUNK_OVERHEAD], base[-CHUNK_OVERHEAD:]
    yield head
    for size in padding_plan(len(base), target):
        yield struct.pack(">I", size) + PAD_TYPE
        crc = zlib.crc32(PAD_TYPE)
        left = size
        while left:
            piece = _ZEROS[: min(PIECE, left)]
            crc = zlib.crc32(piece, crc)
            left -= len(piece)
            yield piece
        yield struct.pack(">I", crc)
    yield iend


async def oversize_body(base: bytes, total: int) -> AsyncIterator[bytes]:
    """A PNG-looking start followed by zeros up to ``total`` bytes, never all in memory."""
    head = base[:-CHUNK_OVERHEAD][:total]
    yield head
    left = total - len(head)
    while left > 0:
        piece = _ZEROS[: min(PIECE, left)]
        left -= len(piece)
        yield piece


async def trickle(
    body: AsyncIterator[bytes], total: int, seconds: float, pieces: int = 20
) -> AsyncIterator[bytes]:
    """Re-slice ``body`` into about ``pieces`` parts sent over ``seconds``."""
    size = max(1, -(-total // pieces))
    pause = seconds / pieces
    buffer = bytearray()
    async for chunk in body:
        buffer += chunk
        while len(buffer) >= size:
            yield bytes(buffer[:size])
            del buffer[:size]
            await asyncio.sleep(pause)
    if buffer:
        yield bytes(buffer)
