"""One download job: fetch a leased image safely, store it once, record it.

Key layout in storage: `yyyy/mm/dd/<task id>.<ext>` for a task's first image and
`yyyy/mm/dd/<task id>-<n>.<ext>` for the n-th after it, dated by the task's
creation (UTC). The key depends only on the image and its type, so a re-run
after a crash overwrites the same object with the same bytes.

A job holds its image's lease for its whole life: a heartbeat renews it while
the job waits for headers, streams, syncs or uploads, and a job whose renewal
matches no row (another worker took the image over) stops at once and records
nothing. Every write checks the lease first (fencing).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import secrets
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncEngine

from app import activity, metrics, repository, variants
from app.fetch import FetchError, FetchResult, SafeFetcher
from app.models import ImageStatus, TaskStatus, utcnow
from app.repository import DownloadJob
from app.services import events
from app.services.events import EventType
from app.storage import Storage, StorageError
from app.storage import image_key as storage_image_key
from app.upstream import LINK_LIFETIME, StarMagicClient, UpstreamError, link_expiry

log = structlog.get_logger(__name__)

# Short, because a heartbeat keeps a live job's lease fresh: a crashed worker's
# image is picked up by another within about this long.
LEASE = timedelta(seconds=10)
MAX_BACKOFF_SECONDS = 300.0
# No server-supplied delay is believed beyond this (the link is dead by then anyway).
MAX_RETRY_AFTER_SECONDS = LINK_LIFETIME.total_seconds()


# An activity row for the timeline: (outcome, detail).
Note = tuple[str, str]


class LeaseLost(Exception):
    """Another worker holds this image now: stop without recording anything."""


def image_key(job: DownloadJob, extension: str) -> str:
    """Where an image lives in storage (the layout is the storage's own)."""
    name = job.task_id if job.position == 0 else f"{job.task_id}-{job.position}"
    return storage_image_key(name, job.task_created_at, extension)


def spool_path(storage: Storage, job: DownloadJob) -> Path:
    """The attempt's own temp file: two attempts never share one."""
    return storage.spool_dir / f"{job.task_id}-{job.position}-{secrets.token_hex(6)}.part"


def _remove_leftovers(storage: Storage, job: DownloadJob) -> None:
    """Remove temp files of earlier attempts at this image (a crash's, or a job that lost
    its lease): we hold the lease now, so none of them can ever be stored."""
    for path in storage.spool_dir.glob(f"{job.task_id}-{job.position}-*.part"):
        with contextlib.suppress(OSError):
            path.unlink()


def retry_delay(attempts: int, retry_after: float | None = None) -> timedelta:
    """Jittered exponential backoff, or the server's own Retry-After when longer (bounded)."""
    ceiling = min(MAX_BACKOFF_SECONDS, 2.0 * 2 ** min(attempts, 12))
    delay = max(random.uniform(ceiling / 2, ceiling), retry_after or 0.0)
    return timedelta(seconds=min(delay, MAX_RETRY_AFTER_SECONDS))


class Downloader:
    """Runs download jobs for leased images on behalf of one worker (`owner`)."""

    def __init__(
        self,
        engine: AsyncEngine,
        fetcher: SafeFetcher,
        storage: Storage,
        starmagic: StarMagicClient,
        owner: str,
        *,
        lease: timedelta = LEASE,
        max_image_bytes: int = 50 * 1024 * 1024,
    ) -> None:
        self._engine = engine
        self._fetcher = fetcher
        self._storage = storage
        self._starmagic = starmagic
        self.owner = owner
        self.lease = lease
        self._max_image_bytes = max_image_bytes  # variants read the original back whole

    async def run(self, job: DownloadJob) -> None:
        """Fetch, store and record one image, then render its variants."""
        stored = await self.store(job)
        if stored is not None:
            await self.render_variants(job, stored)

    async def store(self, job: DownloadJob) -> str | None:
        """Fetch, store and record one image; its storage key once stored. Every failure
        is recorded, never raised."""
        stored: str | None = None
        try:
            async with self._heartbeat(job):
                stored = await self._attempt(job)
        except LeaseLost:
            metrics.DOWNLOADS.labels(outcome="lease_lost").inc()
            log.warning("download_lease_lost", task_id=job.task_id, position=job.position)
        except Exception as exc:
            # A bug or an outage we did not foresee: retry later, and give the lease back.
            log.exception("download_crashed", task_id=job.task_id, position=job.position)
            with contextlib.suppress(Exception):
                await self._retry(job, self._expires_at(job), "internal_error", repr(exc)[:300])
        return stored

    async def render_variants(self, job: DownloadJob, stored: str) -> None:
        """The stored image's variants, after its record and outside its lease: a variant
        is never worth a retry (failures are logged, never raised)."""
        await variants.make_variants_quietly(
            self._storage,
            stored,
            max_bytes=self._max_image_bytes,
            task_id=job.task_id,
            position=job.position,
        )

    @contextlib.asynccontextmanager
    async def _heartbeat(self, job: DownloadJob) -> AsyncIterator[None]:
        """Renew the lease every third of its length while the body runs; stop it if lost."""
        job_task = asyncio.current_task()
        assert job_task is not None
        lost = done = False
        seconds = self.lease.total_seconds()

        async def beat() -> None:
            nonlocal lost
            held_until = time.monotonic() + seconds
            while True:
                await asyncio.sleep(seconds / 3)
                try:
                    held = await self._renew(job)
                except Exception as exc:
                    # The database is away: keep trying while our lease can still be ours.
                    log.warning("lease_renewal_failed", task_id=job.task_id, reason=repr(exc))
                    held = time.monotonic() < held_until
                else:
                    held_until = time.monotonic() + seconds
                if not held and not done:
                    lost = True
                    job_task.cancel()
                    return

        beater = asyncio.create_task(beat())
        try:
            yield
        except asyncio.CancelledError:
            if lost and job_task.uncancel() == 0:
                raise LeaseLost from None
            raise
        finally:
            done = True
            beater.cancel()
            await asyncio.gather(beater, return_exceptions=True)

    def _expires_at(self, job: DownloadJob) -> datetime:
        return job.source_expires_at or (job.completed_at or utcnow()) + LINK_LIFETIME

    async def _attempt(self, job: DownloadJob) -> str | None:
        """One try at the image; its storage key when stored."""
        expires_at = self._expires_at(job)
        if job.source_url is None or utcnow() >= expires_at:
            await self._renew_or_fail(job, "expired", "the image link has expired")
            return None
        try:
            _remove_leftovers(self._storage, job)
            spool = spool_path(self._storage, job)
        except OSError as exc:
            # No usable spool directory: the storage is unwell, not the job.
            log.warning("storage_failed", task_id=job.task_id, reason=str(exc))
            await self._retry(job, expires_at, "storage", str(exc) or type(exc).__name__)
            return None
        try:
            try:
                result = await self._fetcher.fetch_to_file(job.source_url, spool)
            except FetchError as exc:
                await self._fetch_failed(job, exc, expires_at)
                return None
            await self._checkpoint(job)
            key = image_key(job, result.extension)
            try:
                # save_image hashed each chunk as it wrote it and fsynced the file.
                await self._storage.put_file(
                    key,
                    spool,
                    content_type=result.content_type,
                    sha256=result.sha256,
                    hashed_on_write=True,
                )
            except (StorageError, OSError) as exc:
                # The disk or bucket is unwell: retry with backoff, the lease given back.
                log.warning("storage_failed", task_id=job.task_id, reason=str(exc))
                await self._retry(job, expires_at, "storage", str(exc) or type(exc).__name__)
                return None
        finally:
            with contextlib.suppress(OSError):
                spool.unlink(missing_ok=True)
        await self._stored(job, key, result)
        return key

    async def _stored(self, job: DownloadJob, key: str, result: FetchResult) -> None:
        now = utcnow()
        recorded = await self._update(
            job,
            {
                "status": ImageStatus.STORED.value,
                "key": key,
                "content_type": result.content_type,
                "size_bytes": result.size_bytes,
                "sha256": result.sha256,
                "width": result.width,
                "height": result.height,
                "stored_at": now,
                "error_code": None,
                "error_message": None,
                "lease_owner": None,
                "lease_until": None,
                "next_attempt_at": None,
                "updated_at": now,
            },
            settles=EventType.IMAGE_STORED,
            note=("stored", f"{key}, {result.size_bytes} bytes"),
        )
        if not recorded:
            raise LeaseLost
        metrics.DOWNLOADS.labels(outcome="stored").inc()
        metrics.BYTES_STORED.inc(result.size_bytes)
        if job.completed_at is not None:
            metrics.COMPLETION_TO_STORED.observe((now - job.completed_at).total_seconds())
        log.info(
            "image_stored",
            task_id=job.task_id,
            position=job.position,
            upstream_task_id=job.upstream_task_id,
            key=key,
            size_bytes=result.size_bytes,
            sha256=result.sha256,
        )

    async def _fetch_failed(self, job: DownloadJob, exc: FetchError, expires_at: datetime) -> None:
        log.warning("download_failed", task_id=job.task_id, code=exc.code, reason=exc.message)
        if exc.renew_link:
            await self._renew_or_fail(job, exc.code, exc.message)
        elif exc.retryable:
            await self._retry(job, expires_at, exc.code, exc.message, exc.retry_after)
        else:
            await self._fail(job, exc.code, exc.message)

    async def _retry(
        self,
        job: DownloadJob,
        expires_at: datetime,
        code: str,
        message: str,
        retry_after: float | None = None,
        *,
        renew_at_deadline: bool = True,
    ) -> None:
        next_attempt = utcnow() + retry_delay(job.attempts, retry_after)
        if next_attempt >= expires_at:
            message = f"{message}; the link expires before a retry"
            if renew_at_deadline:
                await self._renew_or_fail(job, code, message)
            else:
                await self._fail(job, "expired", message)
            return
        metrics.DOWNLOADS.labels(outcome="retry").inc()
        await self._record(
            job,
            {
                "next_attempt_at": next_attempt,
                "error_code": code[:64],
                "error_message": message,
                "lease_owner": None,
                "lease_until": None,
            },
            note=("retry", f"{code}: {message}"),
        )

    async def _renew_or_fail(self, job: DownloadJob, code: str, message: str) -> None:
        """Ask the provider once for a fresh link; past that, the failure is final."""
        if job.renewed or job.upstream_task_id is None:
            await self._fail(job, code, message)
            return
        try:
            snapshot = await self._starmagic.query(job.upstream_task_id)
        except UpstreamError as exc:
            # Keep asking while a fresh link could still be of use, then give up.
            log.warning("renew_failed", task_id=job.task_id, reason=exc.message)
            deadline = (job.completed_at or utcnow()) + LINK_LIFETIME
            await self._retry(job, deadline, "renew_failed", exc.message, renew_at_deadline=False)
            return
        fresh = snapshot.images[job.position] if job.position < len(snapshot.images) else None
        if snapshot.status is not TaskStatus.COMPLETED or fresh is None or not fresh.url:
            await self._fail(job, "no_image", "StarMagic has no image link for this image")
            return
        metrics.DOWNLOADS.labels(outcome="renewed").inc()
        log.info("image_link_renewed", task_id=job.task_id, position=job.position)
        now = utcnow()
        # No expiry of its own: 24 h from the provider's completion, else from now.
        start = min(snapshot.completed_at or now, now)
        await self._record(
            job,
            {
                "source_url": fresh.url,
                "source_expires_at": link_expiry(fresh.expires_at, start, now),
                "renewed": True,
                "next_attempt_at": now,
                "lease_owner": None,
                "lease_until": None,
            },
            note=("link_renewed", f"{code}: {message}; asked StarMagic for a fresh link"),
        )

    async def _fail(self, job: DownloadJob, code: str, message: str) -> None:
        metrics.DOWNLOADS.labels(outcome="failed").inc()
        log.warning("image_failed", task_id=job.task_id, position=job.position, code=code)
        now = utcnow()
        await self._record(
            job,
            {
                "status": ImageStatus.FAILED.value,
                "error_code": code[:64],
                "error_message": message,
                "lease_owner": None,
                "lease_until": None,
                "next_attempt_at": None,
                "updated_at": now,
            },
            settles=EventType.IMAGE_FAILED,
            note=("failed", f"{code}: {message}"),
        )

    async def _renew(self, job: DownloadJob) -> bool:
        return await self._update(job, {"lease_until": utcnow() + self.lease})

    async def _checkpoint(self, job: DownloadJob) -> None:
        """Fencing before a write: the lease must still be ours."""
        if not await self._renew(job):
            raise LeaseLost

    async def _record(
        self,
        job: DownloadJob,
        values: dict[str, Any],
        *,
        settles: EventType | None = None,
        note: Note | None = None,
    ) -> None:
        if not await self._update(job, values, settles=settles, note=note):
            raise LeaseLost

    async def _update(
        self,
        job: DownloadJob,
        values: dict[str, Any],
        *,
        settles: EventType | None = None,
        note: Note | None = None,
    ) -> bool:
        """Write while the lease holds; a settled image also updates its task and tells.

        `note` (outcome, detail) goes to the task's activity log in the same transaction.
        """
        async with self._engine.begin() as db:
            if settles is not None:
                # The task's row first: its images settle one at a time, each seeing the others.
                await repository.lock_task(db, job.task_id)
            if not await repository.update_download(db, job, values):
                return False
            now = utcnow()
            if note is not None:
                outcome, detail = note
                await activity.note(
                    db,
                    job.task_id,
                    activity.Kind.DOWNLOAD,
                    outcome,
                    at=now,
                    position=job.position,
                    detail=detail,
                )
            if settles is not None:
                task, images = await repository.settle_image_summary(db, job.task_id, now)
                await events.record(db, settles, task, images, now=now, image_index=job.position)
            return True
