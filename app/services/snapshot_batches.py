"""Terminal callbacks applied together, with confirmation off (PostgreSQL).

The general path spends a pooled connection, a read, a BEGIN and a COMMIT and a
statement per row on each callback. Here the callbacks that arrive together
share one transaction: their rows are read and locked by one statement (in id
order, as every batch locks them), each is decided by `classify`, those that are
news are moved by `transition`'s guarded UPDATE (one statement for all of a
shape, built once from a stand-in snapshot as `submit_answer` builds its own),
and the images, events, outbox rows and deliveries of the whole batch are
written one statement each. A move still
commits with its images, its event, its outbox rows and its delivery.

Only the usual case is taken: a task that already carries the callback's
provider id. Anything else (an unknown provider id to adopt, another task's id)
is left to the general path, which decides it exactly as before.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import Integer, Text, bindparam, cast, func, select, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.ext.asyncio import AsyncConnection

from app import repository
from app.models import TaskStatus
from app.repository import TASKS, TaskState
from app.schemas import Snapshot
from app.services import events
from app.services.snapshots import (
    Outcome,
    classify,
    image_rows,
    log_terminal_conflict,
    transition,
)
from app.services.submit_answer import NOW, POLL_AFTER, STAND_INS, USAGE, parametrize
from app.task_view import ImageRow, TaskRow


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


@dataclass(frozen=True, slots=True)
class Moved:
    """A row as its move left it: the columns its event's view reads (plain values,
    no ORM object to build), and those that name the event and its owner."""

    task: TaskRow
    owner: str
    progress_event_at: datetime | None


# What a move's UPDATE returns: TaskRow's columns in its order, then the owner and the
# throttle's stamp.
_MOVED_COLUMNS = [
    *(TASKS.c["metadata" if name == "meta" else name] for name in TaskRow._fields),
    TASKS.c.owner,
    TASKS.c.progress_event_at,
]
_TASK_WIDTH = len(TaskRow._fields)


class MoveLost(Exception):
    """A guarded UPDATE did not match a row the batch holds locked (never expected):
    the batch rolls back and each callback takes the general path."""


@dataclass(frozen=True)
class _Shape:
    """What changes a batch's UPDATE (not just its values): the status it moves to,
    and which of the fields `transition` writes per callback the callbacks have."""

    target: TaskStatus
    estimated_time: bool
    error_code: bool
    error_message: bool
    usage: bool

    @classmethod
    def of(cls, snapshot: Snapshot) -> _Shape:
        return cls(
            snapshot.status,
            snapshot.estimated_time is not None,
            snapshot.error_code is not None,
            snapshot.error_message is not None,
            snapshot.usage is not None,
        )

    def stand_in(self) -> Snapshot:
        """A snapshot of this shape carrying `submit_answer`'s stand-in values."""
        return Snapshot(
            status=self.target,
            upstream_id=STAND_INS["upstream_id"],
            estimated_time=STAND_INS["estimated_time"] if self.estimated_time else None,
            error_code=STAND_INS["error_code"] if self.error_code else None,
            error_message=STAND_INS["error_message"] if self.error_message else None,
            usage=USAGE if self.usage else None,
        )

    def inputs(self) -> list[str]:
        """The per-callback values its statement takes, as arrays side by side."""
        wanted = [
            ("estimated_time", self.estimated_time),
            ("error_code", self.error_code),
            ("error_message", self.error_message),
            ("usage", self.usage),
        ]
        return ["task_id", "upstream_id", *(name for name, has in wanted if has)]


_INPUT_TYPES: dict[str, Any] = {
    "task_id": Text,
    "upstream_id": Text,
    "estimated_time": Integer,
    "error_code": Text,
    "error_message": Text,
    "usage": Text,  # JSON text, cast to the column's type
}
_MOVES: dict[_Shape, Any] = {}


def _moves_statement(shape: _Shape) -> Any:
    """One UPDATE for every callback of this shape in a batch: `transition`'s guard and
    values for the shape's stand-in snapshot, each stand-in replaced by that
    callback's own value (a column of the unnested arrays), RETURNING the rows."""
    inputs = select(
        *(
            func.unnest(bindparam(name + "s", type_=postgresql.ARRAY(_INPUT_TYPES[name]))).label(
                name
            )
            for name in shape.inputs()
        )
    ).subquery("callback")

    def value_of(name: str) -> Any:
        if name == "now":
            return bindparam("now", type_=TASKS.c.updated_at.type)
        if name == "usage":
            return cast(inputs.c.usage, TASKS.c.usage.type)
        return inputs.c[name]

    condition, values = transition(shape.stand_in(), now=NOW, poll_after=POLL_AFTER)
    return (
        update(TASKS)
        .where(TASKS.c.id == inputs.c.task_id, parametrize(condition, value_of))
        .values({key: parametrize(value, value_of) for key, value in values.items()})
        .returning(*_MOVED_COLUMNS)
    )


async def moves_for(
    db: AsyncConnection, news: Sequence[tuple[str, Snapshot]], now: datetime
) -> dict[str, Moved]:
    """The guarded UPDATEs of the snapshots (by task id) `classify` found to be news,
    one statement per shape; the rows as they now are, by task id."""
    shapes: dict[_Shape, list[Snapshot]] = {}
    ids: dict[_Shape, list[str]] = {}
    for task_id, snapshot in news:
        shape = _Shape.of(snapshot)
        shapes.setdefault(shape, []).append(snapshot)
        ids.setdefault(shape, []).append(task_id)
    moved: dict[str, Moved] = {}
    for shape, snapshots in shapes.items():
        statement = _MOVES.get(shape)
        if statement is None:
            statement = _MOVES[shape] = _moves_statement(shape)
        params: dict[str, Any] = {
            "now": now,
            "task_ids": ids[shape],
            "upstream_ids": [s.upstream_id for s in snapshots],
        }
        if shape.estimated_time:
            params["estimated_times"] = [s.estimated_time for s in snapshots]
        if shape.error_code:
            params["error_codes"] = [s.error_code for s in snapshots]
        if shape.error_message:
            params["error_messages"] = [s.error_message for s in snapshots]
        if shape.usage:
            params["usages"] = [json.dumps(s.usage) for s in snapshots]
        for row in await db.execute(statement, params):
            task = TaskRow._make(row[:_TASK_WIDTH])
            moved[task.id] = Moved(task, row[_TASK_WIDTH], row[_TASK_WIDTH + 1])
    return moved


def _image_row(values: dict[str, Any]) -> ImageRow:
    """A queued image as its view reads it (the columns `image_rows` leaves out are
    unset, as on a new row)."""
    return ImageRow._make(values.get(name) for name in ImageRow._fields)


async def apply_batch(
    db: AsyncConnection,
    callbacks: Sequence[SnapshotCallback],
    *,
    now: datetime,
) -> dict[str, BatchDecision]:
    """Decide and write callbacks about distinct tasks in the caller's transaction,
    each with its delivery row; by task id."""
    ordered = sorted(callbacks, key=lambda c: c.task_id)
    decided = await apply_snapshots(db, [(c.task_id, c.snapshot) for c in ordered], now=now)
    await repository.insert_deliveries(
        db,
        [
            {
                "task_id": c.task_id,
                "body_sha256": c.body_sha256,
                "upstream_status": c.snapshot.status.value,
                "outcome": outcome.value,
                "changed": outcome is Outcome.APPLIED,
                "received_at": now,
            }
            for c in ordered
            if (outcome := decided[c.task_id].outcome) is not None
        ],
    )
    return decided


async def apply_snapshots(
    db: AsyncConnection, snapshots: Sequence[tuple[str, Snapshot]], *, now: datetime
) -> dict[str, BatchDecision]:
    """Decide terminal snapshots of distinct tasks (each naming its provider task) and
    write the moves they make, with their images, events and outbox rows, in the
    caller's transaction; by task id. A delivery's callback or a provider's answer
    to a query: the same rules and the same rows as `apply_snapshot` writes."""
    ordered = sorted(snapshots, key=lambda item: item[0])
    states = await repository.lock_states(db, [task_id for task_id, _ in ordered])
    outcomes: dict[str, Outcome] = {}
    decided: dict[str, BatchDecision] = {}
    for task_id, snapshot in ordered:
        state = states.get(task_id)
        if state is None or state.upstream_task_id != snapshot.upstream_id:
            decided[task_id] = BatchDecision(None, state)
            continue
        outcome = outcomes[task_id] = classify(state, snapshot)
        decided[task_id] = BatchDecision(outcome, state)
        if outcome is Outcome.ANOMALY:
            log_terminal_conflict(state, snapshot)
    news = [
        (task_id, snapshot)
        for task_id, snapshot in ordered
        if outcomes.get(task_id) is Outcome.APPLIED
    ]
    moved = await moves_for(db, news, now)
    images: list[dict[str, Any]] = []
    told: list[events.Told] = []
    for task_id, snapshot in news:
        move = moved.get(task_id)
        if move is None:
            raise MoveLost(task_id)
        task = move.task
        rows: list[dict[str, Any]] = []
        if snapshot.status is TaskStatus.COMPLETED:
            rows = image_rows(task.id, snapshot, now, task.n)
            images.extend(rows)
        kind = events.move_event(task.status, move.progress_event_at, now)
        if kind is not None:
            shown = [_image_row(row) for row in rows]
            told.append(events.Told(kind, task, move.owner, shown))
        state = TaskState(task.id, TaskStatus(task.status), task.progress, task.upstream_task_id)
        decided[task.id] = BatchDecision(Outcome.APPLIED, state)
    await repository.queue_images(db, images)
    await events.record_many(db, told, now=now)
    return decided
