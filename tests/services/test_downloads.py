"""Download jobs: the retry, renew and fail rules, leases, and the stored result."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import update
from sqlmodel import col

from app import repository
from app.db import SessionFactory, create_engine, create_session_factory
from app.fetch import FetchError, FetchResult
from app.models import Task, utcnow
from app.services.downloads import Downloader, image_key
from app.storage import LocalStorage
from app.upstream import RetryPolicy, StarMagicClient
from tests.factories import make_task
from tests.helpers import task_body

pytestmark = pytest.mark.asyncio(loop_scope="session")

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 200


@dataclass
class ScriptedFetcher:
    """Stands in for SafeFetcher: each call takes the next scripted outcome."""

    outcomes: list[bytes | FetchError]
    urls: list[str] = field(default_factory=list)

    async def fetch_to_file(
        self, url: str, dest: Path, *, on_progress: Callable[[], Awaitable[None]] | None = None
    ) -> FetchResult:
        self.urls.append(url)
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, FetchError):
            raise outcome
        if on_progress is not None:
            await on_progress()
        dest.write_bytes(outcome)
        return FetchResult(
            size_bytes=len(outcome),
            sha256=hashlib.sha256(outcome).hexdigest(),
            content_type="image/png",
            extension="png",
            width=8,
            height=8,
            final_url=url,
        )

    async def aclose(self) -> None:
        return None


class Queue:
    """A migrated database with one leased download, and the parts of a worker."""

    def __init__(self, sessions: SessionFactory, storage: LocalStorage, root: Path) -> None:
        self.sessions = sessions
        self.storage = storage
        self.root = root
        self.queries: list[str] = []
        self.query_answers: list[httpx.Response] = []

    def downloader(self, fetcher: ScriptedFetcher, owner: str = "worker-a") -> Downloader:
        def answer(request: httpx.Request) -> httpx.Response:
            self.queries.append(request.url.path)
            return self.query_answers.pop(0)

        http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
        client = StarMagicClient(
            http, base_url="https://sm.test", api_key="k", retry=RetryPolicy(attempts=1)
        )
        return Downloader(self.sessions, fetcher, self.storage, client, owner)  # type: ignore[arg-type]

    async def queued(self, **fields: Any) -> Task:
        """A completed task whose download is due."""
        values: dict[str, Any] = {
            "status": "completed",
            "completed_at": utcnow(),
            "image_status": "pending",
            "image_source_url": "https://cdn.example.com/a.png",
            "image_source_expires_at": utcnow() + timedelta(hours=23),
            "image_next_attempt_at": utcnow() - timedelta(seconds=1),
            "next_poll_at": None,
        }
        values.update(fields)
        async with self.sessions() as session:
            await make_task(session, **values)
        return await self.claim("worker-a")

    async def claim(self, owner: str) -> Task:
        async with self.sessions() as session, session.begin():
            claimed = await repository.claim_due_downloads(
                session, now=utcnow(), owner=owner, lease=timedelta(seconds=60), limit=1
            )
        assert len(claimed) == 1
        return claimed[0]

    async def load(self, task_id: str) -> Task:
        async with self.sessions() as session:
            task = await repository.get_task(session, task_id)
        assert task is not None
        return task


@pytest_asyncio.fixture(loop_scope="session")
async def queue(database_url: str, tmp_path: Path) -> AsyncIterator[Queue]:
    """The download queue on both databases, with local storage."""
    engine = create_engine(database_url)
    yield Queue(create_session_factory(engine), LocalStorage(tmp_path / "images"), tmp_path)
    await engine.dispose()


async def test_a_download_is_stored_under_its_dated_key(queue: Queue) -> None:
    """Bytes land at yyyy/mm/dd/<id>.png and the task records every image field."""
    task = await queue.queued()
    await queue.downloader(ScriptedFetcher([PNG])).run(task)
    stored = await queue.load(task.id)
    assert stored.image_status == "stored"
    assert stored.image_key == image_key(task, "png")
    assert stored.image_key == f"{task.created_at:%Y/%m/%d}/{task.id}.png"
    assert (queue.root / "images" / stored.image_key).read_bytes() == PNG
    assert stored.image_sha256 == hashlib.sha256(PNG).hexdigest()
    assert (stored.image_size_bytes, stored.image_width, stored.image_height) == (len(PNG), 8, 8)
    assert stored.image_lease_owner is None
    assert list(queue.storage.spool_dir.iterdir()) == []


async def test_transient_failures_are_retried_later(queue: Queue) -> None:
    """A 503 leaves the job queued, lease released, next attempt in the future."""
    task = await queue.queued()
    failure = FetchError("http_503", "busy", retryable=True, status_code=503)
    await queue.downloader(ScriptedFetcher([failure])).run(task)
    stored = await queue.load(task.id)
    assert stored.image_status == "pending"
    assert stored.image_error_code == "http_503"
    assert stored.image_lease_owner is None
    assert stored.image_next_attempt_at is not None
    assert stored.image_next_attempt_at > utcnow()


async def test_a_refused_link_is_renewed_once_then_the_failure_is_final(queue: Queue) -> None:
    """403: ask the query API for a fresh link; a second 403 fails with its code."""
    task = await queue.queued()
    fresh = task_body("completed", upstream_id=task.upstream_task_id or "", url="https://n/b.png")
    queue.query_answers.append(httpx.Response(200, json=fresh))
    forbidden = FetchError("http_403", "forbidden", status_code=403)
    await queue.downloader(ScriptedFetcher([forbidden])).run(task)
    renewed = await queue.load(task.id)
    assert (renewed.image_status, renewed.image_renewed) == ("pending", True)
    assert renewed.image_source_url == "https://n/b.png"
    assert queue.queries == [f"/v1/tasks/{task.upstream_task_id}"]

    again = await queue.claim("worker-a")
    await queue.downloader(ScriptedFetcher([forbidden])).run(again)
    final = await queue.load(task.id)
    assert (final.image_status, final.image_error_code) == ("failed", "http_403")
    assert len(queue.queries) == 1


async def test_an_expired_link_is_renewed_before_fetching(queue: Queue) -> None:
    """A link past its expiry is not fetched; a fresh one is asked for."""
    task = await queue.queued(image_source_expires_at=utcnow() - timedelta(minutes=1))
    fresh = task_body("completed", upstream_id=task.upstream_task_id or "", url="https://n/c.png")
    queue.query_answers.append(httpx.Response(200, json=fresh))
    fetcher = ScriptedFetcher([])
    await queue.downloader(fetcher).run(task)
    assert fetcher.urls == []
    assert (await queue.load(task.id)).image_source_url == "https://n/c.png"


async def test_renewal_stops_once_no_link_could_still_be_valid(queue: Queue) -> None:
    """Provider down while renewing a day-old task: the image fails as expired."""
    task = await queue.queued(
        completed_at=utcnow() - timedelta(hours=24),
        image_source_expires_at=utcnow() - timedelta(minutes=1),
    )
    queue.query_answers.append(httpx.Response(503))
    await queue.downloader(ScriptedFetcher([])).run(task)
    stored = await queue.load(task.id)
    assert (stored.image_status, stored.image_error_code) == ("failed", "expired")


@pytest.mark.parametrize("code", ["not_an_image", "too_large", "blocked_address", "bad_url"])
async def test_permanent_refusals_fail_at_once(queue: Queue, code: str) -> None:
    """Refusals that no retry can fix are recorded with their reason code."""
    task = await queue.queued()
    await queue.downloader(ScriptedFetcher([FetchError(code, "refused")])).run(task)
    stored = await queue.load(task.id)
    assert (stored.image_status, stored.image_error_code, stored.image_error_message) == (
        "failed",
        code,
        "refused",
    )
    assert queue.queries == []


async def test_a_worker_that_lost_its_lease_records_nothing(queue: Queue) -> None:
    """If the lease ran out and another worker took the job, the late result is dropped."""
    task = await queue.queued()
    async with queue.sessions() as session, session.begin():
        await session.execute(
            update(Task)
            .where(col(Task.id) == task.id)
            .values(image_lease_until=utcnow() - timedelta(seconds=1))
        )
    await queue.claim("worker-b")
    await queue.downloader(ScriptedFetcher([PNG]), owner="worker-a").run(task)
    stored = await queue.load(task.id)
    assert (stored.image_status, stored.image_lease_owner) == ("pending", "worker-b")


async def test_leased_jobs_are_not_claimed_twice_until_released(queue: Queue) -> None:
    """A live lease hides the job; releasing the leases makes it due again."""
    await queue.queued()
    async with queue.sessions() as session, session.begin():
        none = await repository.claim_due_downloads(
            session, now=utcnow(), owner="worker-b", lease=timedelta(seconds=60), limit=5
        )
        assert list(none) == []
        assert await repository.release_download_leases(session, "worker-a") == 1
    assert (await queue.claim("worker-b")).image_lease_owner == "worker-b"
