"""Every SQL statement of the service. Functions add, flush and execute;
they never commit (the caller's unit of work does)."""

from __future__ import annotations

import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from functools import lru_cache
from typing import Any, cast

from sqlalchemy import (
    ColumnElement,
    Integer,
    Table,
    Text,
    and_,
    any_,
    bindparam,
    case,
    delete,
    func,
    insert,
    literal,
    null,
    or_,
    select,
    tuple_,
    update,
)
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import CursorResult, Result
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession
from sqlmodel import col

from app.db import delete_picked, metadata, picked_once
from app.models import (
    IdempotencyRecord,
    Image,
    ImageStatus,
    Task,
    TaskStatus,
    UTCDateTime,
)
from app.task_view import ImageRow, TaskRow
from app.webhooks import repository as webhook_repository

ACTIVE_STATUSES = tuple(status.value for status in TaskStatus if not status.terminal)


def _rowcount(result: Result[Any]) -> int:
    return int(cast(CursorResult[Any], result).rowcount)


async def get_task(session: AsyncSession, task_id: str) -> Task | None:
    """One task by our id, as it is in the database now."""
    statement = (
        select(Task).where(col(Task.id) == task_id).execution_options(populate_existing=True)
    )
    return (await session.execute(statement)).scalar_one_or_none()


# -- submission: the new task, its key, its task.created event and outbox rows -------

_TASKS = metadata.tables["tasks"]
_KEYS = metadata.tables["idempotency_records"]
_EVENTS = metadata.tables["events"]
_OUTBOX = metadata.tables["webhook_deliveries"]
_ACTIVITY = metadata.tables["task_activity"]
_EVENT_COLUMNS = ("id", "type", "task_id", "owner", "created_at", "data")
_CREATED = "task.created"


def task_row(task: Task) -> dict[str, Any]:
    """A Task as the tasks table's columns (the inverse of `task_from_row`)."""
    values = task.model_dump()
    values["metadata"] = values.pop("meta")
    return values


def _params(prefix: str, table: Table, names: Sequence[str]) -> list[Any]:
    return [bindparam(prefix + name, type_=table.c[name].type) for name in names]


def _prefixed(prefix: str, values: dict[str, Any]) -> dict[str, Any]:
    return {prefix + name: value for name, value in values.items()}


def _submission_outbox(own_url: bool, after: ColumnElement[bool] | None) -> Any:
    """The task.created event's outbox rows, from the event's own parameters."""
    event_id, task_id, owner, now = _params("e_", _EVENTS, ("id", "task_id", "owner", "created_at"))
    rows = webhook_repository.fan_out_rows(
        event_id, _CREATED, task_id, owner, now, own_url=own_url, after=after
    )
    return insert(_OUTBOX).from_select(list(webhook_repository.DELIVERY_COLUMNS), rows)


def _submission_statement(keyed: bool, own_url: bool) -> Any:
    """PostgreSQL, one statement: the key (if any, and only if new), then the task, its
    event and the event's outbox rows, each only if the one before it was inserted.
    Returns how many tasks it inserted (0: the key was already taken)."""
    task_columns = [column.name for column in _TASKS.c]
    task_values = select(*_params("t_", _TASKS, task_columns))
    ctes = []
    if keyed:
        key = (
            postgresql.insert(_KEYS)
            .values(dict(zip(_KEYS.c.keys(), _params("k_", _KEYS, _KEYS.c.keys()), strict=True)))
            .on_conflict_do_nothing(index_elements=["owner", "key"])
            .returning(_KEYS.c.owner)
            .cte("new_key")
        )
        task_values = task_values.where(select(key.c.owner).exists())
    new_task = (
        insert(_TASKS).from_select(task_columns, task_values).returning(_TASKS.c.id).cte("new_task")
    )
    event_values = select(*_params("e_", _EVENTS, _EVENT_COLUMNS)).where(
        select(new_task.c.id).exists()
    )
    new_event = (
        insert(_EVENTS)
        .from_select(list(_EVENT_COLUMNS), event_values)
        .returning(_EVENTS.c.id)
        .cte("new_event")
    )
    outbox = _submission_outbox(own_url, select(new_event.c.id).exists())
    ctes.extend([new_event, outbox.cte("new_outbox")])
    return select(func.count()).select_from(new_task).add_cte(*ctes)


_SUBMISSION_STATEMENTS = {
    (keyed, own_url): _submission_statement(keyed, own_url)
    for keyed in (False, True)
    for own_url in (False, True)
}
_INSERT_TASK = insert(_TASKS)
_INSERT_EVENT = insert(_EVENTS)
_INSERT_KEY = sqlite.insert(_KEYS).on_conflict_do_nothing(index_elements=["owner", "key"])
_INSERT_OUTBOX = {own_url: _submission_outbox(own_url, None) for own_url in (False, True)}


async def insert_submission(
    db: AsyncConnection,
    task: dict[str, Any],
    event: dict[str, Any],
    key: dict[str, Any] | None,
) -> bool:
    """Record a new task, its task.created event (with its outbox rows) and its
    Idempotency-Key; False when the key was already taken, and then nothing may
    commit (on SQLite the caller rolls back: the task went in first, for its
    foreign key). On PostgreSQL it is one statement, safe in autocommit."""
    wants = webhook_repository.wants_own_url
    own_url = wants(task["webhook_url"], task["webhook_events"], _CREATED)
    if db.dialect.name == "postgresql":
        params = {**_prefixed("t_", task), **_prefixed("e_", event)}
        if key is not None:
            params.update(_prefixed("k_", key))
        statement = _SUBMISSION_STATEMENTS[(key is not None, own_url)]
        return bool((await db.execute(statement, params)).scalar_one())
    await db.execute(_INSERT_TASK, task)
    await db.execute(_INSERT_EVENT, event)
    await db.execute(_INSERT_OUTBOX[own_url], _prefixed("e_", event))
    if key is None:
        return True
    return bool(_rowcount(await db.execute(_INSERT_KEY, key)))


_OTHER_TASK = _TASKS.alias("other")


def owns_upstream_id_sql(task_id: Any, upstream_id: Any) -> ColumnElement[bool]:
    """`snapshots.owns_upstream_id` in SQL: the task carries this provider id, or none
    while no other task carries it (both given as values or bind parameters)."""
    taken = (
        select(_OTHER_TASK.c.id)
        .where(_OTHER_TASK.c.upstream_task_id == upstream_id, _OTHER_TASK.c.id != task_id)
        .exists()
    )
    return or_(
        _TASKS.c.upstream_task_id == upstream_id,
        and_(_TASKS.c.upstream_task_id.is_(None), ~taken),
    )


_ACTIVITY_COLUMNS = ("task_id", "kind", "position", "outcome", "detail", "at")
_ANSWER_STATEMENTS: dict[tuple[str, Any], Any] = {}


def _answer_statement(
    dialect: str, guard: ColumnElement[bool], values: dict[str, Any]
) -> tuple[Any, Any]:
    """The guarded UPDATE of a submission's answer (parameter `task_id`) returning the
    row, and, on PostgreSQL, one statement that also writes the activity row
    (parameters `a_…`) only if the UPDATE matched."""
    moved = (
        update(_TASKS)
        .where(_TASKS.c.id == bindparam("task_id", type_=_TASKS.c.id.type), guard)
        .values(**values)
        .returning(*_TASKS.c)
    )
    if dialect != "postgresql":
        return moved, insert(_ACTIVITY)
    done = moved.cte("moved")
    noted = insert(_ACTIVITY).from_select(
        list(_ACTIVITY_COLUMNS),
        select(*_params("a_", _ACTIVITY, _ACTIVITY_COLUMNS)).where(select(done.c.id).exists()),
    )
    return select(done).add_cte(noted.cte("noted")), None


async def accept_submission(
    db: AsyncConnection,
    task: Task,
    shape: Any,
    build: Callable[[], tuple[ColumnElement[bool], dict[str, Any]]],
    params: dict[str, Any],
    activity: dict[str, Any],
) -> bool:
    """The guarded UPDATE of the provider's answer to our submission and, only if it
    matched, its activity row; False when it did not match (nothing written).

    `task` is the task as inserted: it is brought up to date with the row the UPDATE
    returns (cheaper than building another). `build` gives the guard and values
    over named parameters (`params`); the statement is built once per dialect and
    `shape`. On PostgreSQL it is one statement, safe in autocommit."""
    dialect = db.dialect.name
    statements = _ANSWER_STATEMENTS.get((dialect, shape))
    if statements is None:
        statements = _ANSWER_STATEMENTS[(dialect, shape)] = _answer_statement(dialect, *build())
    statement, note = statements
    if note is None:
        row = (await db.execute(statement, {**params, **_prefixed("a_", activity)})).first()
    else:
        row = (await db.execute(statement, params)).first()
        if row is not None:
            await db.execute(note, activity)
    if row is None:
        return False
    for name, value in row._mapping.items():
        attribute = "meta" if name == "metadata" else name
        if getattr(task, attribute) != value:
            setattr(task, attribute, value)
    return True


async def release_idempotency_key(
    session: AsyncSession, owner: str, key: str, task_id: str
) -> None:
    """Forget a key whose request certainly never reached the provider (a retry submits)."""
    await session.execute(
        delete(IdempotencyRecord).where(
            col(IdempotencyRecord.owner) == owner,
            col(IdempotencyRecord.key) == key,
            col(IdempotencyRecord.task_id) == task_id,
        )
    )


async def get_idempotency_record(
    session: AsyncSession, owner: str, key: str
) -> IdempotencyRecord | None:
    """The record a key was first bound to."""
    return await session.get(IdempotencyRecord, (owner, key))


@dataclass(frozen=True)
class TaskFilter:
    status: str | None = None
    image_status: str | None = None
    created_after: datetime | None = None
    created_before: datetime | None = None
    # The console's extra filters: one metadata key equal to a text value, and text
    # anywhere in the prompt (case-insensitive). Neither is indexed: the keyset order
    # bounds the scan.
    metadata_key: str | None = None
    metadata_value: str | None = None
    prompt_contains: str | None = None
    task_id: str | None = None  # one task, if it matches the rest (a live update)


# A listing page reads plain rows of the columns its views show: building ORM objects
# of whole rows cost more than the SQL. The page and its images come in one statement.
_LISTED_TASK = [_TASKS.c["metadata" if name == "meta" else name] for name in TaskRow._fields]
_LISTED_IMAGE = [metadata.tables["images"].c[name] for name in ImageRow._fields]
_TASK_WIDTH = len(_LISTED_TASK)
ListedPage = list[tuple[TaskRow, list[ImageRow]]]


def _like_escaped(text: str) -> str:
    """`text` matched literally by LIKE … ESCAPE '/' (what `autoescape` does for a literal)."""
    return text.replace("/", "//").replace("%", "/%").replace("_", "/_")


def _listing_query(
    filters: TaskFilter, limit: int, after: tuple[datetime, str] | None
) -> tuple[Any, dict[str, Any]]:
    """The statement for these filters (built once per shape) and its parameters."""
    values: dict[str, Any] = {
        "status": filters.status or None,
        "image_status": filters.image_status or None,
        "created_after": filters.created_after or None,
        "created_before": filters.created_before or None,
        "task_id": filters.task_id,
        "metadata_value": None if filters.metadata_key is None else (filters.metadata_value or ""),
        "prompt": _like_escaped(filters.prompt_contains.lower())
        if filters.prompt_contains
        else None,
        "after_created": after[0] if after else None,
        "after_id": after[1] if after else None,
    }
    params = {name: value for name, value in values.items() if value is not None}
    statement = _listing_statement(frozenset(params), filters.metadata_key)
    params["limit"] = limit
    return statement, params


@lru_cache(maxsize=64)
def _listing_statement(names: frozenset[str], metadata_key: str | None) -> Any:
    """The page's tasks (keyset order) under the filters named, each joined to its
    images in position order. Built once: building it costs more than running it."""
    tasks = _TASKS.c
    conditions: list[ColumnElement[bool]] = []
    for name in ("status", "image_status", "task_id"):
        if name in names:
            conditions.append(tasks[name if name != "task_id" else "id"] == bindparam(name))
    if "created_after" in names:
        conditions.append(tasks.created_at >= bindparam("created_after"))
    if "created_before" in names:
        conditions.append(tasks.created_at < bindparam("created_before"))
    if metadata_key is not None:
        value = tasks.metadata[metadata_key].as_string()
        conditions.append(value == bindparam("metadata_value"))
    if "prompt" in names:
        conditions.append(func.lower(tasks.prompt).contains(bindparam("prompt"), escape="/"))
    if "after_created" in names:
        after = tuple_(
            bindparam("after_created", type_=tasks.created_at.type),
            bindparam("after_id", type_=tasks.id.type),
        )
        conditions.append(tuple_(tasks.created_at, tasks.id) < after)
    page = (
        select(*_LISTED_TASK)
        .where(*conditions)
        .order_by(tasks.created_at.desc(), tasks.id.desc())
        .limit(bindparam("limit", type_=Integer()))
        .subquery("page")
    )
    images = metadata.tables["images"]
    return (
        select(*page.c, *_LISTED_IMAGE)
        .select_from(page.outerjoin(images, images.c.task_id == page.c.id))
        .order_by(page.c.created_at.desc(), page.c.id.desc(), images.c.position)
    )


async def list_tasks(
    db: AsyncConnection,
    filters: TaskFilter,
    *,
    limit: int,
    after: tuple[datetime, str] | None,
) -> ListedPage:
    """Newest first, by keyset: (created_at, id) strictly below the cursor; each task
    with its images. One statement: one snapshot, and no transaction needed around it."""
    listed: ListedPage = []
    statement, params = _listing_query(filters, limit, after)
    for row in await db.execute(statement, params):
        values = tuple(row)
        if not listed or listed[-1][0].id != values[0]:
            listed.append((TaskRow._make(values[:_TASK_WIDTH]), []))
        if values[_TASK_WIDTH] is not None:  # the outer join's NULLs: a task without images
            listed[-1][1].append(ImageRow._make(values[_TASK_WIDTH:]))
    return listed


# Core statements on the tables skip the ORM's per-row work (the webhook's hot path).
TASKS: Table = metadata.tables["tasks"]
DELIVERIES: Table = metadata.tables["callback_deliveries"]
# The task can still move: the guard of every write that must not touch a settled task.
IS_ACTIVE: ColumnElement[bool] = TASKS.c.status.in_(ACTIVE_STATUSES)


@dataclass(frozen=True)
class TaskState:
    """The few columns the state machine decides on."""

    id: str
    status: TaskStatus
    progress: int
    upstream_task_id: str | None


# Built once: constructing a statement costs more than running its cached SQL.
_SELECT_STATE = select(
    TASKS.c.id, TASKS.c.status, TASKS.c.progress, TASKS.c.upstream_task_id
).where(TASKS.c.id == bindparam("task_id"))
_INSERT_DELIVERY = insert(DELIVERIES)


_LOCK_STATE = _SELECT_STATE.with_for_update(key_share=True)


async def task_state(db: AsyncConnection, task_id: str, *, lock: bool = False) -> TaskState | None:
    """A task's status, progress and provider id, without loading the whole row;
    `lock`: locked until the transaction ends, read as it is once the lock is held."""
    statement = _LOCK_STATE if lock else _SELECT_STATE
    row = (await db.execute(statement, {"task_id": task_id})).first()
    if row is None:
        return None
    return TaskState(row.id, TaskStatus(row.status), row.progress, row.upstream_task_id)


# PostgreSQL: the states of a batch's tasks, locked in id order (byte order, whatever
# the collation), as `CONFIRM_BATCH_SQL` and the worker's answers lock them: in any
# other order batches on several replicas could deadlock.
_LOCK_STATES = (
    select(TASKS.c.id, TASKS.c.status, TASKS.c.progress, TASKS.c.upstream_task_id)
    # = ANY(array): one SQL text (one prepared statement) whatever the batch's size.
    .where(TASKS.c.id == any_(bindparam("task_ids", type_=postgresql.ARRAY(Text))))
    .order_by(TASKS.c.id.collate("C"))
    .with_for_update(key_share=True)
)


async def lock_states(db: AsyncConnection, task_ids: Sequence[str]) -> dict[str, TaskState]:
    """`task_state(lock=True)` of many tasks in one statement (PostgreSQL); by task id,
    an unknown task left out."""
    rows = await db.execute(_LOCK_STATES, {"task_ids": list(task_ids)})
    return {
        row.id: TaskState(row.id, TaskStatus(row.status), row.progress, row.upstream_task_id)
        for row in rows
    }


async def upstream_id_taken(db: AsyncConnection, upstream_id: str, other_than: str) -> bool:
    """Whether another task already carries this provider id."""
    statement = select(TASKS.c.id).where(
        TASKS.c.upstream_task_id == upstream_id, TASKS.c.id != other_than
    )
    return (await db.execute(statement)).first() is not None


# The unique index that keeps a provider task to one of ours: PostgreSQL names it,
# SQLite names its column.
_UPSTREAM_ID_UNIQUE = ("uq_tasks_upstream_task_id", "tasks.upstream_task_id")


def upstream_id_conflict(exc: IntegrityError) -> bool:
    """Whether a write failed because another task already carries the provider id
    it gave (one committed after the write's guard looked)."""
    return any(name in str(exc.orig) for name in _UPSTREAM_ID_UNIQUE)


async def update_where(
    db: AsyncConnection, task_id: str, condition: ColumnElement[bool], values: dict[str, Any]
) -> bool:
    """A conditional update: True when the row still matched and changed.

    This is what makes concurrent duplicate deliveries safe: on PostgreSQL the
    second UPDATE waits for the first's row lock, then re-checks `condition`
    against the committed row and matches nothing.
    """
    statement = update(TASKS).where(TASKS.c.id == task_id, condition).values(**values)
    return bool(_rowcount(await db.execute(statement)))


def task_from_row(row: Any) -> Task:
    """A Core row of the tasks table as a Task object (not attached to any session)."""
    values = dict(row._mapping)
    values["meta"] = values.pop("metadata")
    return Task(**values)


async def update_returning(
    db: AsyncConnection, task_id: str, condition: ColumnElement[bool], values: dict[str, Any]
) -> Task | None:
    """`update_where` that also answers the row as it now is (None: it did not match)."""
    statement = (
        update(TASKS).where(TASKS.c.id == task_id, condition).values(**values).returning(*TASKS.c)
    )
    row = (await db.execute(statement)).first()
    return task_from_row(row) if row is not None else None


async def insert_delivery(db: AsyncConnection, values: dict[str, Any]) -> None:
    """Keep one row per accepted webhook delivery."""
    await db.execute(_INSERT_DELIVERY, values)


async def insert_deliveries(db: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    """`insert_delivery` of many, in one statement."""
    if rows:
        await db.execute(_INSERT_DELIVERY, list(rows))


async def update_task_where(
    session: AsyncSession, task_id: str, condition: ColumnElement[bool], values: dict[str, Any]
) -> bool:
    """`update_where` inside a session's transaction (loaded objects are not refreshed)."""
    return await update_where(await session.connection(), task_id, condition, values)


def _poll_due(now: datetime, spacing: timedelta) -> ColumnElement[bool]:
    """Active, its next poll due, no live lease on it, and not asked too recently."""
    return and_(
        col(Task.next_poll_at) <= now,
        IS_ACTIVE,
        or_(col(Task.poll_lease_until).is_(None), col(Task.poll_lease_until) < now),
        or_(col(Task.poll_claimed_at).is_(None), col(Task.poll_claimed_at) <= now - spacing),
    )


@dataclass(frozen=True)
class PollClaim:
    """A leased poll: the few task columns its query and its answer need."""

    id: str
    upstream_task_id: str | None
    created_at: datetime
    poll_attempts: int
    poll_claimed_at: datetime
    confirm_requested_at: datetime | None  # a callback asked for this query


_CLAIMED = (
    TASKS.c.id,
    TASKS.c.upstream_task_id,
    TASKS.c.created_at,
    TASKS.c.poll_attempts,
    TASKS.c.poll_claimed_at,
    TASKS.c.confirm_requested_at,
)


def _claims(rows: Any) -> list[PollClaim]:
    return [PollClaim(*row) for row in rows]


async def claim_due_polls(
    db: AsyncConnection,
    *,
    now: datetime,
    lease: timedelta,
    spacing: timedelta,
    limit: int,
    confirmations_only: bool = False,
) -> list[PollClaim]:
    """Lease up to `limit` active tasks whose next poll is due, in one statement;
    replicas skip each other's rows. `confirmations_only`: those a callback asked about."""
    due_ids = select(TASKS.c.id).where(_poll_due(now, spacing))
    if confirmations_only:
        # Straight to the few tasks a callback asked about, past any backlog of due
        # routine polls; SQLite's planner would pick by statistics taken at any moment.
        due_ids = due_ids.where(CONFIRMATION_WAITING).with_hint(
            TASKS, "INDEXED BY ix_tasks_confirm_due", "sqlite"
        )
    due = picked_once(due_ids.order_by(TASKS.c.next_poll_at).limit(limit), "due")
    statement = (
        update(TASKS)
        .add_cte(due)
        .where(TASKS.c.id.in_(select(due.c.id)))
        .values(poll_lease_until=now + lease, poll_claimed_at=now)
        .returning(*_CLAIMED)
    )
    return _claims(await db.execute(statement))


async def claim_poll(
    db: AsyncConnection, task_id: str, *, now: datetime, lease: timedelta, spacing: timedelta
) -> PollClaim | None:
    """Lease one task's poll if it is still due (a confirmation); None if it is not."""
    statement = (
        update(TASKS)
        .where(TASKS.c.id == task_id, _poll_due(now, spacing))
        .values(poll_lease_until=now + lease, poll_claimed_at=now)
        .returning(*_CLAIMED)
    )
    claims = _claims(await db.execute(statement))
    return claims[0] if claims else None


def _at(moment: datetime) -> ColumnElement[datetime]:
    # Typed, so SQLite stores it in the column's format and comparisons hold.
    return literal(moment, UTCDateTime())


CONFIRMATION_WAITING: ColumnElement[bool] = TASKS.c.confirm_requested_at.is_not(None)


def due_unless_confirming(due: datetime) -> ColumnElement[datetime]:
    """A new due time that leaves alone the one a waiting confirmation request set."""
    return case((CONFIRMATION_WAITING, TASKS.c.next_poll_at), else_=_at(due))


# Where a terminal callback's confirmation request may be made, or dated anew (the
# general path; `CONFIRM_BATCH_SQL` below states the same conditions in SQL).
MAY_REQUEST: ColumnElement[bool] = and_(IS_ACTIVE, TASKS.c.confirm_requested_at.is_(None))
MAY_RENEW: ColumnElement[bool] = and_(
    IS_ACTIVE, TASKS.c.confirm_requested_at < TASKS.c.poll_claimed_at
)


async def request_confirmation(
    db: AsyncConnection, task_id: str, now: datetime, values: dict[str, Any]
) -> bool:
    """Make an active task due for a confirmation query now, unless a request already waits."""
    values = {"confirm_requested_at": now, "next_poll_at": now, "last_event_at": now, **values}
    return await update_where(db, task_id, MAY_REQUEST, values)


async def renew_confirmation(
    db: AsyncConnection, task_id: str, now: datetime, values: dict[str, Any]
) -> bool:
    """Date the waiting request after the claim of the poll now out, if there is one.

    That poll's answer may predate this news, so it must not settle the request.
    """
    return await update_where(
        db, task_id, MAY_RENEW, {"confirm_requested_at": now, "last_event_at": now, **values}
    )


def _sql_list(values: Sequence[str]) -> str:
    return ", ".join(f"'{value}'" for value in values)


_TERMINAL_STATUSES = tuple(status.value for status in TaskStatus if status.terminal)

# PostgreSQL: read, request (or renew) the confirmation and record the delivery of a
# batch of terminal callbacks at once, one task each. The same decisions as
# `services.callbacks._queue_confirmation`, taken on each row as it is once locked
# (a poll writing it meanwhile has committed by then), for a task that already
# carries the callback's provider id; any other case (no such task, no provider id
# on either side, or a different one) decides nothing and records nothing (outcome
# NULL), and the general path takes over. Rows are locked in id order (byte order,
# whatever the database's collation: Python's `sorted` on the ids agrees), so batches
# on several replicas, and the worker applying answers about several tasks, wait for
# one another instead of deadlocking. Data-modifying
# CTEs run whether or not they are read. Parameters: task ids, provider ids,
# reported statuses and body hashes (arrays in the same order), and the time.
CONFIRM_BATCH_SQL = f"""
WITH input AS (
    SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::text[])
        AS i (task_id, upstream_id, reported, body_sha256)
), cur AS (
    SELECT id, status, upstream_task_id, confirm_requested_at, poll_claimed_at
    FROM {TASKS.name} WHERE id = ANY($1::text[])
    ORDER BY id COLLATE "C"
    FOR NO KEY UPDATE
), decided AS (
    SELECT i.task_id, i.reported, i.body_sha256, c.status,
        CASE
            WHEN c.id IS NULL OR i.upstream_id IS NULL
                OR c.upstream_task_id IS DISTINCT FROM i.upstream_id THEN NULL
            WHEN c.status IN ({_sql_list(_TERMINAL_STATUSES)}) THEN
                CASE WHEN c.status = i.reported THEN 'duplicate' ELSE 'anomaly' END
            WHEN c.confirm_requested_at IS NULL THEN 'confirming'
            ELSE 'duplicate'  -- a request already waits (renewed if its poll is out)
        END AS outcome,
        c.confirm_requested_at < c.poll_claimed_at AS poll_out
    FROM input AS i LEFT JOIN cur AS c ON c.id = i.task_id
), requested AS (
    UPDATE {TASKS.name} SET confirm_requested_at = $5, next_poll_at = $5, last_event_at = $5
    FROM decided AS d
    WHERE {TASKS.name}.id = d.task_id AND d.outcome = 'confirming'
), renewed AS (
    UPDATE {TASKS.name} SET confirm_requested_at = $5, last_event_at = $5
    FROM decided AS d
    WHERE {TASKS.name}.id = d.task_id AND d.status IN ({_sql_list(ACTIVE_STATUSES)})
        AND d.outcome IS NOT NULL AND d.poll_out
), recorded AS (
    INSERT INTO {DELIVERIES.name}
        (task_id, body_sha256, upstream_status, outcome, changed, received_at)
    SELECT task_id, body_sha256, reported, outcome, false, $5
    FROM decided WHERE outcome IS NOT NULL
)
SELECT task_id, outcome, status FROM decided
"""  # noqa: S608 (built from the schema's names and the status enum, never from input)


@dataclass(frozen=True)
class TerminalCallback:
    """What the batched confirmation needs of one terminal callback."""

    task_id: str
    upstream_id: str
    reported: str
    body_sha256: str


@dataclass(frozen=True)
class OneStatement:
    """What the single-statement path did: its outcome (None: it decided nothing)
    and the task's status as it found it (None: no such task)."""

    outcome: str | None
    status: str | None


async def confirm_in_batch(
    db: AsyncConnection, callbacks: Sequence[TerminalCallback], now: datetime
) -> dict[str, OneStatement]:
    """Run `CONFIRM_BATCH_SQL` (PostgreSQL only) for callbacks about distinct tasks:
    one prepared statement, one round trip. By task id.

    Through the engine's driver-level execute, not the driver itself: a failure is
    the engine's, so a connection the server dropped invalidates the pool (the
    general path that takes over gets a live one) and the error handler answers
    503, as for any other statement.
    """
    parameters = (
        [c.task_id for c in callbacks],
        [c.upstream_id for c in callbacks],
        [c.reported for c in callbacks],
        [c.body_sha256 for c in callbacks],
        now,
    )
    rows = await db.exec_driver_sql(CONFIRM_BATCH_SQL, parameters)
    return {row.task_id: OneStatement(row.outcome, row.status) for row in rows}


async def confirm_in_one_statement(
    db: AsyncConnection,
    *,
    task_id: str,
    upstream_id: str,
    reported: str,
    body_sha256: str,
    now: datetime,
) -> OneStatement:
    """One terminal callback through `CONFIRM_BATCH_SQL` (PostgreSQL only)."""
    callback = TerminalCallback(task_id, upstream_id, reported, body_sha256)
    return (await confirm_in_batch(db, [callback], now))[task_id]


def _asked_since(claimed_at: datetime) -> ColumnElement[bool]:
    return TASKS.c.confirm_requested_at >= _at(claimed_at)


def no_confirmation_asked_since(claimed_at: datetime) -> ColumnElement[bool]:
    """Active, and no callback asked for a confirmation after this poll was claimed."""
    return and_(
        IS_ACTIVE,
        or_(
            TASKS.c.confirm_requested_at.is_(None),
            TASKS.c.confirm_requested_at < _at(claimed_at),
        ),
    )


def claimed_by(claimed_at: datetime) -> ColumnElement[bool]:
    """Active and still held by the poll claimed at `claimed_at` (no later claim since)."""
    return and_(IS_ACTIVE, TASKS.c.poll_claimed_at == _at(claimed_at))


async def release_poll(db: AsyncConnection, task_id: str, *, claimed_at: datetime) -> bool:
    """Give up a claim without an answer: the task stays due as it was (request kept)."""
    return await update_where(db, task_id, claimed_by(claimed_at), {"poll_lease_until": None})


async def finish_poll(
    db: AsyncConnection,
    task_id: str,
    *,
    claimed_at: datetime,
    next_poll_at: datetime,
    values: dict[str, Any],
) -> bool:
    """Release a poll's lease and schedule the next one; True if a confirmation waits.

    A request made before the claim is answered by this poll and cleared; one
    made since keeps the task due at its own time, since this poll's query may
    predate the news. Only the claim's own poll ends it: once its lease has run
    out and another poll has claimed the task, this one leaves that lease alone.
    """
    asked = _asked_since(claimed_at)
    update_values = {
        **values,
        "next_poll_at": case((asked, TASKS.c.confirm_requested_at), else_=_at(next_poll_at)),
        "confirm_requested_at": case((asked, TASKS.c.confirm_requested_at), else_=null()),
        "poll_lease_until": None,
    }
    if not await update_where(db, task_id, claimed_by(claimed_at), update_values):
        return False
    waiting = select(TASKS.c.id).where(TASKS.c.id == task_id, CONFIRMATION_WAITING)
    return (await db.execute(waiting)).first() is not None


# Downloads: the images table is the queue.
IMAGES: Table = metadata.tables["images"]


@dataclass(frozen=True)
class DownloadJob:
    """A leased image and the few task columns its download needs."""

    task_id: str
    position: int
    lease_owner: str
    source_url: str | None
    source_expires_at: datetime | None
    renewed: bool
    attempts: int
    upstream_task_id: str | None
    task_created_at: datetime
    completed_at: datetime | None


async def queue_images(db: AsyncConnection, rows: Sequence[dict[str, Any]]) -> None:
    """Insert a completed task's images, each pending its download."""
    if rows:
        await db.execute(insert(IMAGES), list(rows))


def _image_is(task_id: str, position: int) -> ColumnElement[bool]:
    return and_(IMAGES.c.task_id == task_id, IMAGES.c.position == position)


def _of_task(column: Any, name: str) -> Any:
    """A column of the image's task, as RETURNING may read it on SQLite too (which
    keeps an UPDATE's FROM tables out of RETURNING), under DownloadJob's name."""
    return select(column).where(TASKS.c.id == IMAGES.c.task_id).scalar_subquery().label(name)


_CLAIMED_DOWNLOAD = (
    IMAGES.c.task_id,
    IMAGES.c.position,
    IMAGES.c.lease_owner,
    IMAGES.c.source_url,
    IMAGES.c.source_expires_at,
    IMAGES.c.renewed,
    IMAGES.c.attempts,
    _of_task(TASKS.c.upstream_task_id, "upstream_task_id"),
    _of_task(TASKS.c.created_at, "task_created_at"),
    _of_task(TASKS.c.completed_at, "completed_at"),
)
_JOB_FIELDS = [field.name for field in fields(DownloadJob)]


async def claim_due_downloads(
    db: AsyncConnection,
    *,
    now: datetime,
    owner: str,
    lease: timedelta,
    limit: int,
    running: Sequence[tuple[str, int]] = (),
) -> list[DownloadJob]:
    """Lease pending images that are due and not held by a live worker, in one
    statement (oldest due first); replicas skip each other's rows.

    A job is fenced by its image and its lease token (`owner`, a nonce of this claim,
    the image's position), so a job that lost its lease cannot write over the job
    that took it over, even in the same process; `running` are images this worker
    still runs, never claimed twice.
    """
    conditions = [
        IMAGES.c.status == ImageStatus.PENDING.value,
        IMAGES.c.next_attempt_at <= now,
        or_(IMAGES.c.lease_until.is_(None), IMAGES.c.lease_until < now),
    ]
    if running:
        conditions.append(tuple_(IMAGES.c.task_id, IMAGES.c.position).not_in(list(running)))
    due = picked_once(
        select(IMAGES.c.task_id, IMAGES.c.position)
        .where(*conditions)
        .order_by(IMAGES.c.next_attempt_at)
        .limit(limit),
        "due",
    )
    prefix = f"{owner}/{secrets.token_hex(3)}/"
    statement = (
        update(IMAGES)
        .add_cte(due)
        .where(
            tuple_(IMAGES.c.task_id, IMAGES.c.position).in_(select(due.c.task_id, due.c.position))
        )
        .values(
            lease_owner=literal(prefix) + IMAGES.c.position.cast(Text),
            lease_until=now + lease,
            attempts=IMAGES.c.attempts + 1,
        )
        .returning(*_CLAIMED_DOWNLOAD, IMAGES.c.next_attempt_at)
    )
    rows = sorted(
        (await db.execute(statement)).all(),
        key=lambda row: (row.next_attempt_at, row.task_id, row.position),
    )
    return [DownloadJob(**{name: row._mapping[name] for name in _JOB_FIELDS}) for row in rows]


def _summary(task_id: str) -> ColumnElement[Any]:
    """The task's image status from its images: pending, else failed if any, else stored."""

    def having(status: ImageStatus) -> Any:
        return (
            select(IMAGES.c.position)
            .where(IMAGES.c.task_id == task_id, IMAGES.c.status == status.value)
            .exists()
        )

    return case(
        (having(ImageStatus.PENDING), ImageStatus.PENDING.value),
        (having(ImageStatus.FAILED), ImageStatus.FAILED.value),
        else_=ImageStatus.STORED.value,
    )


async def lock_task(db: AsyncConnection, task_id: str) -> None:
    """Hold the task's row until the transaction ends (a no-op on SQLite, which has one writer)."""
    await db.execute(select(TASKS.c.id).where(TASKS.c.id == task_id).with_for_update())


async def refresh_image_summary(db: AsyncConnection, task_id: str, now: datetime) -> None:
    """Recompute `tasks.image_status` after one of its images changed (same transaction)."""
    await db.execute(
        update(TASKS)
        .where(TASKS.c.id == task_id)
        .values(image_status=_summary(task_id), updated_at=now)
    )


async def settle_image_summary(
    db: AsyncConnection, task_id: str, now: datetime
) -> tuple[Task, list[Image]]:
    """Recompute the image summary after an image settled; the task and all its images now."""
    statement = (
        update(TASKS)
        .where(TASKS.c.id == task_id)
        .values(image_status=_summary(task_id), updated_at=now)
        .returning(*TASKS.c)
    )
    task = task_from_row((await db.execute(statement)).one())
    rows = await db.execute(
        select(IMAGES).where(IMAGES.c.task_id == task_id).order_by(IMAGES.c.position)
    )
    return task, [Image(**row._mapping) for row in rows]


async def update_download(
    db: AsyncConnection,
    job: DownloadJob,
    values: dict[str, Any],
    *,
    settles: bool = False,
    now: datetime | None = None,
) -> bool:
    """Write a download's progress or result, only while this job still holds the lease.

    `settles` (stored or failed) also refreshes the task's image summary. The
    task's row is locked first, so two images of one task settling at once are
    summarised one after the other: each sees the other's committed status.
    Callers that need the task afterwards use `settle_image_summary` (after
    `lock_task`) instead.
    """
    if settles:
        await lock_task(db, job.task_id)
    statement = (
        update(IMAGES)
        .where(
            _image_is(job.task_id, job.position),
            IMAGES.c.lease_owner == job.lease_owner,
            IMAGES.c.status == ImageStatus.PENDING.value,
        )
        .values(**values)
    )
    held = bool(_rowcount(await db.execute(statement)))
    if held and settles:
        assert now is not None
        await refresh_image_summary(db, job.task_id, now)
    return held


async def requeue_failed_images(
    db: AsyncConnection, task_id: str, now: datetime, position: int | None = None
) -> list[int]:
    """Queue a task's failed downloads again (all, or one); the positions queued."""
    await lock_task(db, task_id)
    conditions = [IMAGES.c.task_id == task_id, IMAGES.c.status == ImageStatus.FAILED.value]
    if position is not None:
        conditions.append(IMAGES.c.position == position)
    result = await db.execute(
        update(IMAGES)
        .where(*conditions)
        .values(
            status=ImageStatus.PENDING.value,
            attempts=0,
            renewed=False,
            next_attempt_at=now,
            error_code=None,
            error_message=None,
            lease_owner=None,
            lease_until=None,
            updated_at=now,
        )
        .returning(IMAGES.c.position)
    )
    return sorted(result.scalars())


async def release_download_leases(db: AsyncConnection, owner: str) -> int:
    """Give back every lease a stopping worker holds, so another starts at once."""
    result = await db.execute(
        update(IMAGES)
        .where(
            IMAGES.c.lease_owner.startswith(f"{owner}/", autoescape=True),
            IMAGES.c.status == ImageStatus.PENDING.value,
        )
        .values(lease_until=None, lease_owner=None)
    )
    return _rowcount(result)


async def download_queue_stats(db: AsyncConnection) -> tuple[int, datetime | None]:
    """How many downloads are queued, and since when the oldest has waited."""
    statement = select(func.count(), func.min(IMAGES.c.created_at)).where(
        IMAGES.c.status == ImageStatus.PENDING.value
    )
    count, oldest = (await db.execute(statement)).one()
    return int(count), oldest


async def task_images(session: AsyncSession, task_ids: Sequence[str]) -> dict[str, list[Image]]:
    """The images of these tasks, by task id, in position order (one query for a page)."""
    if not task_ids:
        return {}
    statement = (
        select(Image)
        .where(col(Image.task_id).in_(list(task_ids)))
        .order_by(col(Image.task_id), col(Image.position))
        .execution_options(populate_existing=True)
    )
    found: dict[str, list[Image]] = {task_id: [] for task_id in task_ids}
    for image in (await session.execute(statement)).scalars():
        found[image.task_id].append(image)
    return found


async def get_image(session: AsyncSession, task_id: str, position: int) -> Image | None:
    """One image of a task."""
    statement = (
        select(Image)
        .where(col(Image.task_id) == task_id, col(Image.position) == position)
        .execution_options(populate_existing=True)
    )
    return (await session.execute(statement)).scalar_one_or_none()


# Retention: small batches, each its own short statement, so no lock is held for long.
IDEMPOTENCY: Table = metadata.tables["idempotency_records"]
Pruner = Callable[..., Awaitable[int]]


async def prune_callback_deliveries(db: AsyncConnection, *, before: datetime, limit: int) -> int:
    """Delete up to `limit` deliveries received before `before`; how many went."""
    rows = (
        select(DELIVERIES.c.id)
        .where(DELIVERIES.c.received_at < before)
        .order_by(DELIVERIES.c.id)
        .limit(limit)
    )
    return await delete_picked(db, DELIVERIES, [DELIVERIES.c.id], rows)


async def prune_idempotency_records(db: AsyncConnection, *, before: datetime, limit: int) -> int:
    """Delete up to `limit` records created before `before`, keeping any whose task is
    still submitting (a retry must still find it); how many went."""
    still_submitting = select(TASKS.c.id).where(
        TASKS.c.id == IDEMPOTENCY.c.task_id, TASKS.c.status == TaskStatus.SUBMITTING.value
    )
    rows = (
        select(IDEMPOTENCY.c.owner, IDEMPOTENCY.c.key)
        .where(IDEMPOTENCY.c.created_at < before, ~still_submitting.exists())
        .order_by(IDEMPOTENCY.c.created_at)
        .limit(limit)
    )
    return await delete_picked(db, IDEMPOTENCY, [IDEMPOTENCY.c.owner, IDEMPOTENCY.c.key], rows)
