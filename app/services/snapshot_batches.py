"""Terminal callbacks applied together, with confirmation off (PostgreSQL).

The general path spends a pooled connection, a read, a BEGIN and a COMMIT and a
statement per row on each callback. Here the callbacks that arrive together
share one transaction: their rows are read and locked by one statement (in id
order, as every batch locks them), each is decided by `classify` and moved by
`transition`'s guarded UPDATE, and the images, events, outbox rows and
deliveries of the whole batch are written one statement each. A move still
commits with its images, its event, its outbox rows and its delivery.

Only the usual case is taken: a task that already carries the callback's
provider id. Anything else (an unknown provider id to adopt, another task's id)
is left to the general path, which decides it exactly as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncConnection

from app import repository
from app.models import Image, Task, TaskStatus
from app.repository import TaskState
from app.schemas import Snapshot
from app.services import events
from app.services.snapshots import Outcome, classify, image_rows, transition

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class SnapshotCallback:
    """A well-formed terminal callback that names its provider task."""

    task_id: str
    snapshot: Snapshot
    body_sha256: str


@dataclass(frozen=True)
class BatchDecision:
    """What the batch did with one callback. `state`: the task as it stands after
    (None: no such task); `outcome` None: decided nothing, the general path takes it."""

    outcome: Outcome | None
    state: TaskState | None


class MoveLost(Exception):
    """A guarded UPDATE did not match a row the batch holds locked (never expected):
    the batch rolls back and each callback takes the general path."""


async def apply_batch(
    db: AsyncConnection,
    callbacks: Sequence[SnapshotCallback],
    *,
    now: datetime,
    poll_after: timedelta,
) -> dict[str, BatchDecision]:
    """Decide and write callbacks about distinct tasks in the caller's transaction;
    by task id."""
    ordered = sorted(callbacks, key=lambda c: c.task_id)
    states = await repository.lock_states(db, [c.task_id for c in ordered])
    decided: dict[str, BatchDecision] = {}
    images: list[dict[str, Any]] = []
    moves: list[tuple[events.EventType, Task, Sequence[Image]]] = []
    deliveries: list[dict[str, Any]] = []
    for callback in ordered:
        task_id, snapshot = callback.task_id, callback.snapshot
        state = states.get(task_id)
        if state is None or state.upstream_task_id != snapshot.upstream_id:
            decided[task_id] = BatchDecision(None, state)
            continue
        outcome = classify(state, snapshot)
        if outcome is Outcome.APPLIED:
            condition, values = transition(snapshot, now=now, poll_after=poll_after)
            task = await repository.update_returning(db, task_id, condition, values)
            if task is None:
                raise MoveLost(task_id)
            rows: list[dict[str, Any]] = []
            if snapshot.status is TaskStatus.COMPLETED:
                rows = image_rows(task_id, snapshot, now, task.n)
                images.extend(rows)
            kind = events.transition_event(task, now)
            if kind is not None:
                moves.append((kind, task, [Image(**row) for row in rows]))
            state = TaskState(
                task.id, TaskStatus(task.status), task.progress, task.upstream_task_id
            )
        elif outcome is Outcome.ANOMALY:
            log.warning(
                "terminal_conflict",
                task_id=task_id,
                upstream_task_id=state.upstream_task_id,
                status=state.status.value,
                reported=snapshot.status.value,
            )
        deliveries.append(
            {
                "task_id": task_id,
                "body_sha256": callback.body_sha256,
                "upstream_status": snapshot.status.value,
                "outcome": outcome.value,
                "changed": outcome is Outcome.APPLIED,
                "received_at": now,
            }
        )
        decided[task_id] = BatchDecision(outcome, state)
    await repository.queue_images(db, images)
    await events.record_many(db, moves, now=now)
    await repository.insert_deliveries(db, deliveries)
    return decided
