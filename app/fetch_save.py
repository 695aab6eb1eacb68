"""Stream an image response into a file: bounded, sniffed, synced to disk, measured."""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio
import httpx

from app.fetch_errors import FetchError
from app.images import (
    SNIFF_BYTES,
    TAIL_BYTES,
    EndMarker,
    ImageKind,
    NotAnImageError,
    looks_complete,
    read_dimensions,
    sniff,
)

_WRITE_BUFFER = 1 << 20
_PROGRESS_BYTES = 4 << 20
_PROGRESS_SECONDS = 5.0


@dataclass(frozen=True)
class FetchResult:
    """What was downloaded into the destination file."""

    size_bytes: int
    sha256: str
    content_type: str
    extension: str
    width: int
    height: int
    final_url: str


async def save_image(
    response: httpx.Response,
    dest: Path,
    *,
    max_bytes: int,
    on_progress: Callable[[], Awaitable[None]] | None,
) -> FetchResult:
    """Write the body of a 200 answer to `dest`; FetchError too_large/not_an_image.

    `on_progress` is awaited every few MB or seconds. The caller removes `dest` on failure.
    """
    declared = response.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise FetchError("too_large", f"Content-Length {declared} > {max_bytes}")
    digest = hashlib.sha256()
    size = reported = 0
    last_report = time.monotonic()
    kind: ImageKind | None = None
    head = tail = b""
    end = EndMarker()
    buffer = bytearray()
    async with await anyio.open_file(dest, "w+b") as out:
        async for chunk in response.aiter_raw():
            size += len(chunk)
            if size > max_bytes:
                raise FetchError("too_large", f"body exceeds {max_bytes} bytes")
            if kind is None:
                head = (head + chunk)[:SNIFF_BYTES]
                kind = _sniff_or_refuse(head, final=len(head) >= SNIFF_BYTES)
            digest.update(chunk)
            tail = (tail + chunk)[-TAIL_BYTES:]
            end.feed(chunk)
            buffer += chunk
            due = (
                size - reported >= _PROGRESS_BYTES
                or time.monotonic() - last_report >= _PROGRESS_SECONDS
            )
            # Writing on every tick also keeps the file's mtime fresh while bytes
            # trickle in, so spool cleanup never takes it for an orphan.
            if due or len(buffer) >= _WRITE_BUFFER:
                await out.write(bytes(buffer))
                buffer.clear()
            if due:
                reported, last_report = size, time.monotonic()
                if on_progress:
                    await on_progress()
        kind = kind or _sniff_or_refuse(head, final=True)
        assert kind is not None
        if not looks_complete(kind, head, tail, size, end.seen):
            # A body without Content-Length whose connection closed early: the
            # bytes so far hash consistently, but they are not the whole image.
            raise FetchError(
                "truncated", f"the {kind.extension} body ends before the image does", retryable=True
            )
        await out.write(bytes(buffer))
        await out.flush()
        await anyio.to_thread.run_sync(os.fsync, out.wrapped.fileno())
        await out.seek(0)
        try:  # from the open handle: whatever happens to the path meanwhile
            width, height = await anyio.to_thread.run_sync(read_dimensions, out.wrapped, kind)
        except NotAnImageError as exc:
            raise FetchError("not_an_image", str(exc)) from exc
    assert kind is not None
    return FetchResult(
        size_bytes=size,
        sha256=digest.hexdigest(),
        content_type=kind.content_type,
        extension=kind.extension,
        width=width,
        height=height,
        final_url=str(response.url),
    )


def _sniff_or_refuse(head: bytes, *, final: bool) -> ImageKind | None:
    kind = sniff(head)
    if kind is None and final:
        raise FetchError("not_an_image", "the body is not a PNG, JPEG or WEBP image")
    return kind
