"""The state machine: apply one upstream snapshot to one task.

The webhook, the reconciler and the submit path all come through here, and
only here are transitions decided. Every change is a conditional UPDATE, so two
concurrent deliveries of the same snapshot cannot both win.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import ColumnElement, and_, case, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlmodel import col

from app import repository
from app.errors import NotFound
from app.models import ImageStatus, Task, TaskStatus
from app.schemas import Snapshot

log = structlog.get_logger(__name__)


class Outcome(enum.StrEnum):
    APPLIED = "applied"  # the task moved forward
    DUPLICATE = "duplicate"  # it already said exactly this
    STALE = "stale"  # older news than the task already has
    ANOMALY = "anomaly"  # a different terminal state after a terminal one
    MISMATCH = "mismatch"  # the snapshot is about another provider task
    CONFIRMING = "confirming"  # a terminal callback waiting for the query API


@dataclass(frozen=True)
class Applied:
    outcome: Outcome
    task: Task

    @property
    def changed(self) -> bool:
        return self.outcome is Outcome.APPLIED


def _status_in(statuses: list[TaskStatus]) -> ColumnElement[bool]:
    return col(Task.status).in_([s.value for s in statuses])


async def owns_upstream_id(session: AsyncSession, task: Task, upstream_id: str | None) -> bool:
    """False when the snapshot names a provider task other than this one's."""
    if upstream_id is None:
        return True
    if task.upstream_task_id is not None:
        return task.upstream_task_id == upstream_id
    other = await session.execute(
        select(col(Task.id)).where(
            col(Task.upstream_task_id) == upstream_id, col(Task.id) != task.id
        )
    )
    return other.first() is None


def _transition(
    snapshot: Snapshot, *, now: datetime, poll_after: timedelta
) -> tuple[ColumnElement[bool], dict[str, Any]]:
    """The WHERE that makes this a forward move, and the values it sets."""
    target = snapshot.status
    values: dict[str, Any] = {"status": target.value, "updated_at": now, "last_event_at": now}
    if snapshot.upstream_id:
        values["upstream_task_id"] = func.coalesce(col(Task.upstream_task_id), snapshot.upstream_id)
    if snapshot.estimated_time is not None:
        values["estimated_time"] = func.coalesce(col(Task.estimated_time), snapshot.estimated_time)

    if not target.terminal:
        progress = snapshot.progress or 0
        earlier = [s for s in TaskStatus if s.rank < target.rank]
        condition = or_(
            _status_in(earlier),
            and_(col(Task.status) == target.value, col(Task.progress) < progress),
        )
        values["progress"] = case(
            (col(Task.progress) < progress, progress), else_=col(Task.progress)
        )
        values["next_poll_at"] = now + poll_after
        values["poll_attempts"] = 0
        return condition, values

    values.update(completed_at=now, next_poll_at=None, poll_lease_until=None)
    if target is TaskStatus.COMPLETED:
        values.update(
            progress=100,
            image_status=ImageStatus.PENDING.value,
            image_source_url=snapshot.image_url,
            image_source_expires_at=snapshot.image_expires_at,
            image_next_attempt_at=now,
            image_attempts=0,
        )
    elif target is TaskStatus.FAILED:
        values.update(
            error_code=snapshot.error_code or "generation_failed",
            error_message=snapshot.error_message or "StarMagic reported that the task failed",
        )
    else:
        values.update(
            error_code="cancelled",
            error_message=snapshot.error_message or "the task was cancelled at StarMagic",
        )
    active = [s for s in TaskStatus if not s.terminal]
    return _status_in(active), values


def _why_not(task: Task, target: TaskStatus) -> Outcome:
    current = TaskStatus(task.status)
    if current is target:
        return Outcome.DUPLICATE
    if current.terminal and target.terminal:
        return Outcome.ANOMALY
    return Outcome.STALE


async def apply_snapshot(
    session: AsyncSession,
    task_id: str,
    snapshot: Snapshot,
    *,
    now: datetime,
    poll_after: timedelta,
) -> Applied:
    """Move the task forward if, and only if, the snapshot is news."""
    task = await repository.get_task(session, task_id)
    if task is None:
        raise NotFound(f"task {task_id} does not exist")
    if not await owns_upstream_id(session, task, snapshot.upstream_id):
        log.warning(
            "snapshot_mismatch",
            task_id=task_id,
            upstream_task_id=task.upstream_task_id,
            snapshot_upstream_id=snapshot.upstream_id,
        )
        return Applied(Outcome.MISMATCH, task)

    condition, values = _transition(snapshot, now=now, poll_after=poll_after)
    changed = await repository.update_task_where(session, task_id, condition, values)
    task = await repository.get_task(session, task_id)
    assert task is not None  # tasks are never deleted
    if changed:
        log.info(
            "task_transition",
            task_id=task_id,
            upstream_task_id=task.upstream_task_id,
            status=task.status,
            progress=task.progress,
        )
        return Applied(Outcome.APPLIED, task)
    outcome = _why_not(task, snapshot.status)
    if outcome is Outcome.ANOMALY:
        log.warning(
            "terminal_conflict",
            task_id=task_id,
            upstream_task_id=task.upstream_task_id,
            status=task.status,
            reported=snapshot.status.value,
        )
    return Applied(outcome, task)
