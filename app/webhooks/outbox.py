"""The outbox's SQL: claiming due deliveries with a lease, recording their outcome,
giving leases back, and retention."""

from __future__ import annotations

import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

from sqlalchemy import and_, delete, exists, func, insert, or_, select, update
from sqlalchemy.engine import CursorResult
from sqlalchemy.ext.asyncio import AsyncConnection

from app.webhooks.repository import (
    ATTEMPTS,
    DELIVERIES,
    ENDPOINTS,
    EVENTS,
    FAILED,
    PENDING,
    TASK_TARGET,
    TASKS,
)

# Deliveries to one endpoint (or to one owner's task URLs) being sent at once, at most.
MAX_IN_FLIGHT_PER_TARGET = 2


@dataclass(frozen=True)
class DeliveryJob:
    """One claimed delivery, with all it needs to be sent."""

    id: int
    event_id: str
    task_id: str
    owner: str
    target: str
    attempts: int  # including this one
    lease_owner: str
    event_type: str
    event_created_at: datetime
    data: dict[str, Any]
    url: str | None  # None: the endpoint is gone or disabled, the task has no URL
    secrets: tuple[str, ...]  # endpoint secrets (empty for the task target)


async def claim_due(
    db: AsyncConnection,
    *,
    now: datetime,
    owner: str,
    lease: timedelta,
    limit: int,
    per_target: int = MAX_IN_FLIGHT_PER_TARGET,
) -> list[DeliveryJob]:
    """Lease due deliveries, each the oldest pending one of its task and target.

    A later event of a task waits while an earlier one to the same target is
    still pending (being sent or retried): events arrive in order.
    """
    earlier = DELIVERIES.alias("earlier")
    blocked = exists().where(
        earlier.c.task_id == DELIVERIES.c.task_id,
        earlier.c.target == DELIVERIES.c.target,
        earlier.c.status == PENDING,
        earlier.c.id < DELIVERIES.c.id,
    )
    # Per target (an endpoint; or one owner's task URLs), in flight now and rank among
    # the due: at most `per_target` at once, so a slow receiver holds that
    # many slots and the others' deliveries keep flowing.
    live = DELIVERIES.alias("live")
    in_flight = (
        select(live.c.target, live.c.owner, func.count().label("n"))
        .where(live.c.status == PENDING, live.c.lease_until >= now)
        .group_by(live.c.target, live.c.owner)
        .subquery("in_flight")
    )
    rank = func.row_number().over(
        partition_by=(DELIVERIES.c.target, DELIVERIES.c.owner),
        order_by=(DELIVERIES.c.next_attempt_at, DELIVERIES.c.id),
    )
    due_now = (
        DELIVERIES.c.status == PENDING,
        DELIVERIES.c.next_attempt_at <= now,
        or_(DELIVERIES.c.lease_until.is_(None), DELIVERIES.c.lease_until < now),
        ~blocked,
    )
    ranked = (
        select(
            DELIVERIES.c.id,
            (rank + func.coalesce(in_flight.c.n, 0)).label("slot"),
        )
        .select_from(
            DELIVERIES.outerjoin(
                in_flight,
                and_(
                    in_flight.c.target == DELIVERIES.c.target,
                    in_flight.c.owner == DELIVERIES.c.owner,
                ),
            )
        )
        .where(*due_now)
        .subquery("ranked")
    )
    fair = select(ranked.c.id).where(ranked.c.slot <= per_target)
    due = (
        select(DELIVERIES.c.id)
        # The conditions again on the locked row itself: PostgreSQL re-checks these (not
        # the subquery's snapshot) on a row another claim leased and committed meanwhile.
        .where(DELIVERIES.c.id.in_(fair), *due_now)
        .order_by(DELIVERIES.c.next_attempt_at, DELIVERIES.c.id)
        .limit(limit)
        .with_for_update(skip_locked=True, of=DELIVERIES)
    )
    ids = [int(row.id) for row in (await db.execute(due)).all()]
    jobs: list[DeliveryJob] = []
    for delivery_id in ids:
        token = f"{owner}/{delivery_id}/{secrets.token_hex(3)}"
        await db.execute(
            update(DELIVERIES)
            .where(DELIVERIES.c.id == delivery_id)
            .values(lease_owner=token, lease_until=now + lease, attempts=DELIVERIES.c.attempts + 1)
        )
        job = await _job(db, delivery_id, token, now)
        if job is not None:
            jobs.append(job)
    return jobs


async def _job(
    db: AsyncConnection, delivery_id: int, token: str, now: datetime
) -> DeliveryJob | None:
    """The claimed delivery with its event; None (and the delivery failed, saying why)
    when its event or task is gone, so one orphan never stops the others' claims."""
    statement = (
        select(
            DELIVERIES,
            EVENTS.c.type.label("event_type"),
            EVENTS.c.created_at.label("event_created_at"),
            EVENTS.c.data,
            ENDPOINTS.c.url.label("endpoint_url"),
            ENDPOINTS.c.enabled,
            ENDPOINTS.c.secret,
            ENDPOINTS.c.previous_secrets,
            TASKS.c.webhook_url,
            TASKS.c.webhook_gone_at,
            TASKS.c.id.label("task_exists"),
        )
        .outerjoin(EVENTS, EVENTS.c.id == DELIVERIES.c.event_id)
        .outerjoin(ENDPOINTS, ENDPOINTS.c.id == DELIVERIES.c.target)
        .outerjoin(TASKS, TASKS.c.id == DELIVERIES.c.task_id)
        .where(DELIVERIES.c.id == delivery_id)
    )
    row = (await db.execute(statement)).one()
    if row.event_type is None or row.task_exists is None:
        gone = "its event" if row.event_type is None else "its task"
        await db.execute(
            update(DELIVERIES)
            .where(DELIVERIES.c.id == delivery_id)
            .values(
                status=FAILED,
                last_error=f"dropped: {gone} no longer exists (retention)",
                next_attempt_at=None,
                lease_owner=None,
                lease_until=None,
                updated_at=now,
            )
        )
        return None
    if row.target == TASK_TARGET:
        # A URL that answered 410 gets nothing more, whatever was queued before.
        url, keys = (row.webhook_url if row.webhook_gone_at is None else None), ()
    else:
        url = row.endpoint_url if row.enabled else None
        keys = (row.secret, *live_secrets(row.previous_secrets, now))
    return DeliveryJob(
        id=row.id,
        event_id=row.event_id,
        task_id=row.task_id,
        owner=row.owner,
        target=row.target,
        attempts=row.attempts,
        lease_owner=token,
        event_type=row.event_type,
        event_created_at=row.event_created_at,
        data=row.data,
        url=url,
        secrets=keys,
    )


def live_secrets(previous: list[dict[str, str]] | None, now: datetime) -> list[str]:
    """The replaced secrets still inside their grace period, newest first."""
    return [
        entry["secret"] for entry in previous or [] if datetime.fromisoformat(entry["until"]) > now
    ]


async def finish(db: AsyncConnection, job: DeliveryJob, values: dict[str, Any]) -> bool:
    """Record the outcome while the lease is still ours (fencing); False if it was lost."""
    result = await db.execute(
        update(DELIVERIES)
        .where(DELIVERIES.c.id == job.id, DELIVERIES.c.lease_owner == job.lease_owner)
        .values(lease_owner=None, lease_until=None, **values)
    )
    return int(cast(CursorResult[Any], result).rowcount) > 0


async def record_attempt(db: AsyncConnection, values: dict[str, Any]) -> None:
    """Append one attempt."""
    await db.execute(insert(ATTEMPTS), values)


async def release_leases(db: AsyncConnection, owner: str) -> int:
    """Give back this worker's leases (at a clean stop)."""
    result = await db.execute(
        update(DELIVERIES)
        .where(DELIVERIES.c.lease_owner.like(f"{owner}/%"), DELIVERIES.c.status == PENDING)
        .values(lease_owner=None, lease_until=None, attempts=DELIVERIES.c.attempts - 1)
    )
    return int(cast(CursorResult[Any], result).rowcount)


async def prune_deliveries(db: AsyncConnection, *, before: datetime, limit: int) -> int:
    """Delete up to `limit` settled deliveries created before `before`, with their attempts.

    Runs before the events' pruning, which keeps an event while any delivery of it
    remains: a pending delivery (still in its schedule) is never pruned, nor its event.
    The picked rows stay locked to the end (a redelivery putting one back in the
    queue meanwhile is left alone, and one that did so first keeps it pending).
    """
    oldest = [
        row.id
        for row in (
            await db.execute(
                select(DELIVERIES.c.id)
                .where(DELIVERIES.c.created_at < before, DELIVERIES.c.status != PENDING)
                .order_by(DELIVERIES.c.created_at)
                .limit(limit)
                .with_for_update(skip_locked=True)
            )
        ).all()
    ]
    if not oldest:
        return 0
    await db.execute(delete(ATTEMPTS).where(ATTEMPTS.c.delivery_id.in_(oldest)))
    await db.execute(delete(DELIVERIES).where(DELIVERIES.c.id.in_(oldest)))
    return len(oldest)
