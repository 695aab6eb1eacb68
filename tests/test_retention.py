"""Bounded growth: callback deliveries and idempotency records go after their retention.

Run on both databases: the deletes are batched by a subquery with a limit, which
each dialect must accept.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import text

from app import activity, repository
from app import worker as worker_module
from app.config import Settings, SettingsError
from app.models import IdempotencyRecord, utcnow
from app.worker import BackgroundWorker
from tests.conftest import LogLines, Service, make_settings
from tests.factories import make_task
from tests.helpers import simulator_transport, with_plan


async def seed(service: Service, now: datetime) -> dict[str, str]:
    """Tasks with old and recent deliveries and idempotency records; their ids by role."""
    async with service.runtime.sessions() as session:
        settled = await make_task(session, status="completed")
        submitting = await make_task(session, status="submitting", upstream_task_id=None)
        recent = await make_task(session, status="pending")
    async with service.runtime.engine.begin() as db:
        for age_days, task_id in [(31, settled.id)] * 5 + [(29, recent.id)] * 2:
            await repository.insert_delivery(
                db,
                {
                    "task_id": task_id,
                    "body_sha256": hashlib.sha256(str(age_days).encode()).hexdigest(),
                    "upstream_status": "completed",
                    "outcome": "applied",
                    "changed": True,
                    "received_at": now - timedelta(days=age_days),
                },
            )
    async with service.runtime.engine.begin() as db:
        for age_days, task_id in [(31, settled.id)] * 3 + [(29, recent.id)]:
            when = now - timedelta(days=age_days)
            await activity.note(db, task_id, activity.Kind.QUERY, "ok", at=when)
    async with service.runtime.sessions() as session:
        for key, task_id, age_days in [
            ("old-settled", settled.id, 8),
            ("old-submitting", submitting.id, 8),
            ("recent", recent.id, 6),
        ]:
            session.add(
                IdempotencyRecord(
                    owner="tests",
                    key=key,
                    request_sha256="0" * 64,
                    task_id=task_id,
                    created_at=now - timedelta(days=age_days),
                )
            )
        await session.commit()
    return {"settled": settled.id, "submitting": submitting.id, "recent": recent.id}


async def remaining(service: Service) -> tuple[list[str], list[str]]:
    """Task ids of the deliveries left, and the idempotency keys left."""
    deliveries = await service.sql("SELECT task_id FROM callback_deliveries ORDER BY id")
    keys = await service.sql("SELECT key FROM idempotency_records ORDER BY key")
    return [row[0] for row in deliveries], [row[0] for row in keys]


async def build(service_factory: Any, settings: Settings) -> Service:
    transport, _ = simulator_transport()
    service: Service = await service_factory(settings, transport)
    return service


@pytest.mark.asyncio(loop_scope="session")
async def test_pruning_goes_in_batches_and_keeps_recent_and_submitting_rows(
    service_factory: Any, settings: Settings
) -> None:
    """Each call deletes at most its limit; old rows go, recent and still-submitting stay."""
    service = await build(service_factory, settings)
    now = utcnow()
    ids = await seed(service, now)
    cutoff = now - timedelta(days=30)
    batches = []
    while True:
        async with service.runtime.engine.begin() as db:
            deleted = await repository.prune_callback_deliveries(db, before=cutoff, limit=2)
        batches.append(deleted)
        if deleted == 0:
            break
    assert batches == [2, 2, 1, 0]
    async with service.runtime.engine.begin() as db:
        assert (
            await repository.prune_idempotency_records(
                db, before=now - timedelta(days=7), limit=1000
            )
            == 1
        )
    deliveries, keys = await remaining(service)
    assert deliveries == [ids["recent"]] * 2
    assert keys == ["old-submitting", "recent"]


@pytest.mark.asyncio(loop_scope="session")
async def test_a_prune_deletes_no_more_than_its_batch_when_statistics_are_stale(
    service_factory: Any, settings: Settings
) -> None:
    """PostgreSQL analyzed the tables while they were empty: a plan that rescans the
    batch's subquery must still delete one batch per call, never all the old rows at
    once (small batches keep each statement's locks short)."""
    service = await build(service_factory, settings)
    if service.runtime.engine.dialect.name == "postgresql":
        async with service.runtime.engine.begin() as db:
            for table in ("callback_deliveries", "task_activity", "idempotency_records"):
                await db.execute(text(f"ANALYZE {table}"))
    now = utcnow()
    ids = await seed(service, now)
    async with service.runtime.sessions() as session:
        for key in ("a", "b", "c"):
            session.add(
                IdempotencyRecord(
                    owner="tests",
                    key=f"old-{key}",
                    request_sha256="0" * 64,
                    task_id=ids["settled"],
                    created_at=now - timedelta(days=8),
                )
            )
        await session.commit()
    prunes = [
        (repository.prune_callback_deliveries, now - timedelta(days=30), [1, 1, 1, 1, 1, 0]),
        (activity.prune, now - timedelta(days=30), [1, 1, 1, 0]),
        (repository.prune_idempotency_records, now - timedelta(days=7), [1, 1, 1, 1, 0]),
    ]
    for prune, before, expected in prunes:
        batches = []
        for _ in expected:
            async with service.runtime.engine.begin() as db:
                batches.append(await prune(db, before=before, limit=1))
        assert batches == expected, prune.__name__


# Off, these make PostgreSQL plan the batch's IN subquery as the inner side of a nested
# loop, rescanned for each row (a plan it may choose on its own).
RESCANNING_PLAN = (
    "enable_hashjoin",
    "enable_mergejoin",
    "enable_material",
    "enable_hashagg",
    "enable_sort",
)


@pytest.mark.asyncio(loop_scope="session")
async def test_a_prune_deletes_one_batch_whatever_plan_postgres_picks(
    service_factory: Any, settings: Settings
) -> None:
    service = await build(service_factory, settings)
    if service.runtime.engine.dialect.name != "postgresql":
        pytest.skip("planner settings are PostgreSQL's")
    now = utcnow()
    await seed(service, now)
    prunes = [
        (repository.prune_callback_deliveries, now - timedelta(days=30), 5),
        (activity.prune, now - timedelta(days=30), 3),
    ]
    for prune, before, old_rows in prunes:
        batches = []
        for _ in range(old_rows + 1):
            async with service.runtime.engine.begin() as db:
                for setting in RESCANNING_PLAN:
                    await db.execute(text(f"SET LOCAL {setting} = off"))
                batches.append(await prune(db, before=before, limit=1))
        assert batches == [1] * old_rows + [0], prune.__name__


@pytest.mark.asyncio(loop_scope="session")
async def test_the_worker_prunes_after_the_configured_retention(
    service_factory: Any, database_url: str, tmp_path: Path
) -> None:
    """The background worker's retention loop applies the settings, batch after batch."""
    settings = make_settings(
        database_url, tmp_path, callback_retention_days=30, idempotency_retention_days=7
    )
    service = await build(service_factory, settings)
    ids = await seed(service, utcnow())
    worker = BackgroundWorker(service.runtime, prune_batch_rows=2, prune_pause_seconds=0)
    await worker.start()
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while (await remaining(service))[0] != [ids["recent"]] * 2:
            assert asyncio.get_running_loop().time() < deadline, await remaining(service)
            await asyncio.sleep(0.1)
    finally:
        await worker.stop()
    deliveries, keys = await remaining(service)
    assert deliveries == [ids["recent"]] * 2
    assert keys == ["old-submitting", "recent"]
    # The timeline's activity goes with the deliveries.
    activity_left = await service.sql("SELECT task_id FROM task_activity")
    assert [row[0] for row in activity_left] == [ids["recent"]]


@pytest.mark.asyncio(loop_scope="session")
async def test_a_shorter_retention_setting_prunes_more(
    service_factory: Any, database_url: str, tmp_path: Path
) -> None:
    """IDEMPOTENCY_RETENTION_DAYS and CALLBACK_RETENTION_DAYS are what the loop uses."""
    settings = make_settings(
        database_url, tmp_path, callback_retention_days=1, idempotency_retention_days=1
    )
    service = await build(service_factory, settings)
    await seed(service, utcnow())
    worker = BackgroundWorker(service.runtime, prune_batch_rows=1000, prune_pause_seconds=0)
    await worker.start()
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while (await remaining(service)) != ([], ["old-submitting"]):
            assert asyncio.get_running_loop().time() < deadline, await remaining(service)
            await asyncio.sleep(0.1)
    finally:
        await worker.stop()


@pytest.mark.parametrize("name", ["callback_retention_days", "idempotency_retention_days"])
def test_retention_settings_have_defaults_and_refuse_zero(
    name: str, sqlite_url: str, tmp_path: Path
) -> None:
    """30 and 7 days unless set; zero or less is refused with a one-line reason."""
    settings = make_settings(sqlite_url, tmp_path)
    assert (settings.callback_retention_days, settings.idempotency_retention_days) == (30, 7)
    with pytest.raises(SettingsError, match=name.upper()):
        make_settings(sqlite_url, tmp_path, **{name: 0})


@pytest.mark.asyncio(loop_scope="session")
async def test_a_prune_past_the_rounds_grace_is_cancelled_and_the_loop_still_ends(
    service_factory: Any,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
    capture_logs: LogLines,
) -> None:
    """A round still running when its grace at a stop ends is cancelled, and said; the cancel
    can land inside a database call that swallows it (aiosqlite can): the retention loop
    still ends, instead of pausing an hour until its next pass."""
    service = await build(service_factory, settings)
    pruning = asyncio.Event()

    async def absorbing(*_: Any, **__: Any) -> int:
        pruning.set()
        # The statement finished anyway, and the driver returned its result.
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.sleep(60)
        return 0

    monkeypatch.setattr(repository, "prune_callback_deliveries", absorbing)
    monkeypatch.setattr(worker_module, "ROUND_GRACE_SECONDS", 0.2)
    worker = BackgroundWorker(service.runtime)
    await worker.start()
    await asyncio.wait_for(pruning.wait(), timeout=30)
    await asyncio.wait_for(worker.stop(), timeout=30)
    logs = capture_logs()
    cancelled = [line["loop"] for line in logs if line["event"] == "loop_cancelled_at_stop"]
    # Another loop may be late too: waiting on SQLite's write lock, which the prune holds.
    assert "retention" in cancelled
    assert [line for line in logs if line["level"] in ("warning", "error")] == []
    assert "worker_stopped" in [line["event"] for line in logs]


@pytest.mark.asyncio(loop_scope="session")
async def test_an_idempotency_prune_reads_the_oldest_records_by_an_index(
    service_factory: Any, settings: Settings
) -> None:
    """Idempotency records are keyed by caller and key, not by age: a batch of the
    prune reaches the expired ones by an index on their age, oldest first, instead of
    reading every record (millions, for a busy caller) for each batch of a thousand."""
    service = await build(service_factory, settings)
    engine = service.runtime.engine
    now = utcnow()
    async with service.runtime.sessions() as session:
        task = await make_task(session, status="completed")
    recent = [
        {
            "owner": "tests",
            "key": f"recent-{n:05}",
            "request_sha256": "0" * 64,
            "task_id": task.id,
            "created_at": now - timedelta(minutes=n % 600),
        }
        for n in range(3000)
    ]
    # Written youngest first, with keys that sort the other way: neither the order
    # they were written in nor the key's order is their age's.
    expired = [
        {**recent[0], "key": f"expired-{age}", "created_at": now - timedelta(days=age)}
        for age in (8, 9, 10, 11)
    ]
    async with engine.begin() as db:
        await db.execute(IdempotencyRecord.__table__.insert(), recent + expired)  # type: ignore[attr-defined]
        await db.execute(text("ANALYZE idempotency_records"))

    async def prune() -> int:
        async with engine.begin() as db:
            return await repository.prune_idempotency_records(
                db, before=now - timedelta(days=7), limit=2
            )

    deleted, plan = await with_plan(engine, "DELETE FROM idempotency_records", prune)
    assert deleted == 2
    left = await service.sql("SELECT key FROM idempotency_records WHERE key LIKE 'expired-%'")
    assert sorted(row[0] for row in left) == ["expired-8", "expired-9"]
    assert "ix_idempotency_records_created_at" in plan, plan
