"""Download jobs: the retry, renew and fail rules, leases, and the stored result."""

from __future__ import annotations

import asyncio
import hashlib
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import pytest_asyncio
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from app import metrics, repository
from app.db import create_engine, create_session_factory
from app.events import repository as event_repository
from app.events.repository import EventScope
from app.fetch import FetchError, FetchResult
from app.models import Image, Task, utcnow
from app.repository import IMAGES, DownloadJob
from app.services.downloads import Downloader, image_key, retry_delay
from app.storage import LocalStorage, StorageError
from app.upstream import RetryPolicy, StarMagicClient
from tests.factories import make_task
from tests.helpers import task_body

pytestmark = pytest.mark.asyncio(loop_scope="session")

PNG = b"\x89PNG\r\n\x1a\n" + b"\x00" * 200


@dataclass
class ScriptedFetcher:
    """Stands in for SafeFetcher: each call takes the next scripted outcome."""

    outcomes: list[bytes | FetchError | BaseException]
    urls: list[str] = field(default_factory=list)
    destinations: list[Path] = field(default_factory=list)
    delay: float = 0.0
    finished: int = 0  # fetches that ran to the end, not cancelled while waiting

    async def fetch_to_file(
        self, url: str, dest: Path, *, on_progress: Callable[[], Awaitable[None]] | None = None
    ) -> FetchResult:
        self.urls.append(url)
        self.destinations.append(dest)
        outcome = self.outcomes.pop(0)
        if self.delay:
            await asyncio.sleep(self.delay)
        self.finished += 1
        if isinstance(outcome, BaseException):
            raise outcome
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


class CountingStorage(LocalStorage):
    """Local storage that counts the objects written to it."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.puts: list[str] = []

    async def put_file(
        self,
        key: str,
        source: Path,
        *,
        content_type: str,
        sha256: str,
        hashed_on_write: bool = False,
    ) -> None:
        self.puts.append(key)
        await super().put_file(
            key, source, content_type=content_type, sha256=sha256, hashed_on_write=hashed_on_write
        )


class Queue:
    """A migrated database with leased downloads, and the parts of a worker."""

    def __init__(self, engine: AsyncEngine, storage: CountingStorage, root: Path) -> None:
        self.engine = engine
        self.sessions = create_session_factory(engine)
        self.storage = storage
        self.root = root
        self.queries: list[str] = []
        self.query_answers: list[httpx.Response] = []

    def downloader(
        self, fetcher: ScriptedFetcher, owner: str = "worker-a", lease: float = 60
    ) -> Downloader:
        def answer(request: httpx.Request) -> httpx.Response:
            self.queries.append(request.url.path)
            return self.query_answers.pop(0)

        http = httpx.AsyncClient(transport=httpx.MockTransport(answer))
        client = StarMagicClient(
            http, base_url="https://sm.test", api_key="k", retry=RetryPolicy(attempts=1)
        )
        return Downloader(
            self.engine,
            fetcher,  # type: ignore[arg-type]
            self.storage,
            client,
            owner,
            lease=timedelta(seconds=lease),
        )

    async def queued(self, images: int = 1, **fields: Any) -> Task:
        """A completed task whose downloads (one per image) are due."""
        values: dict[str, Any] = {
            "status": "completed",
            "completed_at": utcnow(),
            "image_status": "pending",
            "next_poll_at": None,
        }
        image_fields = {key: fields.pop(key) for key in list(fields) if key.startswith("source_")}
        values.update(fields)
        async with self.sessions() as session:
            task = await make_task(session, **values)
            now = utcnow()
            for position in range(images):
                row: dict[str, Any] = {
                    "task_id": task.id,
                    "position": position,
                    "status": "pending",
                    "source_url": f"https://cdn.example.com/{position}.png",
                    "source_expires_at": now + timedelta(hours=23),
                    "next_attempt_at": now - timedelta(seconds=1),
                    "created_at": now,
                    "updated_at": now,
                }
                row.update(image_fields)
                session.add(Image(**row))
            await session.commit()
        return task

    async def claim(self, owner: str = "worker-a", lease: float = 60, **kw: Any) -> DownloadJob:
        jobs = await self.claim_all(owner, lease, **kw)
        assert len(jobs) == 1
        return jobs[0]

    async def claim_all(
        self, owner: str = "worker-a", lease: float = 60, limit: int = 1, **kw: Any
    ) -> list[DownloadJob]:
        async with self.engine.begin() as db:
            return await repository.claim_due_downloads(
                db, now=utcnow(), owner=owner, lease=timedelta(seconds=lease), limit=limit, **kw
            )

    async def image(self, task_id: str, position: int = 0) -> Image:
        async with self.sessions() as session:
            image = await repository.get_image(session, task_id, position)
        assert image is not None
        return image

    async def task(self, task_id: str) -> Task:
        async with self.sessions() as session:
            task = await repository.get_task(session, task_id)
        assert task is not None
        return task


@pytest_asyncio.fixture(loop_scope="session")
async def queue(database_url: str, tmp_path: Path) -> AsyncIterator[Queue]:
    """The download queue on both databases, with local storage."""
    engine = create_engine(database_url)
    yield Queue(engine, CountingStorage(tmp_path / "images"), tmp_path)
    await engine.dispose()


async def test_a_download_is_stored_under_its_dated_key(queue: Queue) -> None:
    """Bytes land at yyyy/mm/dd/<id>.png and the image records every field."""
    task = await queue.queued()
    job = await queue.claim()
    await queue.downloader(ScriptedFetcher([PNG])).run(job)
    stored = await queue.image(task.id)
    assert stored.status == "stored"
    assert stored.key == image_key(job, "png")
    assert stored.key == f"{task.created_at:%Y/%m/%d}/{task.id}.png"
    assert (queue.root / "images" / stored.key).read_bytes() == PNG
    assert stored.sha256 == hashlib.sha256(PNG).hexdigest()
    assert (stored.size_bytes, stored.width, stored.height) == (len(PNG), 8, 8)
    assert stored.lease_owner is None
    assert (await queue.task(task.id)).image_status == "stored"
    assert list(queue.storage.spool_dir.iterdir()) == []


async def test_each_image_of_a_task_is_stored_once_under_its_own_key(queue: Queue) -> None:
    """Three images: three keys, three hashes; the task is stored only when all are."""
    task = await queue.queued(images=3)
    jobs = await queue.claim_all(limit=5)
    assert sorted(job.position for job in jobs) == [0, 1, 2]
    bodies = {job.position: PNG + bytes([job.position]) for job in jobs}
    for job in sorted(jobs, key=lambda job: job.position)[:2]:
        await queue.downloader(ScriptedFetcher([bodies[job.position]])).run(job)
    assert (await queue.task(task.id)).image_status == "pending"
    last = next(job for job in jobs if job.position == 2)
    await queue.downloader(ScriptedFetcher([bodies[2]])).run(last)
    keys = set()
    for position in range(3):
        image = await queue.image(task.id, position)
        assert image.status == "stored"
        assert image.sha256 == hashlib.sha256(bodies[position]).hexdigest()
        keys.add(image.key)
    assert keys == {
        f"{task.created_at:%Y/%m/%d}/{task.id}.png",
        f"{task.created_at:%Y/%m/%d}/{task.id}-1.png",
        f"{task.created_at:%Y/%m/%d}/{task.id}-2.png",
    }
    assert sorted(queue.storage.puts) == sorted(keys)
    assert (await queue.task(task.id)).image_status == "stored"


async def test_one_failed_image_makes_the_task_image_status_failed(queue: Queue) -> None:
    """The summary: pending while any image is, then failed if any failed."""
    task = await queue.queued(images=2)
    first, second = sorted(await queue.claim_all(limit=2), key=lambda job: job.position)
    await queue.downloader(ScriptedFetcher([FetchError("not_an_image", "html")])).run(first)
    assert (await queue.task(task.id)).image_status == "pending"
    await queue.downloader(ScriptedFetcher([PNG])).run(second)
    assert (await queue.task(task.id)).image_status == "failed"
    assert (await queue.image(task.id, 1)).status == "stored"


async def test_transient_failures_are_retried_later(queue: Queue) -> None:
    """A 503 leaves the job queued, lease released, next attempt in the future."""
    task = await queue.queued()
    failure = FetchError("http_503", "busy", retryable=True, status_code=503)
    await queue.downloader(ScriptedFetcher([failure])).run(await queue.claim())
    stored = await queue.image(task.id)
    assert stored.status == "pending"
    assert stored.error_code == "http_503"
    assert stored.lease_owner is None
    assert stored.next_attempt_at is not None
    assert stored.next_attempt_at > utcnow()


async def test_a_huge_retry_after_is_clamped_not_a_crash(queue: Queue) -> None:
    """Retry-After: 99999999999999 on the link: recorded as a retry or expiry, lease released."""
    task = await queue.queued()
    failure = FetchError(
        "http_503", "busy", retryable=True, status_code=503, retry_after=99999999999999.0
    )
    queue.query_answers.append(httpx.Response(503))
    await queue.downloader(ScriptedFetcher([failure])).run(await queue.claim())
    stored = await queue.image(task.id)
    assert stored.lease_owner is None
    assert stored.error_code is not None
    assert retry_delay(3, 99999999999999.0) <= timedelta(hours=24)


async def test_an_unexpected_exception_records_a_retry_and_releases_the_lease(
    queue: Queue,
) -> None:
    """A bug inside a job is not silent: the image is retried later with its reason."""
    task = await queue.queued()
    await queue.downloader(ScriptedFetcher([RuntimeError("boom")])).run(await queue.claim())
    stored = await queue.image(task.id)
    assert (stored.status, stored.error_code, stored.lease_owner) == (
        "pending",
        "internal_error",
        None,
    )
    assert "boom" in (stored.error_message or "")
    assert stored.next_attempt_at is not None
    assert stored.next_attempt_at > utcnow()


async def test_a_crash_whose_retry_cannot_be_recorded_does_not_escape_the_job(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database gone as well: nothing is raised into the worker's loop; the lease lapses."""
    await queue.queued()
    downloader = queue.downloader(ScriptedFetcher([RuntimeError("boom")]))

    async def database_gone(*args: Any, **kwargs: Any) -> None:
        raise ConnectionError("database unreachable")

    monkeypatch.setattr(downloader, "_retry", database_gone)
    await downloader.run(await queue.claim())


async def test_a_refused_link_is_renewed_once_then_the_failure_is_final(queue: Queue) -> None:
    """403: ask the query API for a fresh link; a second 403 fails with its code."""
    task = await queue.queued()
    fresh = task_body(
        "completed", upstream_id=task.upstream_task_id or "", url="https://n/b.png", published=True
    )
    queue.query_answers.append(httpx.Response(200, json=fresh))
    forbidden = FetchError("http_403", "forbidden", status_code=403)
    await queue.downloader(ScriptedFetcher([forbidden])).run(await queue.claim())
    renewed = await queue.image(task.id)
    assert (renewed.status, renewed.renewed) == ("pending", True)
    assert renewed.source_url == "https://n/b.png"
    assert renewed.source_expires_at is not None
    assert renewed.source_expires_at > utcnow() + timedelta(hours=23)
    assert queue.queries == [f"/v1/tasks/{task.upstream_task_id}"]

    await queue.downloader(ScriptedFetcher([forbidden])).run(await queue.claim())
    final = await queue.image(task.id)
    assert (final.status, final.error_code) == ("failed", "http_403")
    assert len(queue.queries) == 1


async def test_renewal_takes_the_link_of_the_same_image(queue: Queue) -> None:
    """The second image of a task is renewed from the provider's second result."""
    task = await queue.queued(images=2)
    jobs = await queue.claim_all(limit=2)
    second = next(job for job in jobs if job.position == 1)
    fresh = task_body(
        "completed",
        upstream_id=task.upstream_task_id or "",
        urls=["https://n/first.png", "https://n/second.png"],
        published=True,
    )
    queue.query_answers.append(httpx.Response(200, json=fresh))
    forbidden = FetchError("http_403", "forbidden", status_code=403)
    await queue.downloader(ScriptedFetcher([forbidden])).run(second)
    assert (await queue.image(task.id, 1)).source_url == "https://n/second.png"


async def test_a_renewed_link_without_expiry_lives_24_hours_from_the_providers_completion(
    queue: Queue,
) -> None:
    """An enveloped answer naming `completed` but no `expires_at`: 24 h from that time."""
    task = await queue.queued()
    finished = utcnow() - timedelta(hours=2)
    fresh = task_body("completed", upstream_id=task.upstream_task_id or "", url="https://n/d.png")
    fresh["data"]["completed"] = int(finished.timestamp())
    del fresh["data"]["result"]["images"][0]["expires_at"]
    queue.query_answers.append(httpx.Response(200, json=fresh))
    forbidden = FetchError("http_403", "forbidden", status_code=403)
    await queue.downloader(ScriptedFetcher([forbidden])).run(await queue.claim())
    renewed = await queue.image(task.id)
    assert renewed.source_url == "https://n/d.png"
    assert renewed.source_expires_at is not None
    expected = finished.replace(microsecond=0) + timedelta(hours=24)
    assert abs(renewed.source_expires_at - expected) < timedelta(seconds=2)


async def test_an_expired_link_is_renewed_before_fetching(queue: Queue) -> None:
    """A link past its expiry is not fetched; a fresh one is asked for."""
    task = await queue.queued(source_expires_at=utcnow() - timedelta(minutes=1))
    fresh = task_body("completed", upstream_id=task.upstream_task_id or "", url="https://n/c.png")
    queue.query_answers.append(httpx.Response(200, json=fresh))
    fetcher = ScriptedFetcher([])
    await queue.downloader(fetcher).run(await queue.claim())
    assert fetcher.urls == []
    assert (await queue.image(task.id)).source_url == "https://n/c.png"


async def test_renewal_stops_once_no_link_could_still_be_valid(queue: Queue) -> None:
    """Provider down while renewing a day-old task: the image fails as expired."""
    task = await queue.queued(
        completed_at=utcnow() - timedelta(hours=24),
        source_expires_at=utcnow() - timedelta(minutes=1),
    )
    queue.query_answers.append(httpx.Response(503))
    await queue.downloader(ScriptedFetcher([])).run(await queue.claim())
    stored = await queue.image(task.id)
    assert (stored.status, stored.error_code) == ("failed", "expired")


@pytest.mark.parametrize("code", ["not_an_image", "too_large", "blocked_address", "bad_url"])
async def test_permanent_refusals_fail_at_once(queue: Queue, code: str) -> None:
    """Refusals that no retry can fix are recorded with their reason code."""
    task = await queue.queued()
    job = await queue.claim()
    await queue.downloader(ScriptedFetcher([FetchError(code, "refused")])).run(job)
    stored = await queue.image(task.id)
    assert (stored.status, stored.error_code, stored.error_message) == ("failed", code, "refused")
    assert queue.queries == []


async def test_a_worker_that_lost_its_lease_records_nothing(queue: Queue) -> None:
    """If the lease ran out and another worker took the job, the late result is dropped."""
    task = await queue.queued()
    job = await queue.claim("worker-a")
    async with queue.engine.begin() as db:
        await db.execute(
            update(IMAGES)
            .where(IMAGES.c.task_id == task.id)
            .values(lease_until=utcnow() - timedelta(seconds=1))
        )
    taken = await queue.claim("worker-b")
    await queue.downloader(ScriptedFetcher([PNG]), owner="worker-a").run(job)
    stored = await queue.image(task.id)
    assert (stored.status, stored.lease_owner) == ("pending", taken.lease_owner)
    assert queue.storage.puts == []


async def test_the_same_worker_cannot_write_with_a_lease_it_lost(queue: Queue) -> None:
    """Leases are per claim: a re-claim by the same worker fences off its older job."""
    task = await queue.queued()
    old = await queue.claim("worker-a")
    async with queue.engine.begin() as db:
        await db.execute(
            update(IMAGES)
            .where(IMAGES.c.task_id == task.id)
            .values(lease_until=utcnow() - timedelta(seconds=1))
        )
    new = await queue.claim("worker-a")
    assert new.lease_owner != old.lease_owner
    await queue.downloader(ScriptedFetcher([PNG]), owner="worker-a").run(old)
    assert (await queue.image(task.id)).status == "pending"


async def test_an_image_is_fetched_and_stored_once_when_headers_outlast_the_lease(
    queue: Queue,
) -> None:
    """A job slower than its lease keeps it by heartbeat: another worker never takes it over."""
    task = await queue.queued()
    lease = 0.6
    slow = ScriptedFetcher([PNG], delay=lease * 4)
    job = await queue.claim("worker-a", lease=lease)
    running = asyncio.create_task(queue.downloader(slow, "worker-a", lease=lease).run(job))
    rivals: list[DownloadJob] = []
    while not running.done():
        rivals += await queue.claim_all("worker-b", lease=lease)
        await asyncio.sleep(lease / 4)
    await running
    assert rivals == []
    assert len(slow.urls) == 1
    assert len(queue.storage.puts) == 1
    assert (await queue.image(task.id)).status == "stored"


async def test_an_upload_that_outlasts_the_lease_keeps_it(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The heartbeat covers the storage write too (a slow S3 upload), not only the fetch."""
    task = await queue.queued()
    lease = 0.6
    put_file = queue.storage.put_file

    async def slow_put(*args: Any, **kwargs: Any) -> None:
        await asyncio.sleep(lease * 4)
        await put_file(*args, **kwargs)

    monkeypatch.setattr(queue.storage, "put_file", slow_put)
    fetcher = ScriptedFetcher([PNG])
    job = await queue.claim("worker-a", lease=lease)
    running = asyncio.create_task(queue.downloader(fetcher, "worker-a", lease=lease).run(job))
    rivals: list[DownloadJob] = []
    while not running.done():
        rivals += await queue.claim_all("worker-b", lease=lease)
        await asyncio.sleep(lease / 4)
    await running
    assert rivals == []
    assert (len(fetcher.urls), len(queue.storage.puts)) == (1, 1)
    assert (await queue.image(task.id)).status == "stored"


async def test_a_job_that_loses_its_lease_stops_at_once(queue: Queue) -> None:
    """When a renewal matches no row, the job is cancelled before it writes anything."""
    task = await queue.queued()
    lease = 0.6
    slow = ScriptedFetcher([PNG], delay=lease * 6)
    job = await queue.claim("worker-a", lease=lease)
    running = asyncio.create_task(queue.downloader(slow, "worker-a", lease=lease).run(job))
    await asyncio.sleep(lease / 2)
    async with queue.engine.begin() as db:  # an operator (or a bug) hands the image elsewhere
        await db.execute(
            update(IMAGES).where(IMAGES.c.task_id == task.id).values(lease_owner="someone-else")
        )
    # asyncio.wait, not wait_for: a timeout must not cancel the job and so stop it for us.
    done, _ = await asyncio.wait({running}, timeout=lease * 5)
    if not done:
        running.cancel()
    assert done, "the job ran on after its lease was lost"
    assert slow.finished == 0  # stopped mid-fetch
    assert queue.storage.puts == []
    assert (await queue.image(task.id)).lease_owner == "someone-else"
    assert list(queue.storage.spool_dir.iterdir()) == []


async def test_a_database_blip_during_renewals_does_not_stop_the_job(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A renewal that fails while the lease is still ours keeps the job; it stores once."""
    task = await queue.queued()
    lease = 0.6
    slow = ScriptedFetcher([PNG], delay=lease * 4)
    job = await queue.claim("worker-a", lease=lease)
    downloader = queue.downloader(slow, "worker-a", lease=lease)
    renew = downloader._renew
    calls = 0

    async def blip(job: DownloadJob) -> bool:
        nonlocal calls
        calls += 1
        if calls == 5:  # after more than a lease length of successful renewals
            raise ConnectionError("database restarting")
        return await renew(job)

    monkeypatch.setattr(downloader, "_renew", blip)
    await downloader.run(job)
    assert calls > 6
    assert (slow.finished, queue.storage.puts) == (1, [image_key(job, "png")])
    assert (await queue.image(task.id)).status == "stored"


async def test_a_job_whose_renewals_keep_failing_stops_when_its_lease_runs_out(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The database gone for good: the job stops once the lease it last got has lapsed."""
    await queue.queued()
    lease = 0.6
    slow = ScriptedFetcher([PNG], delay=lease * 6)
    job = await queue.claim("worker-a", lease=lease)
    downloader = queue.downloader(slow, "worker-a", lease=lease)

    async def unreachable(job: DownloadJob) -> bool:
        raise ConnectionError("database unreachable")

    monkeypatch.setattr(downloader, "_renew", unreachable)
    running = asyncio.create_task(downloader.run(job))
    done, _ = await asyncio.wait({running}, timeout=lease * 4)
    if not done:
        running.cancel()
    assert done, "the job ran on with a lease it could no longer prove"
    assert (slow.finished, queue.storage.puts) == (0, [])


async def test_a_lease_lost_during_the_storage_write_is_not_counted_as_stored(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fenced at the record too: the image taken over mid-upload is the new owner's to record."""
    task = await queue.queued()
    job = await queue.claim()
    put_file = queue.storage.put_file

    async def handed_over_meanwhile(*args: Any, **kwargs: Any) -> None:
        await put_file(*args, **kwargs)
        async with queue.engine.begin() as db:
            await db.execute(
                update(IMAGES).where(IMAGES.c.task_id == task.id).values(lease_owner="other")
            )

    monkeypatch.setattr(queue.storage, "put_file", handed_over_meanwhile)
    lost, stored = (metrics.DOWNLOADS.labels(outcome=o) for o in ("lease_lost", "stored"))
    before = (lost._value.get(), stored._value.get())
    await queue.downloader(ScriptedFetcher([PNG])).run(job)
    assert (lost._value.get(), stored._value.get()) == (before[0] + 1, before[1])
    image = await queue.image(task.id)
    assert (image.status, image.lease_owner) == ("pending", "other")


async def test_a_lease_lost_before_a_retry_is_recorded_records_nothing(
    queue: Queue, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A storage failure after the image was taken over: no retry is written, the job just ends."""
    task = await queue.queued()
    job = await queue.claim()

    async def handed_over_then_failed(*args: Any, **kwargs: Any) -> None:
        async with queue.engine.begin() as db:
            await db.execute(
                update(IMAGES).where(IMAGES.c.task_id == task.id).values(lease_owner="other")
            )
        raise StorageError("bucket unavailable")

    monkeypatch.setattr(queue.storage, "put_file", handed_over_then_failed)
    lost = metrics.DOWNLOADS.labels(outcome="lease_lost")
    before = lost._value.get()
    await queue.downloader(ScriptedFetcher([PNG])).run(job)
    assert lost._value.get() == before + 1
    image = await queue.image(task.id)
    assert (image.status, image.lease_owner, image.error_code) == ("pending", "other", None)


async def test_an_attempt_removes_the_temp_files_of_earlier_attempts(queue: Queue) -> None:
    """A crashed attempt's spool file is removed by the next one; other images' files stay."""
    task = await queue.queued()
    spool = queue.storage.spool_dir
    leftover = spool / f"{task.id}-0-0123456789ab.part"
    other = spool / f"{task.id}-1-0123456789ab.part"
    leftover.write_bytes(b"half an image")
    other.write_bytes(b"another image's download")
    await queue.downloader(ScriptedFetcher([PNG])).run(await queue.claim())
    assert (await queue.image(task.id)).status == "stored"
    assert list(spool.iterdir()) == [other]


async def test_every_attempt_spools_to_its_own_file(queue: Queue) -> None:
    """Two attempts at one image never share a temp file."""
    await queue.queued()
    fetcher = ScriptedFetcher([FetchError("timeout", "slow", retryable=True), PNG])
    downloader = queue.downloader(fetcher)
    await downloader.run(await queue.claim())
    async with queue.engine.begin() as db:
        await db.execute(update(IMAGES).values(next_attempt_at=utcnow()))
    await downloader.run(await queue.claim())
    assert len(set(fetcher.destinations)) == 2


async def test_a_worker_never_claims_an_image_it_is_running(queue: Queue) -> None:
    """Even with its lease lapsed, an image this worker still runs is not claimed again."""
    task = await queue.queued()
    job = await queue.claim("worker-a", lease=0.01)
    await asyncio.sleep(0.05)
    again = await queue.claim_all("worker-a", running=[(job.task_id, job.position)])
    assert again == []
    assert [j.task_id for j in await queue.claim_all("worker-a")] == [task.id]


async def test_one_claim_leases_the_oldest_due_first_each_under_this_claims_token(
    queue: Queue,
) -> None:
    """A claim of several images returns them oldest due first, each carrying what its
    download needs; each row holds its job's token, which no later claim repeats."""
    older = await queue.queued(images=2, source_url="https://cdn.example.com/old.png")
    newer = await queue.queued()
    async with queue.engine.begin() as db:
        await db.execute(
            update(IMAGES)
            .where(IMAGES.c.task_id == older.id)
            .values(next_attempt_at=utcnow() - timedelta(minutes=5))
        )
    jobs = await queue.claim_all("worker-a", limit=5)
    assert [(job.task_id, job.position) for job in jobs] == [
        (older.id, 0),
        (older.id, 1),
        (newer.id, 0),
    ]
    assert len({(job.task_id, job.position, job.lease_owner) for job in jobs}) == 3
    assert all(job.lease_owner.startswith("worker-a/") for job in jobs)
    for job in jobs:
        image = await queue.image(job.task_id, job.position)
        assert (image.lease_owner, image.attempts) == (job.lease_owner, 1)
        assert job.attempts == 1
        assert job.task_created_at.tzinfo is not None
    first = jobs[0]
    assert first.source_url == "https://cdn.example.com/old.png"
    assert first.upstream_task_id == older.upstream_task_id
    assert first.completed_at == older.completed_at
    async with queue.engine.begin() as db:
        await db.execute(update(IMAGES).values(lease_until=utcnow() - timedelta(seconds=1)))
    again = await queue.claim_all("worker-a", limit=5)
    assert not {job.lease_owner for job in again} & {job.lease_owner for job in jobs}


async def test_leased_jobs_are_not_claimed_twice_until_released(queue: Queue) -> None:
    """A live lease hides the job; releasing the leases makes it due again."""
    await queue.queued()
    await queue.claim("worker-a")
    assert await queue.claim_all("worker-b", limit=5) == []
    async with queue.engine.begin() as db:
        assert await repository.release_download_leases(db, "worker-a") == 1
    assert (await queue.claim("worker-b")).lease_owner.startswith("worker-b/")


@pytest.mark.postgres
async def test_two_images_settling_at_once_leave_the_task_stored(
    postgres_database: str, tmp_path: Path
) -> None:
    """Both images stored in overlapping transactions: the summary sees both (no write skew)."""
    engine = create_engine(postgres_database)
    queue = Queue(engine, CountingStorage(tmp_path / "images"), tmp_path)
    try:
        task = await queue.queued(images=2)
        first, second = sorted(await queue.claim_all(limit=2), key=lambda job: job.position)
        stored = {"status": "stored", "lease_owner": None, "lease_until": None}
        async with engine.connect() as a, engine.connect() as b:
            await a.begin()
            await b.begin()
            assert await repository.update_download(a, first, stored, settles=True, now=utcnow())
            racing = asyncio.create_task(
                repository.update_download(b, second, stored, settles=True, now=utcnow())
            )
            await asyncio.sleep(0.2)  # b waits on the task's row while a is open
            await a.commit()
            assert await racing
            await b.commit()
        assert (await queue.task(task.id)).image_status == "stored"
    finally:
        await engine.dispose()


async def test_a_storage_without_a_usable_spool_is_a_storage_retry_not_a_crash(
    queue: Queue,
) -> None:
    """The storage root replaced by a file: the job records `storage` and gives its lease back."""
    task = await queue.queued()
    job = await queue.claim()
    root = queue.storage.root
    shutil.rmtree(root, ignore_errors=True)
    root.parent.mkdir(parents=True, exist_ok=True)
    root.write_text("the storage volume is gone\n")
    fetcher = ScriptedFetcher([PNG])
    await queue.downloader(fetcher).run(job)
    stored = await queue.image(task.id)
    assert (stored.status, stored.error_code, stored.lease_owner) == ("pending", "storage", None)
    assert fetcher.urls == []


async def _events(queue: Queue, task_id: str) -> list[tuple[str, dict[str, Any]]]:
    async with queue.engine.connect() as db:
        rows = await event_repository.read_events(
            db, EventScope(task_id=task_id), after=None, limit=50, below_txid=None
        )
    return [(row.type, row.data) for row in rows]


async def test_each_settled_image_appends_one_event_saying_which_image(queue: Queue) -> None:
    """image.failed then image.stored, each with its index and the task's images as they are."""
    task = await queue.queued(images=2)
    first, second = sorted(await queue.claim_all(limit=2), key=lambda job: job.position)
    await queue.downloader(ScriptedFetcher([FetchError("not_an_image", "html")])).run(first)
    await queue.downloader(ScriptedFetcher([PNG])).run(second)
    (failed_type, failed), (stored_type, stored) = await _events(queue, task.id)
    assert (failed_type, failed["image_index"]) == ("image.failed", 0)
    assert [image["status"] for image in failed["images"]] == ["failed", "pending"]
    assert failed["settled"] is False
    assert (stored_type, stored["image_index"]) == ("image.stored", 1)
    assert [image["status"] for image in stored["images"]] == ["failed", "stored"]
    assert stored["images"][1]["url"] == f"/tasks/{task.id}/images/1"
    assert stored["settled"] is True


async def test_a_download_that_lost_its_lease_appends_no_event(queue: Queue) -> None:
    """No write, no event: the job that took the image over tells instead."""
    task = await queue.queued()
    job = await queue.claim()
    async with queue.engine.begin() as db:
        await db.execute(
            update(IMAGES).where(IMAGES.c.task_id == task.id).values(lease_owner="someone-else")
        )
    await queue.downloader(ScriptedFetcher([PNG])).run(job)
    assert await _events(queue, task.id) == []
