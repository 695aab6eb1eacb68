"""Confirmation off, PostgreSQL: terminal callbacks applied together in one
transaction write exactly what the general path writes for each, and answer
the same."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from app.callback_urls import sign
from app.config import Settings
from app.db import create_engine, create_session_factory, statement_commits
from app.errors import DomainError
from app.models import TaskStatus, utcnow
from app.repository import TASKS, TaskState
from app.services import events
from app.services.callback_batches import SnapshotBatches
from app.services.callbacks import apply_in_batch, receive_callback
from app.services.snapshot_batches import BatchDecision, SnapshotCallback, moves_for
from app.services.snapshots import Outcome, classify
from app.upstream import parse_snapshot
from app.webhooks import repository as webhook_repository
from tests.conftest import WEBHOOK_SECRET, make_settings
from tests.factories import make_task
from tests.helpers import dumps, task_body

pytestmark = [pytest.mark.asyncio(loop_scope="session"), pytest.mark.postgres]

STATES = list(TaskStatus)
REPORTED = ["completed", "failed", "cancelled"]
PROVIDER_IDS = ["same", "none on the task", "another"]
OWNER = "batch-owner"
# The tasks' own times are older than this before their callback's moment.
WRITTEN_SINCE = timedelta(seconds=30)
USAGE = {"billing_rule": "per_image", "credits_reserved": 3}
ERROR = {"code": "content_policy", "message": "refused"}


class CountedBatches(SnapshotBatches):
    """Batches that remember their sizes."""

    def __init__(self, engine: AsyncEngine) -> None:
        super().__init__(engine, in_flight=1)
        self.sizes: list[int] = []

    async def _run(
        self, callbacks: list[SnapshotCallback], now: datetime
    ) -> dict[str, BatchDecision]:
        self.sizes.append(len(callbacks))
        return await super()._run(callbacks, now)


def _settings(url: str, tmp_path: Path) -> Settings:
    return make_settings(url, tmp_path, confirm_callbacks=False)


async def subscribe_to_every_event(engine: AsyncEngine, at: datetime) -> None:
    """An endpoint of the twins' owner that hears every event (its outbox rows compared)."""
    async with engine.begin() as db:
        await webhook_repository.insert_endpoint(
            db,
            {
                "id": "whe_" + secrets.token_hex(8),
                "owner": OWNER,
                "url": "https://caller.example.com/all",
                "event_types": webhook_repository.type_list([e.value for e in events.TASK_EVENTS]),
                "secret": "s" * 32,
                "enabled": True,
                "created_at": at,
                "updated_at": at,
            },
        )


async def _twins(engine: AsyncEngine, start: datetime) -> list[tuple[dict[str, Any], ...]]:
    """For every case, two identical tasks, each with the body its callback carries."""
    cases = []
    times = {"created_at": start, "updated_at": start, "next_poll_at": start}
    async with create_session_factory(engine)() as session:
        for status in STATES:
            for reported in REPORTED:
                for provider_id in PROVIDER_IDS:
                    pair = []
                    for _ in range(2):
                        named = f"task-unified-1-{secrets.token_hex(6)}"
                        carried = {"same": named, "none on the task": None}.get(
                            provider_id, f"{named}-another"
                        )
                        task = await make_task(
                            session,
                            status=status.value,
                            upstream_task_id=carried,
                            owner=OWNER,
                            n=2,
                            progress=40,
                            webhook_url="https://caller.example.com/hook",
                            webhook_events=webhook_repository.type_list(
                                [e.value for e in events.SETTLED_EVENTS]
                            ),
                            **times,
                        )
                        error = ERROR if reported == "failed" else None
                        snapshot = task_body(reported, upstream_id=named, error=error)
                        if reported == "completed":  # the fields written only when given
                            snapshot["data"]["estimated_time"] = 77
                            snapshot["usage"] = USAGE
                        body = dumps(snapshot)
                        pair.append({"task": task, "upstream_id": named, "body": body})
                    cases.append(tuple(pair))
    return cases


async def _general(settings: Settings, engine: AsyncEngine, case: dict[str, Any]) -> Any:
    """What the webhook answers on the general path: an outcome, or an error's status."""
    task_id = case["task"].id
    try:
        async with statement_commits(engine) as db:
            received = await receive_callback(
                db, settings, task_id, sign(task_id, WEBHOOK_SECRET), case["body"]
            )
            await db.commit()
    except DomainError as exc:
        return exc.status_code
    return received.outcome


async def _batched(
    settings: Settings, engine: AsyncEngine, batches: SnapshotBatches, case: dict[str, Any]
) -> tuple[Any, bool]:
    """What the webhook answers when it tries the batch first; whether the batch decided."""
    task_id = case["task"].id
    try:
        received = await apply_in_batch(
            batches, settings, task_id, sign(task_id, WEBHOOK_SECRET), case["body"]
        )
    except DomainError as exc:
        return exc.status_code, True
    if received is None:
        return await _general(settings, engine, case), False
    return received.outcome, True


def _same_shape(value: Any, case: dict[str, Any], now: datetime | None) -> Any:
    """`value` with what differs between twins by construction named instead: the
    task's ids, and the moment its callback was decided."""
    if isinstance(value, dict):
        return {k: _same_shape(v, case, now) for k, v in value.items()}
    if isinstance(value, list):
        return [_same_shape(v, case, now) for v in value]
    if isinstance(value, datetime) and now is not None and value > now - WRITTEN_SINCE:
        return ("NOW", value - now)  # written by the callback (a link's expiry: from now)
    if isinstance(value, str):
        try:  # a time in an event's data
            return _same_shape(datetime.fromisoformat(value), case, now)
        except ValueError:
            return value.replace(case["task"].id, "TASK").replace(case["upstream_id"], "UPSTREAM")
    return value


async def written_rows(engine: AsyncEngine, task_id: str, **more: str) -> dict[str, Any]:
    """The task's row, its images, events and outbox rows, and the rows of each `more`
    query (a parameter `:id`), by name."""
    queries = {
        "images": "SELECT * FROM images WHERE task_id = :id ORDER BY position",
        "events": "SELECT type, task_id, owner, created_at, data FROM events"
        " WHERE task_id = :id ORDER BY seq",
        "outbox": "SELECT e.type, d.task_id, d.owner, d.target, d.status, d.attempts,"
        " d.next_attempt_at, d.created_at, d.updated_at FROM webhook_deliveries d"
        " JOIN events e ON e.id = d.event_id WHERE d.task_id = :id ORDER BY d.target",
        **more,
    }
    async with engine.connect() as db:
        task = (await db.execute(select(TASKS).where(TASKS.c.id == task_id))).one()
        written: dict[str, Any] = {"task": dict(task._mapping)}
        for name, sql in queries.items():
            found = await db.execute(text(sql), {"id": task_id})
            written[name] = [dict(row._mapping) for row in found]
    for image in written["images"]:
        image.pop("id", None)
    return written


async def _written(engine: AsyncEngine, case: dict[str, Any]) -> dict[str, Any]:
    """Every row the callback may have written, about this task, comparable across twins."""
    written = await written_rows(
        engine,
        case["task"].id,
        deliveries="SELECT body_sha256, upstream_status, outcome, changed, received_at"
        " FROM callback_deliveries WHERE task_id = :id",
    )
    deliveries = written["deliveries"]
    for delivery in deliveries:
        assert delivery.pop("body_sha256") == hashlib.sha256(case["body"]).hexdigest()
    now = deliveries[0]["received_at"] if deliveries else None
    return dict(_same_shape(written, case, now))


async def test_a_batch_writes_and_answers_each_callback_as_the_general_path_does(
    postgres_database: str, tmp_path: Path
) -> None:
    """Every state, reported terminal status and provider id in one batch, next to a
    twin decided by the general path: the same answer, and the same task row, images,
    event, outbox rows and delivery row."""
    engine = create_engine(postgres_database)
    settings = _settings(postgres_database, tmp_path)
    batches = CountedBatches(engine)
    start = utcnow().replace(microsecond=0) - timedelta(minutes=1)
    try:
        await subscribe_to_every_event(engine, start)
        cases = await _twins(engine, start)
        alone = [await _general(settings, engine, general) for general, _ in cases]
        batched = await asyncio.gather(
            *(_batched(settings, engine, batches, twin) for _, twin in cases)
        )
        assert batches.sizes == [len(cases)]  # one transaction for all of them
        for (general, twin), answer, (twin_answer, _) in zip(cases, alone, batched, strict=True):
            assert twin_answer == answer, general["task"].status
            expected, written = await _written(engine, general), await _written(engine, twin)
            for table, rows in expected.items():
                assert written[table] == rows, table
        decided_by_batch = {answer for answer, by_batch in batched if by_batch}
        assert decided_by_batch == {"applied", "duplicate", "anomaly"}
        # A provider id the task lacks, or another task's, is the general path's.
        assert sum(by_batch for _, by_batch in batched) == len(STATES) * len(REPORTED)
    finally:
        await engine.dispose()


@pytest.mark.parametrize("current", list(TaskStatus))
@pytest.mark.parametrize("reported", REPORTED)
async def test_the_batch_update_alone_agrees_with_the_rules(
    postgres_database: str, current: TaskStatus, reported: str
) -> None:
    """The batch's UPDATE, run without the batch's own `classify` in front of it (as a
    race would find it), moves exactly the tasks `classify` says it may."""
    engine = create_engine(postgres_database)
    try:
        async with create_session_factory(engine)() as session:
            task = await make_task(session, status=current.value, progress=10)
        snapshot = parse_snapshot(task_body(reported, upstream_id=str(task.upstream_task_id)))
        state = TaskState(task.id, current, 10, task.upstream_task_id)
        async with engine.connect() as db:
            moved = await moves_for(db, [(task.id, snapshot)], utcnow())
            await db.rollback()
        assert (task.id in moved) == (classify(state, snapshot) is Outcome.APPLIED)
    finally:
        await engine.dispose()
