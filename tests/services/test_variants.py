"""WebP variants written after a download is stored, and the activity it leaves."""

from __future__ import annotations

import asyncio
import hashlib
import io
import os
import struct
import sys
import threading
import time
import zlib
from datetime import timedelta
from pathlib import Path

import pytest
from PIL import Image as PILImage
from sqlalchemy import select
from structlog.testing import capture_logs

from app import activity, variants
from app.events.repository import EVENTS
from app.fetch import FetchError
from app.models import utcnow
from app.repository import IMAGES
from app.storage import StorageError
from app.variants import VARIANTS, render, variant_key
from tests.console.helpers import png
from tests.console.test_review_findings import _corrupt_png
from tests.services.test_downloads import CountingStorage, Queue, ScriptedFetcher, queue

pytestmark = pytest.mark.asyncio(loop_scope="session")
__all__ = ["queue"]


def _size(data: bytes) -> tuple[int, int]:
    with PILImage.open(io.BytesIO(data)) as image:
        assert image.format == "WEBP"
        return image.size


async def test_a_stored_image_gets_thumb_and_preview_variants_beside_it(queue: Queue) -> None:
    """256 and 1024 px on the long side, WebP, next to the original, which is untouched."""
    original = png(1600, 800)
    task = await queue.queued()
    await queue.downloader(ScriptedFetcher([original])).run(await queue.claim())
    stored = await queue.image(task.id)
    assert stored.status == "stored"
    assert stored.key is not None
    root = queue.root / "images"
    assert (root / stored.key).read_bytes() == original
    assert stored.sha256 == hashlib.sha256(original).hexdigest()
    assert _size((root / variant_key(stored.key, "thumb")).read_bytes()) == (256, 128)
    assert _size((root / variant_key(stored.key, "preview")).read_bytes()) == (1024, 512)
    assert variant_key(stored.key, "thumb") == stored.key.removesuffix(".png") + ".thumb.webp"
    assert list(queue.storage.spool_dir.iterdir()) == []


async def test_the_original_is_decoded_once_for_all_its_variants(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Decoding is a good part of a variant's cost: both sizes come from one decode."""
    opened: list[object] = []
    real_open = PILImage.open

    def counting_open(*args: object, **kwargs: object) -> PILImage.Image:
        opened.append(args[0])
        return real_open(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(variants.PILImage, "open", counting_open)
    task = await queue.queued()
    await queue.downloader(ScriptedFetcher([png(1600, 800)])).run(await queue.claim())
    stored = await queue.image(task.id)
    assert stored.key is not None
    root = queue.root / "images"
    monkeypatch.undo()
    assert _size((root / variant_key(stored.key, "thumb")).read_bytes()) == (256, 128)
    assert _size((root / variant_key(stored.key, "preview")).read_bytes()) == (1024, 512)
    assert len(opened) == 1
    # Read from a spool copy, not from bytes in memory: an original padded with large
    # ancillary chunks never sits in the worker's memory whole. The copy is gone after.
    assert Path(opened[0].name).parent == queue.storage.spool_dir  # type: ignore[attr-defined]
    assert list(queue.storage.spool_dir.iterdir()) == []


async def test_the_spool_copy_of_an_original_that_cannot_be_rendered_is_removed(
    queue: Queue,
) -> None:
    task = await queue.queued()
    await queue.downloader(ScriptedFetcher([_corrupt_png()])).run(await queue.claim())
    assert (await queue.image(task.id)).status == "stored"
    assert list(queue.storage.spool_dir.iterdir()) == []


async def test_a_variant_that_cannot_be_made_leaves_the_original_stored(
    queue: Queue, tmp_path: Path
) -> None:
    """Bytes Pillow cannot read: no variant, the image stored and recorded all the same."""
    task = await queue.queued()
    await queue.downloader(ScriptedFetcher([b"\x89PNG\r\n\x1a\n" + b"\0" * 64])).run(
        await queue.claim()
    )
    stored = await queue.image(task.id)
    assert stored.status == "stored"
    assert (await queue.task(task.id)).image_status == "stored"
    assert stored.key is not None
    assert not (queue.root / "images" / variant_key(stored.key, "thumb")).exists()


class VariantRefusingStorage(CountingStorage):
    """Storage whose disk is full for variants only."""

    async def put_file(
        self,
        key: str,
        source: Path,
        *,
        content_type: str,
        sha256: str,
        hashed_on_write: bool = False,
    ) -> None:
        if key.endswith(".webp"):
            raise StorageError("no space left on device")
        await super().put_file(
            key, source, content_type=content_type, sha256=sha256, hashed_on_write=hashed_on_write
        )


async def test_a_storage_failure_on_a_variant_does_not_touch_the_record(queue: Queue) -> None:
    """The variant's write fails; the original's record and event stand."""
    queue.storage = VariantRefusingStorage(queue.root / "images")
    task = await queue.queued()
    await queue.downloader(ScriptedFetcher([png(300, 300)])).run(await queue.claim())
    stored = await queue.image(task.id)
    assert stored.status == "stored"
    assert queue.storage.puts == [stored.key]


async def test_a_small_image_is_never_enlarged() -> None:
    """An image smaller than the variant keeps its own size."""
    assert _size(render(png(100, 40), VARIANTS["preview"])) == (100, 40)


async def test_download_attempts_are_kept_for_the_timeline(queue: Queue) -> None:
    """A retry, then the stored copy: one activity row each, in order, with details."""
    task = await queue.queued()
    busy = FetchError("http_503", "busy", retryable=True, status_code=503)
    await queue.downloader(ScriptedFetcher([busy])).run(await queue.claim())
    async with queue.engine.begin() as db:  # due again now
        await db.execute(
            IMAGES.update()
            .where(IMAGES.c.task_id == task.id)
            .values(next_attempt_at=utcnow() - timedelta(seconds=1))
        )
    await queue.downloader(ScriptedFetcher([png(50, 50)])).run(await queue.claim())
    async with queue.engine.connect() as db:
        rows = await activity.for_task(db, task.id)
    assert [(row.kind, row.outcome, row.position) for row in rows] == [
        ("download", "retry", 0),
        ("download", "stored", 0),
    ]
    assert rows[0].detail == "http_503: busy"
    assert rows[1].detail is not None
    assert rows[1].detail.endswith(" bytes")


async def test_final_download_failures_are_kept_and_pruned_with_age(queue: Queue) -> None:
    """A refusal is kept as failed; pruning removes only rows older than the cut-off."""
    task = await queue.queued()
    refused = FetchError("not_an_image", "html page")
    await queue.downloader(ScriptedFetcher([refused])).run(await queue.claim())
    async with queue.engine.begin() as db:
        await activity.note(
            db, task.id, activity.Kind.QUERY, "ok", at=utcnow() - timedelta(days=40)
        )
        assert await activity.prune(db, before=utcnow() - timedelta(days=30), limit=10) == 1
    async with queue.engine.connect() as db:
        mine = select(activity.ACTIVITY.c.outcome).where(activity.ACTIVITY.c.task_id == task.id)
        left = (await db.execute(mine)).scalars().all()
    assert left == ["failed"]


async def test_variant_temp_files_of_a_killed_process_are_swept(queue: Queue) -> None:
    """An old variant-*.part (a crash's) goes with the next variant written; a fresh one
    (another process writing now) stays."""
    spool = queue.storage.spool_dir
    dead, live = spool / "variant-dead.part", spool / "variant-live.part"
    dead.write_bytes(b"half")
    live.write_bytes(b"half")
    old = time.time() - 3600
    os.utime(dead, (old, old))
    task = await queue.queued()
    await queue.downloader(ScriptedFetcher([png(40, 40)])).run(await queue.claim())
    assert (await queue.image(task.id)).status == "stored"
    assert not dead.exists()
    assert live.exists()


class VariantHoldingStorage(CountingStorage):
    """Storage that holds every variant write until released."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.release = asyncio.Event()
        self.holding = asyncio.Event()

    async def put_file(
        self,
        key: str,
        source: Path,
        *,
        content_type: str,
        sha256: str,
        hashed_on_write: bool = False,
    ) -> None:
        if key.endswith(".webp"):
            self.holding.set()
            await self.release.wait()
        await super().put_file(
            key, source, content_type=content_type, sha256=sha256, hashed_on_write=hashed_on_write
        )


async def test_the_record_and_its_event_do_not_wait_for_the_variants(queue: Queue) -> None:
    """While a variant write hangs, the image is already stored and image.stored told."""
    storage = VariantHoldingStorage(queue.root / "images")
    queue.storage = storage
    task = await queue.queued()
    job = asyncio.create_task(
        queue.downloader(ScriptedFetcher([png(300, 200)])).run(await queue.claim())
    )
    try:
        await asyncio.wait_for(storage.holding.wait(), timeout=30)
        assert (await queue.image(task.id)).status == "stored"
        async with queue.engine.connect() as db:
            types = await db.execute(select(EVENTS.c.type).where(EVENTS.c.task_id == task.id))
            assert list(types.scalars()) == ["image.stored"]
        assert not job.done()
    finally:
        storage.release.set()
        await asyncio.wait_for(job, timeout=30)
    assert len(storage.puts) == 3  # the original, then its two variants


async def test_a_corrupt_original_is_one_warning_line_in_the_worker(queue: Queue) -> None:
    """A PNG broken in its data: one warning, no traceback. (The worker's spool copy
    ends at the broken chunk, so Pillow finds it truncated; read whole from memory,
    Pillow raises SyntaxError, which is caught as well.)"""
    task = await queue.queued()
    with capture_logs() as logs:
        await queue.downloader(ScriptedFetcher([_corrupt_png()])).run(await queue.claim())
    assert (await queue.image(task.id)).status == "stored"
    failures = [entry for entry in logs if entry["event"].startswith("variants_")]
    assert [entry["event"] for entry in failures] == ["variants_failed"]
    assert failures[0]["log_level"] == "warning"
    assert "exc_info" not in failures[0]
    assert "truncated" in failures[0]["reason"]
    with pytest.raises(variants.VariantError, match="SyntaxError"):
        render(_corrupt_png(), 256)


def _with_trailing_chunk(image: bytes, kind: bytes, size: int) -> bytes:
    """A PNG with a chunk of `size` zero bytes between its image data and IEND."""
    end = image.rindex(b"IEND") - 4
    payload = bytes(size)
    chunk = struct.pack(">I", size) + kind + payload
    chunk += struct.pack(">I", zlib.crc32(kind + payload))
    return image[:end] + chunk + image[end:]


@pytest.mark.parametrize("kind", [b"prVt", b"tEXt"])
async def test_a_pngs_trailing_chunks_are_cut_before_decoding(tmp_path: Path, kind: bytes) -> None:
    """Pillow would read a trailing chunk whole; the spool copy ends after the image data
    instead, and decodes to the same pixels."""
    original = png(300, 200)
    padded = _with_trailing_chunk(original, kind, 3_000_000)
    spool = tmp_path / "copy.png"
    spool.write_bytes(padded)
    with spool.open("r+b") as copy:
        variants._trim_png_tail(copy)
    trimmed = spool.read_bytes()
    assert len(trimmed) < 100_000
    assert trimmed.endswith(b"IEND\xae\x42\x60\x82")
    with PILImage.open(io.BytesIO(trimmed)) as a, PILImage.open(io.BytesIO(original)) as b:
        assert a.tobytes() == b.tobytes()
    spool.write_bytes(padded)
    with spool.open("r+b") as copy:
        assert _size(variants.render_all(copy, [256])[0]) == (256, 171)


async def test_files_that_are_not_png_or_end_at_their_image_data_are_left_alone(
    tmp_path: Path,
) -> None:
    spool = tmp_path / "copy"
    for data in (png(40, 40), b"RIFF\x00\x00\x00\x00WEBPVP8 " + bytes(64), b""):
        spool.write_bytes(data)
        with spool.open("r+b") as copy:
            variants._trim_png_tail(copy)
        assert spool.read_bytes() == data


async def test_a_live_spool_copy_survives_another_jobs_sweep(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A copy that waited for a render thread longer than the stale age looks dead to
    the next job's sweep; the render still reads it whole, and the copy is gone after."""
    real_render_all = variants.render_all

    def render_after_a_sweep(original: object, long_sides: list[int]) -> list[bytes]:
        spool = queue.storage.spool_dir
        old = time.time() - 3600
        for copy in spool.glob("variant-*.original.part"):
            os.utime(copy, (old, old))  # as if it waited this long for a thread
        variants._sweep(spool)  # what another job starting now does
        return real_render_all(original, long_sides)  # type: ignore[arg-type]

    monkeypatch.setattr(variants, "render_all", render_after_a_sweep)
    task = await queue.queued()
    await queue.downloader(ScriptedFetcher([png(600, 300)])).run(await queue.claim())
    stored = await queue.image(task.id)
    assert stored.key is not None
    root = queue.root / "images"
    assert _size((root / variant_key(stored.key, "thumb")).read_bytes()) == (256, 128)
    assert list(queue.storage.spool_dir.iterdir()) == []


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread priority is Linux's")
async def test_renders_run_at_a_lower_cpu_priority_than_the_event_loop(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A render must take only the CPU the API leaves: its thread is niced below the
    thread that serves requests, which keeps its own priority."""
    real_render_all = variants.render_all
    seen: list[int] = []

    def noting_priority(original: object, long_sides: list[int]) -> list[bytes]:
        seen.append(os.getpriority(os.PRIO_PROCESS, threading.get_native_id()))
        return real_render_all(original, long_sides)  # type: ignore[arg-type]

    monkeypatch.setattr(variants, "render_all", noting_priority)
    loop_priority = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    task = await queue.queued()
    await queue.downloader(ScriptedFetcher([png(600, 300)])).run(await queue.claim())
    stored = await queue.image(task.id)
    assert stored.status == "stored"
    assert seen == [min(19, loop_priority + variants.RENDER_NICENESS)]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == loop_priority


async def test_a_render_cancelled_midway_ends_before_its_spool_copy_is_removed(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A render cannot be stopped: cancelling the job waits for it, and only then is the
    spool copy closed and removed (never pulled from under the decoder)."""
    real_render_all = variants.render_all
    started, release = threading.Event(), threading.Event()
    outcome: list[str] = []

    def slow_render(original: object, long_sides: list[int]) -> list[bytes]:
        started.set()
        release.wait(5)
        try:
            rendered = real_render_all(original, long_sides)  # type: ignore[arg-type]
        except Exception as exc:
            outcome.append(f"failed: {exc!r}")
            raise
        outcome.append("rendered")
        return rendered

    task = await queue.queued()
    await queue.downloader(ScriptedFetcher([png(600, 300)])).run(await queue.claim())
    stored = await queue.image(task.id)
    assert stored.key is not None
    monkeypatch.setattr(variants, "render_all", slow_render)
    making = asyncio.ensure_future(
        variants.make_variants(queue.storage, stored.key, max_bytes=10 * 1024 * 1024)
    )
    await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
    making.cancel()
    await asyncio.sleep(0.05)
    assert not making.done(), "the cancellation did not wait for the running render"
    release.set()
    with pytest.raises(asyncio.CancelledError):
        await making
    assert outcome[-1] == "rendered"
    assert list(queue.storage.spool_dir.iterdir()) == []


async def test_a_render_cancelled_twice_still_ends_before_the_caller_cleans_up() -> None:
    """A second cancellation (a cancel scope that delivers it again, a second stop)
    must not cut the wait short: the caller's cleanup would then close and remove the
    spool copy while the render is still reading it."""
    started, release = threading.Event(), threading.Event()
    finished: list[bool] = []

    def slow_render() -> str:
        started.set()
        release.wait(5)
        finished.append(True)
        return "rendered"

    cleaned_up_while_rendering: list[bool] = []

    async def caller() -> None:
        try:
            await variants.in_render_thread(slow_render)
        finally:
            cleaned_up_while_rendering.append(not finished)

    job = asyncio.ensure_future(caller())
    await asyncio.get_running_loop().run_in_executor(None, started.wait, 5)
    job.cancel()
    await asyncio.sleep(0.05)
    job.cancel()
    await asyncio.sleep(0.05)
    try:
        assert not job.done(), "a second cancellation ended the wait for the running render"
    finally:
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await job
    assert cleaned_up_while_rendering == [False]


async def test_renders_still_queued_when_cancelled_never_run() -> None:
    """More renders than render threads, all cancelled (a worker stopping): those
    still waiting for a thread never start later, when their spool copies are gone."""
    release = threading.Event()
    started: list[int] = []

    def blocking_render(number: int) -> int:
        started.append(number)
        release.wait(5)
        return number

    jobs = [
        asyncio.ensure_future(variants.in_render_thread(blocking_render, number))
        for number in range(variants.RENDER_THREADS * 3)
    ]
    deadline = time.monotonic() + 5
    while len(started) < variants.RENDER_THREADS and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    for job in jobs:
        job.cancel()
    await asyncio.sleep(0.05)
    running = list(started)
    release.set()
    results = await asyncio.gather(*jobs, return_exceptions=True)
    # Give a queued render every chance to start, were it going to.
    await asyncio.get_running_loop().run_in_executor(None, time.sleep, 0.2)
    assert started == running
    assert len(running) < len(jobs)
    assert all(isinstance(result, asyncio.CancelledError) for result in results)
