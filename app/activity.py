"""The task activity log: the submission's answer, download attempts and provider
queries, for the timeline.

One small insert, made inside the transaction that records the outcome (so a
row exists only if its outcome committed). Read by the console; pruned with the
callback deliveries.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import Table, insert, select
from sqlalchemy.ext.asyncio import AsyncConnection

from app.db import delete_picked, metadata
from app.models import TaskActivity

ACTIVITY: Table = metadata.tables["task_activity"]
DETAIL_CHARS = 300


class Kind(enum.StrEnum):
    SUBMIT = "submit"  # the provider's answer to our submission
    DOWNLOAD = "download"
    QUERY = "query"


async def note(
    db: AsyncConnection,
    task_id: str,
    kind: Kind,
    outcome: str,
    *,
    at: datetime,
    position: int | None = None,
    detail: str | None = None,
) -> None:
    """Append one activity row in the caller's transaction."""
    values = row(task_id, kind, outcome, at=at, position=position, detail=detail)
    await db.execute(insert(ACTIVITY).values(**values))


async def note_many(db: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    """Append `row`s in the caller's transaction, one statement for all."""
    if rows:
        await db.execute(insert(ACTIVITY), list(rows))


def row(
    task_id: str,
    kind: Kind,
    outcome: str,
    *,
    at: datetime,
    position: int | None = None,
    detail: str | None = None,
) -> dict[str, Any]:
    """One activity row's values (outcome and detail cut to fit)."""
    return {
        "task_id": task_id,
        "kind": kind.value,
        "position": position,
        "outcome": outcome[:64],
        "detail": detail[:DETAIL_CHARS] if detail else None,
        "at": at,
    }


async def for_task(
    db: AsyncConnection, task_id: str, *, limit: int = 500
) -> Sequence[TaskActivity]:
    """A task's activity, oldest first (bounded: a timeline, not an archive)."""
    rows = await db.execute(
        select(ACTIVITY).where(ACTIVITY.c.task_id == task_id).order_by(ACTIVITY.c.id).limit(limit)
    )
    return [TaskActivity(**row._mapping) for row in rows]


async def prune(db: AsyncConnection, *, before: datetime, limit: int) -> int:
    """Delete up to `limit` rows older than `before`; how many went."""
    rows = select(ACTIVITY.c.id).where(ACTIVITY.c.at < before).order_by(ACTIVITY.c.id).limit(limit)
    return await delete_picked(db, ACTIVITY, [ACTIVITY.c.id], rows)
