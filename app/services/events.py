"""The one writer of the event log.

Called inside the transaction that makes the change (the state machine's
successful moves, a settled download, a new task), so an event exists if and
only if its change committed. `data` is the task as GET /tasks/{id} shows it,
with root-relative image URLs.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from pydantic_core import to_jsonable_python
from sqlalchemy.ext.asyncio import AsyncConnection

from app import repository
from app.events import repository as event_repository
from app.events.bus import Notice, queue_after_commit
from app.ids import ulid
from app.models import Image, Task, TaskStatus
from app.task_view import ShownImage, ShownTask, task_fields
from app.webhooks import repository as webhook_repository

# At most one task.processing event per task this often (progress can change every second).
PROGRESS_EVENT_INTERVAL = timedelta(seconds=5)


class EventType(enum.StrEnum):
    TASK_CREATED = "task.created"
    TASK_PROCESSING = "task.processing"
    TASK_COMPLETED = "task.completed"
    TASK_FAILED = "task.failed"
    TASK_CANCELLED = "task.cancelled"
    IMAGE_STORED = "image.stored"
    IMAGE_FAILED = "image.failed"
    IMAGE_QUEUED = "image.queued"
    ENDPOINT_DISABLED = "endpoint.disabled"


# What a task's webhook_url hears unless the caller chose: the events that settle it.
SETTLED_EVENTS = (
    EventType.TASK_FAILED,
    EventType.TASK_CANCELLED,
    EventType.IMAGE_STORED,
    EventType.IMAGE_FAILED,
)
# The events about tasks (endpoint.disabled is about an endpoint, and is never sent to one).
TASK_EVENTS = tuple(kind for kind in EventType if kind is not EventType.ENDPOINT_DISABLED)


_TERMINAL_EVENTS = {
    TaskStatus.COMPLETED: EventType.TASK_COMPLETED,
    TaskStatus.FAILED: EventType.TASK_FAILED,
    TaskStatus.CANCELLED: EventType.TASK_CANCELLED,
}


def new_event_id() -> str:
    """`evt_` and a ULID: sortable by creation time."""
    return "evt_" + ulid()


def transition_event(task: Task, now: datetime) -> EventType | None:
    """The event a won transition emits, given the row it left (None: not worth telling)."""
    return move_event(task.status, task.progress_event_at, now)


def move_event(
    status_value: str, progress_event_at: datetime | None, now: datetime
) -> EventType | None:
    """`transition_event` from the two columns it reads.

    A processing move tells only when the state machine's throttle stamped
    `progress_event_at` with this very move's time.
    """
    status = TaskStatus(status_value)
    if status.terminal:
        return _TERMINAL_EVENTS[status]
    if status is TaskStatus.PROCESSING and progress_event_at == now:
        return EventType.TASK_PROCESSING
    return None


async def record_requeued(
    db: AsyncConnection, task_id: str, positions: Sequence[int], *, now: datetime
) -> None:
    """One image.queued per failed image queued again: the task is no longer settled."""
    if not positions:
        return
    task, images = await repository.settle_image_summary(db, task_id, now)
    for position in positions:
        await record(db, EventType.IMAGE_QUEUED, task, images, now=now, image_index=position)


def task_data(task: ShownTask, images: Sequence[ShownImage]) -> dict[str, Any]:
    """The task as GET /tasks/{id} shows it, with root-relative image URLs, as JSON
    values: TaskPublic's `model_dump(mode="json")` without the validation (tested equal)."""
    data: dict[str, Any] = to_jsonable_python(task_fields(task, images, ""), inf_nan_mode="null")
    return data


@dataclass(frozen=True, slots=True)
class Told:
    """One event a batch of moves writes: its kind, and the task as the move left it."""

    kind: EventType
    task: ShownTask
    owner: str
    images: Sequence[ShownImage]


def event_row(
    kind: EventType,
    task: Task,
    images: Sequence[ShownImage],
    *,
    now: datetime,
    image_index: int | None = None,
) -> dict[str, Any]:
    """One new event's row: `data` is the task as GET /tasks/{id} shows it."""
    return _row(Told(kind, task, task.owner, images), now, image_index)


def _row(told: Told, now: datetime, image_index: int | None = None) -> dict[str, Any]:
    data = task_data(told.task, told.images)
    if image_index is not None:
        data["image_index"] = image_index
    return {
        "id": new_event_id(),
        "type": told.kind.value,
        "task_id": told.task.id,
        "owner": told.owner,
        "created_at": now,
        "data": data,
    }


async def record(
    db: AsyncConnection,
    kind: EventType,
    task: Task,
    images: Sequence[Image],
    *,
    now: datetime,
    image_index: int | None = None,
) -> str:
    """Append one event in the caller's transaction, and queue its webhooks; its id."""
    values = event_row(kind, task, images, now=now, image_index=image_index)
    event_id: str = values["id"]
    await event_repository.insert_event(db, values)
    # The outbox: one more statement, in the same transaction as the event.
    await webhook_repository.fan_out(
        db, event_id=event_id, kind=kind.value, task_id=task.id, owner=task.owner, now=now
    )
    queue_after_commit(db, Notice(kind.value, task.id, task.owner))
    return event_id


async def record_many(db: AsyncConnection, moves: Sequence[Told], *, now: datetime) -> list[str]:
    """`record` of several events about distinct tasks (a batch of moves), each
    statement once for all of them: the same rows, in the caller's transaction."""
    rows = [_row(told, now) for told in moves]
    if not rows:
        return []
    await event_repository.insert_events(db, rows)
    for kind in dict.fromkeys(row["type"] for row in rows):
        ids = [row["id"] for row in rows if row["type"] == kind]
        await webhook_repository.fan_out_events(db, kind=kind, event_ids=ids, now=now)
    for told in moves:
        queue_after_commit(db, Notice(told.kind.value, told.task.id, told.owner))
    return [row["id"] for row in rows]


async def record_endpoint_disabled(
    db: AsyncConnection, endpoint: dict[str, object], *, owner: str, now: datetime
) -> str:
    """Append endpoint.disabled (its `data` is the endpoint, its task_id the endpoint's id)."""
    event_id = new_event_id()
    endpoint_id = str(endpoint["id"])
    await event_repository.insert_event(
        db,
        {
            "id": event_id,
            "type": EventType.ENDPOINT_DISABLED.value,
            "task_id": endpoint_id,
            "owner": owner,
            "created_at": now,
            "data": endpoint,
        },
    )
    queue_after_commit(db, Notice(EventType.ENDPOINT_DISABLED.value, endpoint_id, owner))
    return event_id
