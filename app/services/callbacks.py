"""Receiving StarMagic's callbacks: verify, record, and apply or confirm.

Nothing here touches the network, so the webhook answers in milliseconds.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import structlog
from sqlalchemy import func
from sqlalchemy.ext.asyncio import AsyncConnection

from app import callback_urls, repository
from app.config import Settings
from app.db import transaction
from app.errors import DomainError, NotFound, Unprocessable
from app.models import utcnow
from app.repository import TASKS, OneStatement, TaskState, TerminalCallback
from app.schemas import Snapshot
from app.services.callback_batches import ConfirmationBatches, SnapshotBatches
from app.services.snapshot_batches import SnapshotCallback
from app.services.snapshots import (
    Outcome,
    UpstreamIdTaken,
    adopting,
    apply_snapshot,
    owns_upstream_id,
)
from app.upstream import SnapshotError, parse_snapshot

log = structlog.get_logger(__name__)

UNKNOWN_CALLBACK = "no such callback"  # the same answer for a bad token and an unknown task


class MalformedCallback(DomainError):
    status_code = 400
    code = "malformed_callback"


@dataclass(frozen=True)
class Received:
    outcome: Outcome
    task_id: str
    needs_confirmation: bool
    log: dict[str, Any]  # what the request's one log line says about this delivery


def parse_body(raw: bytes) -> tuple[Snapshot, Any]:
    """Decode a callback body, refusing anything that is not a task snapshot."""
    try:
        payload = json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise MalformedCallback("body is not valid JSON") from exc
    try:
        return parse_snapshot(payload), payload
    except SnapshotError as exc:
        raise Unprocessable(f"body is not a task snapshot: {exc}", code="not_a_snapshot") from exc


async def receive_callback(
    db: AsyncConnection,
    settings: Settings,
    task_id: str,
    token: str,
    raw: bytes,
    *,
    one_statement: bool = True,
) -> Received:
    """Check the token, record the delivery, and apply it (or queue its confirmation).

    `one_statement=False`: the batch statement already had this callback and left
    it here; the same statement alone would decide no differently."""
    if not callback_urls.verify(task_id, token, settings.webhook_secret):
        raise NotFound(UNKNOWN_CALLBACK)
    # A valid token was signed by us, so the id is one of ours and safe for SQL.
    if one_statement and settings.confirm_callbacks and db.dialect.name == "postgresql":
        received = await _confirm_in_one_statement(db, task_id, raw)
        if received is not None:
            return received
    state = await repository.task_state(db, task_id)
    if state is None:
        raise NotFound(UNKNOWN_CALLBACK)
    snapshot, _ = parse_body(raw)
    now = utcnow()
    poll_after = timedelta(seconds=settings.reconcile_after_seconds)

    log_fields: dict[str, Any] = {}

    async def record(db: AsyncConnection, outcome: Outcome) -> None:
        if outcome is Outcome.MISMATCH:
            raise Unprocessable(
                "the snapshot is about a different StarMagic task", code="task_mismatch"
            )
        await repository.insert_delivery(
            db,
            {
                "task_id": task_id,
                "body_sha256": hashlib.sha256(raw).hexdigest(),
                "upstream_status": snapshot.status.value,
                "outcome": outcome.value,
                "changed": outcome is Outcome.APPLIED,
                "received_at": now,
            },
        )

    if snapshot.status.terminal and settings.confirm_callbacks:
        # The request (with an adopted provider id) and the delivery commit together,
        # decided on the row as it is once locked: a poll's answer written meanwhile
        # must not erase this request.
        async with transaction(db):
            state = await _locked(db, state)
            outcome = await _queue_confirmation(db, state, snapshot, now)
            await record(db, outcome)
    else:
        # A move, its images, its event and the delivery commit together.
        async with transaction(db):
            # The transition is told on the request's line, not on a line of its own.
            applied = await apply_snapshot(
                db, task_id, snapshot, now=now, poll_after=poll_after, state=state
            )
            outcome = applied.outcome
            await record(db, outcome)
        if applied.changed:
            log_fields = {
                "task_status": applied.state.status.value,
                "progress": applied.state.progress,
            }
    log_fields.update(
        task_id=task_id,
        upstream_task_id=snapshot.upstream_id or state.upstream_task_id,
        reported=snapshot.status.value,
        outcome=outcome.value,
    )
    return Received(
        outcome, task_id, needs_confirmation=outcome is Outcome.CONFIRMING, log=log_fields
    )


def _terminal_callback(task_id: str, raw: bytes) -> tuple[Snapshot, TerminalCallback] | None:
    """The usual terminal callback, which a single statement may decide; None: not one."""
    try:
        snapshot, _ = parse_body(raw)
    except DomainError:
        return None  # the general path answers 404 for an unknown task first
    if not snapshot.status.terminal or not snapshot.upstream_id:
        return None
    callback = TerminalCallback(
        task_id=task_id,
        upstream_id=snapshot.upstream_id,
        reported=snapshot.status.value,
        body_sha256=hashlib.sha256(raw).hexdigest(),
    )
    return snapshot, callback


def _decided(snapshot: Snapshot, task_id: str, result: OneStatement | None) -> Received | None:
    """What the single statement decided, as the webhook answers it; None: the
    statement left it to the general path."""
    if result is None:  # its batch failed, having written nothing
        return None
    if result.status is None:
        raise NotFound(UNKNOWN_CALLBACK)
    if result.outcome is None:
        return None
    outcome = Outcome(result.outcome)
    fields = {
        "task_id": task_id,
        "upstream_task_id": snapshot.upstream_id,
        "reported": snapshot.status.value,
        "outcome": outcome.value,
    }
    return Received(outcome, task_id, needs_confirmation=outcome is Outcome.CONFIRMING, log=fields)


def _verified_terminal(
    settings: Settings, task_id: str, token: str, raw: bytes
) -> tuple[Snapshot, TerminalCallback] | None:
    """A batch's way in: the token checked (404 as on the general path), then
    `_terminal_callback`."""
    if not callback_urls.verify(task_id, token, settings.webhook_secret):
        raise NotFound(UNKNOWN_CALLBACK)
    return _terminal_callback(task_id, raw)


async def receive_in_batch(
    batches: ConfirmationBatches, settings: Settings, task_id: str, token: str, raw: bytes
) -> Received | None:
    """The usual terminal callback on PostgreSQL, decided together with the others
    arriving at the same time, already committed; None: `receive_callback` decides it."""
    terminal = _verified_terminal(settings, task_id, token, raw)
    if terminal is None:
        return None
    snapshot, callback = terminal
    return _decided(snapshot, task_id, await batches.decide(callback))


async def apply_in_batch(
    batches: SnapshotBatches, settings: Settings, task_id: str, token: str, raw: bytes
) -> Received | None:
    """Confirmation off: the usual terminal callback on PostgreSQL, applied together
    with the others arriving at the same time, already committed; None:
    `receive_callback` decides it."""
    terminal = _verified_terminal(settings, task_id, token, raw)
    if terminal is None:
        return None
    snapshot, callback = terminal
    decision = await batches.decide(SnapshotCallback(task_id, snapshot, callback.body_sha256))
    if decision is None:  # its batch failed, having written nothing
        return None
    if decision.state is None:
        raise NotFound(UNKNOWN_CALLBACK)
    if decision.outcome is None:
        return None
    state, outcome = decision.state, decision.outcome
    # The same line as `receive_callback` gives the same delivery.
    fields: dict[str, Any] = {}
    if outcome is Outcome.APPLIED:
        fields = {"task_status": state.status.value, "progress": state.progress}
    fields.update(
        task_id=task_id,
        upstream_task_id=snapshot.upstream_id or state.upstream_task_id,
        reported=snapshot.status.value,
        outcome=outcome.value,
    )
    return Received(outcome, task_id, needs_confirmation=False, log=fields)


async def _confirm_in_one_statement(
    db: AsyncConnection, task_id: str, raw: bytes
) -> Received | None:
    """The usual terminal callback on PostgreSQL in one round trip; None: not decided here.

    Taken only for a well-formed terminal snapshot that names its provider task;
    the statement itself leaves to the general path a task that does not carry
    that id yet (or carries another), having written nothing.
    """
    terminal = _terminal_callback(task_id, raw)
    if terminal is None:
        return None
    snapshot, callback = terminal
    results = await repository.confirm_in_batch(db, [callback], utcnow())
    return _decided(snapshot, task_id, results[task_id])


async def _locked(db: AsyncConnection, state: TaskState) -> TaskState:
    """The task's state read again under its row lock (PostgreSQL); SQLite's write
    transaction already holds the database, so what it read is still current."""
    if db.dialect.name != "postgresql":
        return state
    current = await repository.task_state(db, state.id, lock=True)
    assert current is not None  # tasks are never deleted
    return current


async def _queue_confirmation(
    db: AsyncConnection, state: TaskState, snapshot: Snapshot, now: datetime
) -> Outcome:
    """A terminal callback is a hint: make the task due for one query, not one per delivery.

    `state` is the row as it is now: read under its lock, in the caller's transaction.
    """
    if not await owns_upstream_id(db, state, snapshot.upstream_id):
        return Outcome.MISMATCH
    if state.status.terminal:
        return Outcome.DUPLICATE if state.status is snapshot.status else Outcome.ANOMALY
    values: dict[str, Any] = {}
    if snapshot.upstream_id:
        # A submit whose answer was lost learns the provider's id here.
        values["upstream_task_id"] = func.coalesce(TASKS.c.upstream_task_id, snapshot.upstream_id)
    try:
        async with adopting(db, state, snapshot.upstream_id):
            return await _request_confirmation(db, state, snapshot, now, values)
    except UpstreamIdTaken:
        return Outcome.MISMATCH


async def _request_confirmation(
    db: AsyncConnection, state: TaskState, snapshot: Snapshot, now: datetime, values: dict[str, Any]
) -> Outcome:
    """Request (or renew) the task's confirmation query, giving it `values` too."""
    if await repository.request_confirmation(db, state.id, now, values):
        return Outcome.CONFIRMING
    # A request already waits: this delivery adds no query. Only if that request's
    # poll is already out does it matter, as the poll's answer may predate this news.
    if await repository.renew_confirmation(db, state.id, now, values):
        return Outcome.DUPLICATE
    current = await repository.task_state(db, state.id)
    assert current is not None  # tasks are never deleted
    if current.status.terminal:  # settled between our read and our write: old news
        return Outcome.DUPLICATE if current.status is snapshot.status else Outcome.ANOMALY
    if values and current.upstream_task_id is None:
        await repository.update_where(db, state.id, repository.IS_ACTIVE, values)
    return Outcome.DUPLICATE
