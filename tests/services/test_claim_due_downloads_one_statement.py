"""claim_due_downloads as one UPDATE ... RETURNING: leases under concurrency, fencing
after a lapse, the `running` list, many images per task, the task's columns, order."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from typing import Any

import pytest
import pytest_asyncio
from sqlalchemy import text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from app import repository
from app.db import create_engine, create_session_factory
from app.models import Image, utcnow
from app.repository import IMAGES, DownloadJob
from app.worker import worker_name
from tests.factories import make_task

pytestmark = pytest.mark.asyncio(loop_scope="session")


@pytest_asyncio.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(database_url)
    yield engine
    await engine.dispose()


async def queued(
    engine: AsyncEngine,
    images: int = 1,
    *,
    due: datetime | None = None,
    due_step: timedelta = timedelta(0),
    **task_fields: Any,
) -> str:
    """A completed task with `images` pending, due images; its id."""
    now = utcnow()
    values: dict[str, Any] = {"status": "completed", "completed_at": now, "next_poll_at": None}
    values.update(task_fields)
    async with create_session_factory(engine)() as session:
        task = await make_task(session, image_status="pending", **values)
        for position in range(images):
            session.add(
                Image(
                    task_id=task.id,
                    position=position,
                    status="pending",
                    source_url=f"https://cdn.example.com/{task.id}/{position}.png",
                    source_expires_at=now + timedelta(hours=23),
                    next_attempt_at=(due or now - timedelta(seconds=1)) + due_step * position,
                    created_at=now,
                    updated_at=now,
                )
            )
        await session.commit()
    return task.id


async def claim(
    engine: AsyncEngine,
    owner: str = "worker-a",
    *,
    limit: int = 1,
    lease: float = 60,
    now: datetime | None = None,
    running: list[tuple[str, int]] | None = None,
    hold: float = 0.0,
) -> list[DownloadJob]:
    async with engine.begin() as db:
        jobs = await repository.claim_due_downloads(
            db,
            now=now or utcnow(),
            owner=owner,
            lease=timedelta(seconds=lease),
            limit=limit,
            running=running or (),
        )
        if hold:
            await asyncio.sleep(hold)  # keep the rows locked while others claim
    return jobs


async def lapse(engine: AsyncEngine) -> None:
    async with engine.begin() as db:
        await db.execute(update(IMAGES).values(lease_until=utcnow() - timedelta(seconds=1)))


async def write(engine: AsyncEngine, job: DownloadJob, values: dict[str, Any]) -> bool:
    async with engine.begin() as db:
        return await repository.update_download(db, job, values)


async def images(engine: AsyncEngine) -> list[Any]:
    async with engine.connect() as db:
        rows = await db.execute(IMAGES.select().order_by(IMAGES.c.task_id, IMAGES.c.position))
        return list(rows)


# Concurrency: every due image leased once, no claim over its limit, nothing skipped.


@pytest.mark.parametrize("claimers", [2, 8])
async def test_concurrent_claimers_lease_every_due_image_exactly_once(
    engine: AsyncEngine, claimers: int
) -> None:
    for n in (10, 10, 7, 3, 1, 10, 2, 10, 5, 1):
        await queued(engine, images=n)
    total = 59
    claimed: list[DownloadJob] = []
    over_limit: list[tuple[int, int]] = []
    rng = random.Random(claimers)

    async def claimer(index: int) -> None:
        empty = 0
        while empty < 3:
            limit = rng.randint(1, 6)
            jobs = await claim(
                engine, f"replica-{index}", limit=limit, hold=rng.choice((0.0, 0.002, 0.01))
            )
            if len(jobs) > limit:
                over_limit.append((limit, len(jobs)))
            claimed.extend(jobs)
            empty = empty + 1 if not jobs else 0

    await asyncio.gather(*(claimer(i) for i in range(claimers)))
    keys = [(job.task_id, job.position) for job in claimed]
    assert not over_limit
    assert len(keys) == len(set(keys)) == total
    rows = await images(engine)
    assert {(row.task_id, row.position): row.lease_owner for row in rows} == {
        (job.task_id, job.position): job.lease_owner for job in claimed
    }
    assert all(row.attempts == 1 for row in rows)


async def test_a_claim_never_leases_more_than_its_limit_while_others_hold_rows(
    engine: AsyncEngine,
) -> None:
    """Another claimer holds the oldest rows locked: SKIP LOCKED passes over them and
    the claim still takes exactly `limit` of the rest, however the plan is shaped."""
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time: nothing to skip")
    for _ in range(6):
        await queued(engine, images=10, due_step=timedelta(milliseconds=1))
    async with engine.begin() as holder:
        held = await repository.claim_due_downloads(
            holder, now=utcnow(), owner="holder", lease=timedelta(seconds=60), limit=7
        )
        assert len(held) == 7
        for limit in (1, 2, 5, 10):
            jobs = await claim(engine, "other", limit=limit)
            assert len(jobs) == limit
            assert not {(j.task_id, j.position) for j in jobs} & {
                (j.task_id, j.position) for j in held
            }


async def test_a_claim_leases_no_more_than_its_limit_when_statistics_are_stale(
    engine: AsyncEngine,
) -> None:
    """PostgreSQL analyzed the images table when it held one row; thirty more fit its
    first page, so the planner still expects one. A claim of one leases one, not all."""
    await queued(engine, images=1)
    if engine.dialect.name == "postgresql":
        async with engine.begin() as db:
            await db.execute(text("ANALYZE images"))
    for _ in range(3):
        await queued(engine, images=10)
    for limit in (1, 3):
        jobs = await claim(engine, limit=limit)
        leased = [row for row in await images(engine) if row.lease_owner is not None]
        assert (len(jobs), len(leased)) == (limit, limit)
        await lapse(engine)
        async with engine.begin() as db:
            await db.execute(update(IMAGES).values(lease_owner=None, lease_until=None))


PLANNER_SETTINGS = (
    (),
    ("enable_hashjoin", "enable_mergejoin"),
    ("enable_hashjoin", "enable_mergejoin", "enable_material"),
    ("enable_hashjoin", "enable_mergejoin", "enable_material", "enable_hashagg"),
    ("enable_hashjoin", "enable_mergejoin", "enable_material", "enable_sort"),
    ("enable_hashjoin", "enable_mergejoin", "enable_material", "enable_hashagg", "enable_sort"),
)


@pytest.mark.parametrize("settings", PLANNER_SETTINGS, ids=lambda s: "-".join(s) or "default")
async def test_limit_holds_whatever_join_the_planner_picks_on_postgres(
    engine: AsyncEngine, settings: tuple[str, ...]
) -> None:
    """Plans that rescan the IN subquery (a nested loop with the subquery inside, not
    materialized) must not lease more than `limit`: the due keys are chosen once."""
    if engine.dialect.name != "postgresql":
        pytest.skip("planner settings are PostgreSQL's")
    for _ in range(5):
        await queued(engine, images=10, due_step=timedelta(milliseconds=1))
    async with engine.begin() as db:
        await db.execute(text("ANALYZE images"))
        for setting in settings:
            await db.execute(text(f"SET LOCAL {setting} = off"))
        jobs = await repository.claim_due_downloads(
            db, now=utcnow(), owner="w", lease=timedelta(seconds=60), limit=2
        )
    leased = [row for row in await images(engine) if row.lease_owner is not None]
    assert (len(jobs), len(leased)) == (2, 2)


# Fencing: a lapsed lease, taken over, leaves the old job unable to write.


@pytest.mark.parametrize("same_owner", [True, False])
async def test_a_lapsed_job_cannot_write_after_its_image_is_claimed_again(
    engine: AsyncEngine, same_owner: bool
) -> None:
    task_id = await queued(engine, images=12)
    old = await claim(engine, "worker-a", limit=12)
    await lapse(engine)
    new = await claim(engine, "worker-a" if same_owner else "worker-b", limit=12)
    assert len(old) == len(new) == 12
    by_image = {(job.task_id, job.position): job for job in new}
    for job in old:
        assert by_image[(job.task_id, job.position)].lease_owner != job.lease_owner
        for values in (
            {"lease_until": utcnow() + timedelta(minutes=5)},  # heartbeat
            {"status": "stored", "key": "x", "lease_owner": None, "lease_until": None},
            {"next_attempt_at": utcnow(), "lease_owner": None, "lease_until": None},  # retry
            {"status": "failed", "lease_owner": None, "lease_until": None},
            {"renewed": True, "source_url": "https://evil.example/x.png"},  # link renewed
        ):
            assert not await write(engine, job, values)
    for job in new:
        assert await write(engine, job, {"lease_until": utcnow() + timedelta(minutes=5)})
    rows = await images(engine)
    assert [(r.status, r.lease_owner, r.source_url) for r in rows] == [
        ("pending", by_image[(task_id, r.position)].lease_owner, r.source_url) for r in rows
    ]
    assert all("evil" not in r.source_url for r in rows)


async def test_one_claims_jobs_fence_each_other_by_image(engine: AsyncEngine) -> None:
    """Two tasks' images at the same position share a claim's token: each job still
    writes only its own image."""
    first = await queued(engine, images=2)
    second = await queued(engine, images=2)
    jobs = await claim(engine, limit=4)
    assert len(jobs) == 4
    mine = next(job for job in jobs if (job.task_id, job.position) == (first, 1))
    assert await write(engine, mine, {"status": "stored", "lease_owner": None})
    rows = {(r.task_id, r.position): r.status for r in await images(engine)}
    assert rows == {
        (first, 0): "pending",
        (first, 1): "stored",
        (second, 0): "pending",
        (second, 1): "pending",
    }


async def test_releasing_one_workers_leases_leaves_another_workers(engine: AsyncEngine) -> None:
    """release_download_leases matches the owner and its slash, never a longer owner."""
    await queued(engine, images=3)
    await queued(engine, images=3)
    await claim(engine, "worker-a", limit=3)
    kept = await claim(engine, "worker-a1", limit=3)
    async with engine.begin() as db:
        assert await repository.release_download_leases(db, "worker-a") == 3
    rows = [r for r in await images(engine) if r.lease_owner is not None]
    assert sorted(r.lease_owner for r in rows) == sorted(j.lease_owner for j in kept)


# The running list, positions past 9, long owners.


@pytest.mark.parametrize("count", [0, 1, 11, 200])
async def test_running_images_are_never_claimed(engine: AsyncEngine, count: int) -> None:
    task_ids = [await queued(engine, images=10) for _ in range(3)]
    everything = [(task_id, position) for task_id in task_ids for position in range(10)]
    running = (
        everything[:count]
        if count <= 30
        else everything + [(f"no-such-task-{i}", i) for i in range(count)]
    )
    jobs = await claim(engine, limit=50, running=running)
    keys = {(job.task_id, job.position) for job in jobs}
    assert keys == set(everything) - set(running)


async def test_the_longest_worker_name_fits_the_lease_column(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A 64-character hostname, a seven-digit pid, ten images: every token fits 64."""
    monkeypatch.setattr("socket.gethostname", lambda: "h" * 64)
    monkeypatch.setattr("os.getpid", lambda: 4_194_304)
    owner = worker_name()
    task_id = await queued(engine, images=10)
    jobs = await claim(engine, owner, limit=10)
    assert [job.position for job in jobs] == list(range(10))
    assert all(len(job.lease_owner) <= 64 for job in jobs)
    assert all(job.lease_owner.startswith(f"{owner}/") for job in jobs)
    for job in jobs:
        assert await write(engine, job, {"lease_until": utcnow() + timedelta(minutes=1)})
    assert {r.task_id for r in await images(engine)} == {task_id}


# The task's columns, each from its own task; types; order.


async def test_each_job_carries_its_own_tasks_columns(engine: AsyncEngine) -> None:
    base = utcnow() - timedelta(hours=3)
    tasks = {
        await queued(
            engine,
            images=n,
            created_at=base + timedelta(minutes=i),
            completed_at=None if i % 2 else base + timedelta(minutes=i, seconds=30),
            upstream_task_id=None if i == 3 else f"up-{i}",
        ): i
        for i, n in enumerate((3, 1, 10, 2, 4))
    }
    jobs = await claim(engine, limit=100)
    assert len(jobs) == 20
    async with create_session_factory(engine)() as session:
        for job in jobs:
            task = await repository.get_task(session, job.task_id)
            assert task is not None
            assert job.upstream_task_id == task.upstream_task_id
            assert job.task_created_at == task.created_at
            assert job.completed_at == task.completed_at
            assert job.task_created_at.tzinfo is not None
            assert job.completed_at is None or job.completed_at.tzinfo is not None
            assert job.source_expires_at is not None
            assert job.source_expires_at.tzinfo is not None
            assert job.source_url == f"https://cdn.example.com/{job.task_id}/{job.position}.png"
            assert (job.attempts, job.renewed) == (1, False)
    assert {job.task_id for job in jobs} == set(tasks)


async def test_the_oldest_due_are_claimed_first_and_in_order(engine: AsyncEngine) -> None:
    now = utcnow()
    offsets = [7, 1, 9, 3, 5, 0, 8, 2, 6, 4]
    keyed = {}
    for offset in offsets:
        task_id = await queued(engine, images=1, due=now - timedelta(minutes=10 - offset))
        keyed[task_id] = offset
    got: list[int] = []
    for limit in (3, 3, 4):
        jobs = await claim(engine, limit=limit, now=now)
        got.extend(keyed[job.task_id] for job in jobs)
    assert got == sorted(offsets)
    assert await claim(engine, limit=5, now=now) == []


async def test_an_image_not_yet_due_or_held_is_not_claimed(engine: AsyncEngine) -> None:
    now = utcnow()
    await queued(engine, images=2, due=now + timedelta(seconds=5))
    assert await claim(engine, limit=5, now=now) == []
    held = await queued(engine, images=1)
    assert len(await claim(engine, "a", limit=5, now=now)) == 1
    assert await claim(engine, "b", limit=5, now=now) == []
    assert len(await claim(engine, "b", limit=5, now=now + timedelta(seconds=61))) == 3
    assert held


async def test_claims_racing_lapses_and_writes_raise_nothing_and_settle_each_image_once(
    engine: AsyncEngine,
) -> None:
    """Replicas claim with short leases that lapse mid-job; jobs renew, then store with
    the task's summary. No deadlock or serialization error, and each image is stored by
    exactly one job: the one holding its lease at the time."""
    if engine.dialect.name != "postgresql":
        pytest.skip("SQLite has one writer at a time")
    for n in (10, 4, 10, 1, 7, 10, 3, 10):
        await queued(engine, images=n)
    total = 55
    stored: list[DownloadJob] = []
    lost: list[DownloadJob] = []
    rng = random.Random(7)

    async def job_runs(job: DownloadJob) -> None:
        await asyncio.sleep(rng.choice((0.0, 0.01, 0.06)))  # past the lease, sometimes
        if not await write(engine, job, {"lease_until": utcnow() + timedelta(seconds=0.05)}):
            lost.append(job)
            return
        await asyncio.sleep(rng.choice((0.0, 0.01, 0.06)))
        now = utcnow()
        async with engine.begin() as db:
            held = await repository.update_download(
                db,
                job,
                {"status": "stored", "key": job.lease_owner, "lease_owner": None},
                settles=True,
                now=now,
            )
        (stored if held else lost).append(job)

    async def replica(index: int) -> None:
        running: list[asyncio.Task[None]] = []
        idle = 0
        while idle < 20:
            jobs = await claim(engine, f"replica-{index}", limit=rng.randint(1, 4), lease=0.05)
            running.extend(asyncio.create_task(job_runs(job)) for job in jobs)
            idle = 0 if jobs else idle + 1
            await asyncio.sleep(0.01)
        await asyncio.gather(*running)

    await asyncio.gather(*(replica(i) for i in range(6)))
    assert lost  # leases did lapse under running jobs, and were fenced
    keys = [(job.task_id, job.position) for job in stored]
    assert len(keys) == len(set(keys)) == total
    rows = {(r.task_id, r.position): r for r in await images(engine)}
    assert all(r.status == "stored" for r in rows.values())
    for job in stored:
        assert rows[(job.task_id, job.position)].key == job.lease_owner
