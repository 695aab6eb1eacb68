"""One download job: fetch a leased task's image safely, store it once, record it.

Key layout in storage: `yyyy/mm/dd/<task id>.<ext>`, dated by the task's
creation (UTC). The key depends only on the task and the image type, so a
re-run after a crash overwrites the same object with the same bytes.
"""

from __future__ import annotations

import contextlib
import random
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import structlog

from app import metrics, repository
from app.db import SessionFactory
from app.fetch import FetchError, FetchResult, SafeFetcher
from app.models import ImageStatus, Task, TaskStatus, utcnow
from app.storage import Storage, StorageError
from app.storage import image_key as storage_image_key
from app.upstream import LINK_LIFETIME, StarMagicClient, UpstreamError

log = structlog.get_logger(__name__)

LEASE = timedelta(seconds=60)
MAX_BACKOFF_SECONDS = 300.0


def image_key(task: Task, extension: str) -> str:
    """Where a task's image lives in storage (the layout is the storage's own)."""
    return storage_image_key(task.id, task.created_at, extension)


def spool_path(storage: Storage, task_id: str) -> Path:
    """The job's temp file: named by task, so a re-run replaces a crashed run's leftovers."""
    return storage.spool_dir / f"{task_id}.part"


def retry_delay(attempts: int, retry_after: float | None = None) -> timedelta:
    """Jittered exponential backoff, or the server's own Retry-After when longer."""
    ceiling = min(MAX_BACKOFF_SECONDS, 2.0 * 2 ** min(attempts, 12))
    delay = random.uniform(ceiling / 2, ceiling)
    return timedelta(seconds=max(delay, retry_after or 0.0))


class Downloader:
    """Runs download jobs for leased tasks on behalf of one worker (`owner`)."""

    def __init__(
        self,
        sessions: SessionFactory,
        fetcher: SafeFetcher,
        storage: Storage,
        starmagic: StarMagicClient,
        owner: str,
    ) -> None:
        self._sessions = sessions
        self._fetcher = fetcher
        self._storage = storage
        self._starmagic = starmagic
        self.owner = owner

    async def run(self, task: Task) -> None:
        """Fetch, store and record one image; every failure is recorded, never raised."""
        now = utcnow()
        expires_at = task.image_source_expires_at or (task.completed_at or now) + LINK_LIFETIME
        if task.image_source_url is None or now >= expires_at:
            await self._renew_or_fail(task, "expired", "the image link has expired")
            return
        spool: Path | None = None
        try:
            spool = spool_path(self._storage, task.id)
            result = await self._fetcher.fetch_to_file(
                task.image_source_url, spool, on_progress=lambda: self._extend_lease(task.id)
            )
            key = image_key(task, result.extension)
            await self._storage.put_file(
                key, spool, content_type=result.content_type, sha256=result.sha256
            )
        except FetchError as exc:
            await self._fetch_failed(task, exc, expires_at)
            return
        except (StorageError, OSError) as exc:
            # The disk or bucket is unwell: retry with backoff, the lease given back.
            log.warning("storage_failed", task_id=task.id, reason=str(exc))
            await self._retry(task, expires_at, "storage", str(exc) or type(exc).__name__)
            return
        finally:
            if spool is not None:
                with contextlib.suppress(OSError):
                    spool.unlink(missing_ok=True)
        await self._stored(task, key, result)

    async def _stored(self, task: Task, key: str, result: FetchResult) -> None:
        now = utcnow()
        recorded = await self._update(
            task,
            {
                "image_status": ImageStatus.STORED.value,
                "image_key": key,
                "image_content_type": result.content_type,
                "image_size_bytes": result.size_bytes,
                "image_sha256": result.sha256,
                "image_width": result.width,
                "image_height": result.height,
                "image_stored_at": now,
                "image_error_code": None,
                "image_error_message": None,
                "image_lease_owner": None,
                "image_lease_until": None,
                "image_next_attempt_at": None,
                "updated_at": now,
            },
        )
        if recorded:
            metrics.DOWNLOADS.labels(outcome="stored").inc()
            metrics.BYTES_STORED.inc(result.size_bytes)
            if task.completed_at is not None:
                metrics.COMPLETION_TO_STORED.observe((now - task.completed_at).total_seconds())
        log.info(
            "image_stored",
            task_id=task.id,
            upstream_task_id=task.upstream_task_id,
            key=key,
            size_bytes=result.size_bytes,
            sha256=result.sha256,
            recorded=recorded,
        )

    async def _fetch_failed(self, task: Task, exc: FetchError, expires_at: datetime) -> None:
        log.warning("download_failed", task_id=task.id, code=exc.code, reason=exc.message)
        if exc.renew_link:
            await self._renew_or_fail(task, exc.code, exc.message)
        elif exc.retryable:
            await self._retry(task, expires_at, exc.code, exc.message, exc.retry_after)
        else:
            await self._fail(task, exc.code, exc.message)

    async def _retry(
        self,
        task: Task,
        expires_at: datetime,
        code: str,
        message: str,
        retry_after: float | None = None,
        *,
        renew_at_deadline: bool = True,
    ) -> None:
        next_attempt = utcnow() + retry_delay(task.image_attempts, retry_after)
        if next_attempt >= expires_at:
            message = f"{message}; the link expires before a retry"
            if renew_at_deadline:
                await self._renew_or_fail(task, code, message)
            else:
                await self._fail(task, "expired", message)
            return
        metrics.DOWNLOADS.labels(outcome="retry").inc()
        await self._update(
            task,
            {
                "image_next_attempt_at": next_attempt,
                "image_error_code": code[:64],
                "image_error_message": message,
                "image_lease_owner": None,
                "image_lease_until": None,
            },
        )

    async def _renew_or_fail(self, task: Task, code: str, message: str) -> None:
        """Ask the provider once for a fresh link; past that, the failure is final."""
        if task.image_renewed or task.upstream_task_id is None:
            await self._fail(task, code, message)
            return
        try:
            snapshot = await self._starmagic.query(task.upstream_task_id)
        except UpstreamError as exc:
            # Keep asking while a fresh link could still be of use, then give up.
            log.warning("renew_failed", task_id=task.id, reason=exc.message)
            deadline = (task.completed_at or utcnow()) + LINK_LIFETIME
            await self._retry(task, deadline, "renew_failed", exc.message, renew_at_deadline=False)
            return
        if snapshot.status is not TaskStatus.COMPLETED or snapshot.image_url is None:
            await self._fail(task, "no_image", "StarMagic has no image link for this task")
            return
        metrics.DOWNLOADS.labels(outcome="renewed").inc()
        log.info("image_link_renewed", task_id=task.id, upstream_task_id=task.upstream_task_id)
        await self._update(
            task,
            {
                "image_source_url": snapshot.image_url,
                "image_source_expires_at": snapshot.image_expires_at,
                "image_renewed": True,
                "image_next_attempt_at": utcnow(),
                "image_lease_owner": None,
                "image_lease_until": None,
            },
        )

    async def _fail(self, task: Task, code: str, message: str) -> None:
        metrics.DOWNLOADS.labels(outcome="failed").inc()
        log.warning("image_failed", task_id=task.id, code=code, reason=message)
        await self._update(
            task,
            {
                "image_status": ImageStatus.FAILED.value,
                "image_error_code": code[:64],
                "image_error_message": message,
                "image_lease_owner": None,
                "image_lease_until": None,
                "image_next_attempt_at": None,
                "updated_at": utcnow(),
            },
        )

    async def _extend_lease(self, task_id: str) -> None:
        async with self._sessions() as session, session.begin():
            await repository.update_download(
                session, task_id, self.owner, {"image_lease_until": utcnow() + LEASE}
            )

    async def _update(self, task: Task, values: dict[str, Any]) -> bool:
        async with self._sessions() as session, session.begin():
            return await repository.update_download(session, task.id, self.owner, values)
