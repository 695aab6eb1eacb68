"""The state machine: apply one upstream snapshot to one task.

The webhook, the reconciler and the submit path all come through here, and
only here are transitions decided. Every change is a conditional UPDATE, so two
concurrent deliveries of the same snapshot cannot both win; a won move appends
its event (app.services.events) in the same transaction. It works on a
plain connection with Core statements: the webhook's hot path stays cheap.
"""

from __future__ import annotations

import enum
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, cast

import structlog
from sqlalchemy import ColumnElement, and_, case, func, or_
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from app import repository
from app.db import each_statement_commits
from app.errors import NotFound
from app.models import Image, ImageStatus, Task, TaskStatus
from app.repository import TASKS, TaskState
from app.schemas import Snapshot, SnapshotImage
from app.services import events
from app.upstream import link_expiry

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
    state: TaskState  # the task as it stands after this snapshot
    task: Task | None = None  # the whole row, when this snapshot moved it

    @property
    def changed(self) -> bool:
        return self.outcome is Outcome.APPLIED


def classify(state: TaskState, snapshot: Snapshot) -> Outcome:
    """What a snapshot would do to a task in this state (the rules, in Python).

    `transition`'s WHERE clause states the same rules in SQL; it is what makes
    them hold when two deliveries race.
    """
    current, target = state.status, snapshot.status
    if current.terminal:
        if target is current:
            return Outcome.DUPLICATE
        return Outcome.ANOMALY if target.terminal else Outcome.STALE
    if target.terminal or target.rank > current.rank:
        return Outcome.APPLIED
    if target is current:
        return Outcome.APPLIED if (snapshot.progress or 0) > state.progress else Outcome.DUPLICATE
    return Outcome.STALE


async def owns_upstream_id(db: AsyncConnection, state: TaskState, upstream_id: str | None) -> bool:
    """False when the snapshot names a provider task other than this one's."""
    if upstream_id is None:
        return True
    if state.upstream_task_id is not None:
        return state.upstream_task_id == upstream_id
    return not await repository.upstream_id_taken(db, upstream_id, other_than=state.id)


class UpstreamIdTaken(Exception):
    """Another task took the provider id after `owns_upstream_id` allowed it: the
    write giving it to this task was undone, and the guard's answer is now no."""


@asynccontextmanager
async def adopting(
    db: AsyncConnection, state: TaskState, upstream_id: str | None
) -> AsyncIterator[None]:
    """Around writes that may give the task `upstream_id`, which `owns_upstream_id`
    allowed.

    The guard cannot see another task's write of the same id before it commits:
    both pass, and the second meets the unique index (PostgreSQL; SQLite's write
    lock keeps them apart). In a PostgreSQL transaction such writes run in a
    savepoint, so the refused one is undone alone (a statement that commits on its
    own, or one on SQLite, is undone by itself), and `UpstreamIdTaken` ends it as
    the guard would have. Only a task without a provider id pays for the savepoint:
    one that has one keeps it.
    """
    if upstream_id is None or state.upstream_task_id is not None:
        yield
        return
    try:
        if db.dialect.name == "postgresql" and not each_statement_commits(db):
            async with db.begin_nested():
                yield
        else:
            yield
    except IntegrityError as exc:
        if not repository.upstream_id_conflict(exc):
            raise
        raise UpstreamIdTaken(upstream_id) from exc


def _status_in(statuses: list[TaskStatus]) -> ColumnElement[bool]:
    return cast(ColumnElement[bool], TASKS.c.status.in_([s.value for s in statuses]))


def transition(
    snapshot: Snapshot, *, now: datetime, poll_after: timedelta
) -> tuple[ColumnElement[bool], dict[str, Any]]:
    """The WHERE that makes this a forward move, and the values it sets."""
    target = snapshot.status
    values: dict[str, Any] = {"status": target.value, "updated_at": now, "last_event_at": now}
    if snapshot.can_cancel is not None:
        values["can_cancel"] = snapshot.can_cancel and not target.terminal
    if snapshot.usage is not None:
        values["usage"] = snapshot.usage
    if snapshot.upstream_id:
        values["upstream_task_id"] = func.coalesce(TASKS.c.upstream_task_id, snapshot.upstream_id)
    if snapshot.estimated_time is not None:
        values["estimated_time"] = func.coalesce(TASKS.c.estimated_time, snapshot.estimated_time)

    if target is TaskStatus.PROCESSING:
        # Stamped when this move is worth a task.processing event (throttled per task).
        tell = or_(
            TASKS.c.status != target.value,
            TASKS.c.progress_event_at.is_(None),
            TASKS.c.progress_event_at <= now - events.PROGRESS_EVENT_INTERVAL,
        )
        values["progress_event_at"] = case((tell, now), else_=TASKS.c.progress_event_at)
    if not target.terminal:
        progress = snapshot.progress or 0
        earlier = [s for s in TaskStatus if s.rank < target.rank]
        condition = or_(
            _status_in(earlier),
            and_(TASKS.c.status == target.value, TASKS.c.progress < progress),
        )
        values["progress"] = case((TASKS.c.progress < progress, progress), else_=TASKS.c.progress)
        # A waiting confirmation keeps the due time its callback set.
        values["next_poll_at"] = repository.due_unless_confirming(now + poll_after)
        values["poll_attempts"] = 0
        return condition, values

    values.update(
        completed_at=now,
        next_poll_at=None,
        poll_lease_until=None,
        can_cancel=False,
        confirm_requested_at=None,
    )
    if target is TaskStatus.COMPLETED:
        # The images themselves are queued by `apply_snapshot` once this move is won.
        values.update(progress=100, image_status=ImageStatus.PENDING.value)
    elif target is TaskStatus.FAILED:
        values.update(
            error_code=snapshot.error_code or "generation_failed",
            error_message=snapshot.error_message or "StarMagic reported that the task failed",
        )
    else:
        values.update(
            error_code=snapshot.error_code or "cancelled",
            error_message=snapshot.error_message or "the task was cancelled at StarMagic",
        )
    return repository.IS_ACTIVE, values


def image_rows(
    task_id: str, snapshot: Snapshot, now: datetime, requested: int = 1
) -> list[dict[str, Any]]:
    """The download queue entries of a completed snapshot: exactly as many as the task
    asked for (`requested`, its n), taken from the provider's links in order.
    Links beyond n were never asked for (and would be stored unbilled to anyone's
    request): they are ignored.

    A link without its own expiry (or with one already past) lives 24 h from the
    provider's completion or, when that is unknown, from now (the latest moment
    the 24 h can have started); no expiry counts beyond 24 h from now.
    An entry without a link (fewer links than asked for, or none) asks the provider
    once for its link before failing `no_image`.
    """
    start = min(snapshot.completed_at or now, now)
    wanted = max(requested, 1)
    if len(snapshot.images) > wanted:
        log.warning(
            "extra_image_links_ignored", task_id=task_id, links=len(snapshot.images), n=wanted
        )
    links = [*snapshot.images[:wanted], *[SnapshotImage("")] * (wanted - len(snapshot.images))]
    return [
        {
            "task_id": task_id,
            "position": position,
            "status": ImageStatus.PENDING.value,
            "source_url": image.url or None,
            "source_expires_at": link_expiry(image.expires_at, start, now),
            "renewed": False,
            "attempts": 0,
            "next_attempt_at": now,
            "created_at": now,
            "updated_at": now,
        }
        for position, image in enumerate(links)
    ]


def log_transition(state: TaskState) -> None:
    """The line a committed move of the task writes (unless the caller's own line
    tells it)."""
    log.info(
        "task_transition",
        task_id=state.id,
        upstream_task_id=state.upstream_task_id,
        status=state.status.value,
        progress=state.progress,
    )


async def apply_snapshot(
    db: AsyncConnection,
    task_id: str,
    snapshot: Snapshot,
    *,
    now: datetime,
    poll_after: timedelta,
    state: TaskState | None = None,
) -> Applied:
    """Move the task forward if, and only if, the snapshot is news.

    `state` saves a read when the caller has just loaded it in this transaction. The
    move is the caller's to tell (`log_transition`, or its own line), once it has
    committed: a transaction that fails later takes the move back.
    """
    state = state or await repository.task_state(db, task_id)
    if state is None:
        raise NotFound(f"task {task_id} does not exist")
    if not await owns_upstream_id(db, state, snapshot.upstream_id):
        return _mismatch(state, snapshot)

    outcome = classify(state, snapshot)
    condition, values = transition(snapshot, now=now, poll_after=poll_after)
    if snapshot.upstream_id:
        # `state` may predate this transaction (the webhook reads it first): the row
        # must still carry this provider id, or none, when the move is written.
        condition = and_(condition, _carries_or_none(snapshot.upstream_id))
    # Re-decide if another delivery moved the task between our read and our write.
    for _ in range(3):
        if outcome is not Outcome.APPLIED:
            break
        try:
            async with adopting(db, state, snapshot.upstream_id):
                task = await repository.update_returning(db, task_id, condition, values)
        except UpstreamIdTaken:
            return _mismatch(state, snapshot)
        if task is not None:
            images: list[Image] = []
            if snapshot.status is TaskStatus.COMPLETED:
                # The row the UPDATE returned carries n: no second read for it.
                rows = image_rows(task_id, snapshot, now, task.n)
                await repository.queue_images(db, rows)
                images = [Image(**row) for row in rows]
            kind = events.transition_event(task, now)
            if kind is not None:
                await events.record(db, kind, task, images, now=now)
            state = TaskState(
                task.id, TaskStatus(task.status), task.progress, task.upstream_task_id
            )
            return Applied(Outcome.APPLIED, state, task)
        reread = await repository.task_state(db, task_id)
        assert reread is not None  # tasks are never deleted
        if not await owns_upstream_id(db, reread, snapshot.upstream_id):
            return _mismatch(reread, snapshot)
        state, outcome = reread, classify(reread, snapshot)
    else:
        outcome = Outcome.STALE  # three races lost in a row: newer news won each time
    if outcome is Outcome.ANOMALY:
        log_terminal_conflict(state, snapshot)
    return Applied(outcome, state)


def log_terminal_conflict(state: TaskState, snapshot: Snapshot) -> None:
    """A terminal task told of another terminal state: kept as it is, and said."""
    log.warning(
        "terminal_conflict",
        task_id=state.id,
        upstream_task_id=state.upstream_task_id,
        status=state.status.value,
        reported=snapshot.status.value,
    )


def _carries_or_none(upstream_id: str) -> ColumnElement[bool]:
    return or_(TASKS.c.upstream_task_id.is_(None), TASKS.c.upstream_task_id == upstream_id)


def _mismatch(state: TaskState, snapshot: Snapshot) -> Applied:
    """The snapshot names a provider task another of ours carries: nothing changes."""
    log.warning(
        "snapshot_mismatch",
        task_id=state.id,
        upstream_task_id=state.upstream_task_id,
        snapshot_upstream_id=snapshot.upstream_id,
    )
    return Applied(Outcome.MISMATCH, state)
