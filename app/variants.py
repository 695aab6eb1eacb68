"""WebP variants of a stored image: `thumb` (256 px on the long side) and `preview`
(1024 px), written next to the original in the same storage.

A variant's key is the original's with `.<variant>.webp` in place of its
extension (`2026/11/29/tsk_x.png` → `2026/11/29/tsk_x.thumb.webp`), so it is found
from the image row alone and never overwrites the original. Variants are a
convenience: making one may fail (a truncated object, a full disk) without any
effect on the original or its record. Pillow works in a thread, off the event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import io
import os
import secrets
import struct
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, TypeVar

import anyio
import structlog
from PIL import Image as PILImage

from app.storage import Storage, StorageError, validate_key
from app.storage.base import remove_stale_files

log = structlog.get_logger(__name__)

# Long side in pixels; smaller originals are re-encoded at their own size, never enlarged.
VARIANTS: dict[str, int] = {"thumb": 256, "preview": 1024}
WEBP_QUALITY = 80
# libwebp's compression effort (0-6; its default is 4). At 2 a 1024 px variant encodes
# in about a third of the time for about 7 % more bytes, at the same quality setting.
WEBP_METHOD = 2
# Refuse big canvases before decoding (a decompression bomb is 1 KiB of PNG): a PNG is
# decoded whole, about 4 bytes a pixel, so this caps one render near 100 MB.
MAX_PIXELS = 24 * 1024 * 1024
# Every error class Pillow lets out of a broken file's decode (it has no common base).
DECODE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    SyntaxError,
    ValueError,
    TypeError,
    IndexError,
    KeyError,
    EOFError,
    struct.error,
    MemoryError,
    PILImage.DecompressionBombError,
)
STALE_TEMP_SECONDS = 30.0
# Renders run in threads of their own, at this much lower CPU priority (a nice
# increment): a variant is a convenience, and on cores shared with the API (one
# process doing everything, or a worker beside API replicas) it must take only
# the time the API leaves. As many threads as cores: idle cores still render at
# full speed.
RENDER_NICENESS = 10
RENDER_THREADS = max(1, min(4, os.cpu_count() or 1))

T = TypeVar("T")


class VariantError(Exception):
    """The original could not be read or turned into a variant."""


def variant_key(key: str, variant: str) -> str:
    """Where a variant of the object under `key` lives."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown variant {variant!r}")
    stem = key.rsplit(".", 1)[0] if "." in key.rsplit("/", 1)[-1] else key
    return validate_key(f"{stem}.{variant}.webp")


def render(original: bytes, long_side: int) -> bytes:
    """The image scaled to at most `long_side` on its long side, as WebP (blocking)."""
    return render_all(original, [long_side])[0]


_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_END = struct.pack(">I", 0) + b"IEND" + struct.pack(">I", 0xAE426082)


def _trim_png_tail(f: IO[bytes]) -> None:
    """Cut a PNG spool file (open for reading and writing) after its image data,
    ending it there (blocking).

    Pillow reads every chunk after the image data whole (and keeps private ones),
    though none changes a pixel: a PNG padded with large trailing chunks would sit in
    memory once more. Anything that is not a PNG, or has nothing after its image
    data, is left as it is.
    """
    f.seek(0)
    if f.read(8) != _PNG_SIGNATURE:
        return
    position, seen_data = 8, False
    while header := f.read(8):
        if len(header) < 8:
            return
        length, kind = struct.unpack(">I4s", header)
        if kind == b"IDAT":
            seen_data = True
        elif seen_data:
            if kind != b"IEND":
                f.truncate(position)
                f.seek(position)
                f.write(_PNG_END)
            return
        position += 12 + length
        f.seek(position)


def render_all(original: bytes | IO[bytes], long_sides: Sequence[int]) -> list[bytes]:
    """`render` for several sizes, decoding the original (bytes, or an open spool file
    of its own, which may be trimmed) once (blocking)."""
    if isinstance(original, bytes):
        source: IO[bytes] = io.BytesIO(original)
    else:
        _trim_png_tail(original)
        original.seek(0)
        source = original
    try:
        with PILImage.open(source) as image:
            if image.width * image.height > MAX_PIXELS:
                raise VariantError(f"image of {image.width}x{image.height} is too large")
            largest = max(long_sides)
            image.draft("RGB", (largest, largest))  # JPEG: decode at a smaller scale
            decoded = image.convert("RGBA" if _has_alpha(image) else "RGB")
        rendered = []
        for long_side in long_sides:
            frame = decoded.copy()
            frame.thumbnail((long_side, long_side), PILImage.Resampling.LANCZOS)
            out = io.BytesIO()
            frame.save(out, format="WEBP", quality=WEBP_QUALITY, method=WEBP_METHOD)
            rendered.append(out.getvalue())
    except DECODE_ERRORS as exc:
        raise VariantError(f"cannot render the image: {type(exc).__name__}: {exc}") from exc
    return rendered


def _lower_priority() -> None:
    """Lower the calling thread's CPU priority (Linux sets nice per thread; elsewhere
    this would lower the whole process, so there it does nothing). Never raised back:
    these threads do nothing else."""
    if sys.platform != "linux":
        return
    try:
        thread = threading.get_native_id()
        os.setpriority(
            os.PRIO_PROCESS, thread, os.getpriority(os.PRIO_PROCESS, thread) + RENDER_NICENESS
        )
    except OSError:
        pass  # a sandbox may forbid it: render at the usual priority


@functools.cache
def _render_threads() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(
        RENDER_THREADS, thread_name_prefix="variant-render", initializer=_lower_priority
    )


async def in_render_thread(function: Callable[..., T], *args: object) -> T:
    """`function(*args)` in a render thread (blocking work on an image).

    A render cannot be stopped once started: cancelled meanwhile, this waits for it
    to end before passing the cancellation on, so the caller's cleanup (closing and
    removing the spool copy) never runs under a render still reading it."""
    future = _render_threads().submit(function, *args)
    waiting = asyncio.wrap_future(future)
    try:
        return await asyncio.shield(waiting)
    except asyncio.CancelledError:
        if not future.cancel():  # started (or done): let it finish
            # Through any further cancellation too (a cancel scope delivers it again):
            # the first one is passed on once the render has ended.
            while not waiting.done():
                with contextlib.suppress(asyncio.CancelledError):
                    await asyncio.wait([waiting])
            if not waiting.cancelled():
                waiting.exception()  # retrieved: the caller is gone, so nobody else will
        raise


def _has_alpha(image: PILImage.Image) -> bool:
    return image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info


async def _spool_original(storage: Storage, key: str, limit: int) -> tuple[Path, IO[bytes]]:
    """The original copied to a spool file chunk by chunk: Pillow then reads only what
    it decodes, so an original with large ancillary chunks is never in memory whole.

    The file stays open until rendered (the caller closes and removes it): a copy
    waiting long for a render thread looks dead to another job's sweep, which then
    only removes its name."""
    stored = await storage.open(key)
    if stored.size > limit:
        raise VariantError(f"the original is {stored.size} bytes, over {limit}")
    try:
        spool = storage.spool_dir
        await anyio.to_thread.run_sync(_sweep, spool)
    except OSError as exc:
        raise _spool_error(exc) from exc
    path = spool / f"variant-{secrets.token_hex(8)}.original.part"
    out: anyio.AsyncFile[bytes] | None = None
    try:
        out = await anyio.open_file(path, "w+b")
        async for chunk in stored.chunks:
            await out.write(chunk)
        await out.flush()
    except BaseException as exc:
        if out is not None:
            out.wrapped.close()
        await anyio.Path(path).unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise _spool_error(exc) from exc
        raise
    return path, out.wrapped


def _spool_error(exc: OSError) -> StorageError:
    """A local spool file that cannot be written (full or unusable disk) is storage
    trouble, as in the backends: an outage to retry, not the image's fault."""
    return StorageError(f"local spool file: {exc}")


def _sweep(spool: Path) -> None:
    """Remove variant temp files a killed process left (blocking). A live one lasts a
    render at most (seconds), so one this old is dead; nothing re-runs a stored image's
    variants."""
    remove_stale_files(spool, STALE_TEMP_SECONDS, pattern="variant-*.part")


async def _store(storage: Storage, key: str, data: bytes) -> None:
    try:
        spool = storage.spool_dir / f"variant-{secrets.token_hex(8)}.part"
    except OSError as exc:
        raise _spool_error(exc) from exc
    try:
        await anyio.Path(spool).write_bytes(data)
    except OSError as exc:
        await anyio.Path(spool).unlink(missing_ok=True)
        raise _spool_error(exc) from exc
    try:
        digest = hashlib.sha256(data).hexdigest()
        await storage.put_file(key, spool, content_type="image/webp", sha256=digest)
    finally:
        await anyio.Path(spool).unlink(missing_ok=True)


async def make_variants(
    storage: Storage, key: str, *, names: Iterable[str] = VARIANTS, max_bytes: int
) -> dict[str, bytes]:
    """Render and store the named variants of the object under `key`; their bytes.

    VariantError (or StorageError) when the original cannot be read or rendered.
    """
    path, original = await _spool_original(storage, key, max_bytes)
    names = list(names)
    try:
        rendered = await in_render_thread(render_all, original, [VARIANTS[name] for name in names])
    except OSError as exc:
        # The spool copy's own I/O: render_all turns Pillow's errors into VariantError.
        raise _spool_error(exc) from exc
    finally:
        original.close()
        await anyio.Path(path).unlink(missing_ok=True)
    made: dict[str, bytes] = {}
    for name, data in zip(names, rendered, strict=True):
        await _store(storage, variant_key(key, name), data)
        made[name] = data
    return made


async def make_variants_quietly(
    storage: Storage, key: str, *, max_bytes: int, **log_context: object
) -> bool:
    """`make_variants`, with any failure logged and swallowed: the original stands alone."""
    try:
        await make_variants(storage, key, max_bytes=max_bytes)
    except (VariantError, StorageError, OSError) as exc:
        log.warning("variants_failed", key=key, reason=str(exc), **log_context)
        return False
    except Exception:
        log.exception("variants_crashed", key=key, **log_context)
        return False
    return True
